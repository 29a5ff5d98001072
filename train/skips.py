"""What every data source shares: the per-process counts of skipped items by reason, and the data error.

Training passes over its data again and again, meeting the same bad items each time. `SKIPPED` counts every
meeting (what one pass skipped is a difference of it); `SKIPPED_ONCE`, which the training metrics report, counts
each item once: the skips met while listing the data or in the first pass over it (`first_pass` says which pass
the items come from now)."""

from __future__ import annotations

import collections
import logging

from csm_jax.core.errors import UserError

log = logging.getLogger("train.data")

AUDIO_EXTENSIONS = (".mp3", ".wav", ".flac", ".ogg")
SKIPPED: collections.Counter = collections.Counter()  # reason -> skips, every time a pass meets one (this process)
SKIPPED_ONCE: collections.Counter = collections.Counter()  # reason -> skipped items, each once (this process)
_in_first_pass = True


def first_pass(yes: bool) -> None:
    """Says whether the items met from now on come from the first pass over their data (else they are counted in
    `SKIPPED_ONCE` already)."""
    global _in_first_pass
    _in_first_pass = yes


def count(reason: str) -> None:
    SKIPPED[reason] += 1
    if _in_first_pass:
        SKIPPED_ONCE[reason] += 1


class DataError(UserError):
    """A data source that cannot feed training: no shards, too few for the processes, or no usable example."""


def skip(reason: str, key: str, warn: bool = True) -> None:
    """Counts one skipped item (and logs it unless it is an ordinary filter rejection); returns None."""
    count(reason)
    if warn:
        log.warning("skipping %s: %s", key, reason)


def skip_counts(skipped: collections.Counter, none: str = "nothing") -> str:
    """"reason n, ..." most frequent first, for the error that says why no example was usable."""
    return ", ".join(f"{reason} {n}" for reason, n in skipped.most_common()) or none

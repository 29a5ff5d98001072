"""What every data source shares: the per-process count of skipped items by reason, and the data error."""

from __future__ import annotations

import collections
import logging

from csm_jax.core.errors import UserError

log = logging.getLogger("train.data")

AUDIO_EXTENSIONS = (".mp3", ".wav", ".flac", ".ogg")
SKIPPED: collections.Counter = collections.Counter()  # reason -> count, for this process


class DataError(UserError):
    """A data source that cannot feed training: no shards, too few for the processes, or no usable example."""


def skip(reason: str, key: str, warn: bool = True) -> None:
    """Counts one skipped item (and logs it unless it is an ordinary filter rejection); returns None."""
    SKIPPED[reason] += 1
    if warn:
        log.warning("skipping %s: %s", key, reason)


def skip_counts(skipped: collections.Counter, none: str = "nothing") -> str:
    """"reason n, ..." most frequent first, for the error that says why no example was usable."""
    return ", ".join(f"{reason} {n}" for reason, n in skipped.most_common()) or none

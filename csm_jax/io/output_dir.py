"""Writing an output directory (a checkpoint or an export) without ever damaging what is already there.

The rule: `out` may be a new path or an empty directory. An existing directory is replaced only when it is
recognisably an earlier output of csm-jax (a checkpoint whose metadata.json carries our format marker, or an export
carrying EXPORT_MARKER, holding nothing we did not write) and the caller asked to overwrite; never when it is or
contains a source being read. The output is written into `.NAME.partial-PID-XXXXXXXX` beside `out`
and renamed into place. An error, SIGINT or SIGTERM removes that directory (a signal that arrives while Orbax writes
takes effect when that write ends); what a SIGKILLed writer left (its pid
is gone, or the directory predates the process now holding that pid) is swept by the next write to the same `out`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import signal
import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from csm_jax.core.errors import CheckpointError, raise_interrupted, signals_handled
from csm_jax.io.locks import exclusive

FORMAT = "csm-jax"
EXPORT_FORMAT = "csm-jax-export"
EXPORT_MARKER = "csm_jax_export.json"
OUR_ENTRIES = {"checkpoint": {"params", "config.json", "metadata.json", "codec"},
               "export": {"model.safetensors", "config.json", EXPORT_MARKER},
               "adapter": {"adapter_model.safetensors", "adapter_config.json", EXPORT_MARKER}}


def output_kind(path: Path) -> str | None:
    """"checkpoint" or "export" when the directory `path` carries one of our markers, else None."""
    if _json_object(path / "metadata.json").get("format") == FORMAT:
        return "checkpoint"
    marker = _json_object(path / EXPORT_MARKER)
    if marker.get("format") == EXPORT_FORMAT:
        return marker.get("kind") if marker.get("kind") in OUR_ENTRIES else "export"
    return None


def mark_export(directory: Path, kind: str = "export", **fields: str) -> None:
    """Marks `directory` as an export (or, with kind="adapter", a LoRA adapter) written by csm-jax, so that a later
    one may replace it."""
    (directory / EXPORT_MARKER).write_text(json.dumps({"format": EXPORT_FORMAT, "kind": kind, **fields}, indent=2)
                                           + "\n")


def check_output(out: str | os.PathLike, *, overwrite: bool = False, sources: Iterable[str | os.PathLike] = (),
                 needed_bytes: int | None = None) -> Path:
    """The absolute path to write `out` at, after sweeping what killed writes to it left; raises CheckpointError
    (naming the fix) when writing there could damage anything, or when its disk lacks `needed_bytes`."""
    final = Path(os.path.abspath(os.path.expanduser(out)))
    sweep_stale(final)
    real = Path(os.path.realpath(final))
    cwd = Path.cwd().resolve()
    if final.is_symlink():
        raise CheckpointError(f"{out} is a symbolic link; give the path of a new directory for the output (the link "
                              f"and what it points to are left alone).")
    if real == cwd or real in cwd.parents:
        raise CheckpointError(f"{out} is the current directory or one of its parents; give the name of a new "
                              f"directory for the output, such as {Path(out) / 'csm-jax-out'}.")
    for source in sources:
        for src in {Path(os.path.abspath(source)), Path(os.path.realpath(source))}:
            if src == real:
                raise CheckpointError(f"{out} is the source being converted; write the output to another directory.")
            if real in src.parents:
                raise CheckpointError(f"{out} contains the source {source}, which replacing it would delete; write the "
                                      f"output to another directory.")
    if real.exists():
        _check_existing(real, out, overwrite)
    parent = next(p for p in real.parents if p.exists())
    if not parent.is_dir():
        raise CheckpointError(f"{parent} is a file, so {out} cannot be made there; give an output path in a "
                              f"directory.")
    if needed_bytes is not None:
        free = shutil.disk_usage(parent).free
        if free < needed_bytes:
            raise CheckpointError(f"not enough free space for {out}: it needs about {_size(needed_bytes)} and {parent} "
                                  f"has {_size(free)} free. Free some space or choose an output on another disk.")
    return final


def _check_existing(real: Path, out: str | os.PathLike, overwrite: bool) -> None:
    if not real.is_dir():
        raise CheckpointError(f"{out} is an existing file, not a directory; give the path of a new directory for the "
                              f"output (the file is left alone).")
    try:
        entries = sorted(p.name for p in real.iterdir())
    except OSError as e:
        raise CheckpointError(f"cannot read the existing directory {out} ({e.strerror}); give the path of a new "
                              f"directory for the output.") from e
    if not entries:
        return
    kind = output_kind(real)
    if kind is None:
        raise CheckpointError(f"{out} is a non-empty directory that csm-jax did not write (it holds "
                              f"{_listing(entries)}); nothing was changed. Give a new or empty directory for the "
                              f"output.")
    foreign = sorted(set(entries) - OUR_ENTRIES[kind])
    if foreign:
        raise CheckpointError(f"{out} holds a csm-jax {kind} plus files csm-jax did not write ({_listing(foreign)}); "
                              f"nothing was changed. Move them away or give another directory for the output.")
    if not overwrite:
        raise CheckpointError(f"{out} already holds a csm-jax {kind}; pass --overwrite (overwrite=True) to replace "
                              f"it, or give another directory for the output.")


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, overwrite: bool = False, sources: Iterable[str | os.PathLike] = (),
                     needed_bytes: int | None = None) -> Iterator[Path]:
    """Yields a fresh temporary directory beside `out`; on success it takes the place of `out` by renaming.

    `out` is checked first (`check_output`); a second writer of the same `out` is refused while one writes
    (`csm_jax.io.locks.exclusive`); on any exception, SIGINT or SIGTERM the temporary directory (and
    any parent directory made for it) is removed and `out` is left as it was. Running out of disk space becomes
    a CheckpointError that says how much was needed and how much is free.
    """
    sources = list(sources)
    final = check_output(out, overwrite=overwrite, sources=sources, needed_bytes=needed_bytes)
    made = _make_parents(final.parent)
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with _signals_raise(), exclusive(final.parent / f".{final.name}.lock", f"the output {out}",
                                         "write to another directory"):
            tmp.mkdir()
            yield tmp
            check_output(out, overwrite=overwrite, sources=sources)  # what is there may have changed meanwhile
            _commit(tmp, final)
    except BaseException as e:
        _remove(tmp)
        for directory in reversed(made):
            with contextlib.suppress(OSError):
                directory.rmdir()
        if _out_of_space(e):
            parent = next(p for p in final.parents if p.exists())
            needs = f"it needs about {_size(needed_bytes)}, and " if needed_bytes else ""
            raise CheckpointError(f"the disk ran out of space while writing {out}: {needs}{parent} has "
                                  f"{_size(shutil.disk_usage(parent).free)} free now that the partial output was "
                                  f"removed. Free some space or choose an output on another disk.") from e
        raise


def _remove(tmp: Path) -> None:
    """Removes `tmp`, again if a writer thread of the interrupted write (Orbax, tensorstore) still adds to it."""
    for _ in range(20):
        shutil.rmtree(tmp, ignore_errors=True)
        time.sleep(0.05)
        if not os.path.lexists(tmp):
            return


def _make_parents(parent: Path) -> list[Path]:
    """Creates `parent` and its missing ancestors; returns those it created, outermost first."""
    missing = [p for p in (parent, *parent.parents) if not p.exists()][::-1]
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the directory {parent} ({e.strerror}); give an output path in a "
                              f"directory you can write to.") from e
    return missing


def _commit(tmp: Path, final: Path) -> None:
    if final.is_dir() and any(final.iterdir()):  # an earlier output of ours, checked just before
        old = final.parent / f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        final.rename(old)
        try:
            tmp.rename(final)
        except BaseException:
            if not final.exists():
                old.rename(final)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, final)  # onto an empty directory too, in one step
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise
        raise CheckpointError(f"something else was written at {final} during the conversion; it was left alone. "
                              f"Give another directory for the output.") from e


def sweep_stale(final: Path) -> None:
    """Removes the partial directories of `final` left by writers that were killed, and puts back an earlier
    output that a writer killed between its two renames had moved aside."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(partial|old)-(\d+)-[0-9a-f]{{8}}")
    try:
        found = [(m[1], p) for p in final.parent.iterdir() if (m := pattern.fullmatch(p.name))]
    except OSError:
        return
    stale = [(kind, p) for kind, p in found
             if not p.is_symlink() and p.is_dir() and not _writer_alive(int(pattern.fullmatch(p.name)[2]), p)]
    stale.sort(key=lambda item: (item[0] == "old", -item[1].lstat().st_mtime))  # partials first, newest old first
    for kind, path in stale:
        if kind == "old" and not os.path.lexists(final):
            path.rename(final)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _writer_alive(pid: int, path: Path) -> bool:
    """Whether process `pid` may still be writing `path` (it exists and is not younger than `path`)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = _process_start(pid)
    return started is None or path.lstat().st_mtime >= started - 1.0


def _process_start(pid: int) -> float | None:
    """The start time of `pid` in seconds since the epoch (Linux /proc), or None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime in clock ticks
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def _signals_raise():
    """While writing, SIGTERM (and SIGINT, where Python does not already raise KeyboardInterrupt) raise `Interrupted`
    in the main thread, so that the cleanup above runs. Handlers that the application installed are kept."""
    return signals_handled(raise_interrupted, {signal.SIG_DFL})


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Holds SIGINT and SIGTERM back until the block ends (a second one acts at once), for a writer whose threads
    cannot be stopped halfway (Orbax's go on writing, and print tracebacks, after the caller has cleaned up)."""
    held: list[int] = []

    def hold(signum: int, frame) -> None:
        if held:
            raise_interrupted(signum)
        held.append(signum)
        os.write(2, b"stopping once the current write ends (send the signal again to stop at once)\n")

    with signals_handled(hold, {signal.SIG_DFL, signal.default_int_handler, raise_interrupted}):
        yield
    if held:
        raise_interrupted(held[0])


def _out_of_space(error: BaseException | None) -> bool:
    for _ in range(16):  # the cause chain of a wrapped OSError (tensorstore reports it in its message)
        if error is None:
            return False
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _size(n: int) -> str:
    exponent = min(int(math.log(max(n, 1), 1000)), 4)
    return f"{n / 1000 ** exponent:.1f} {['bytes', 'kB', 'MB', 'GB', 'TB'][exponent]}"


def _listing(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")

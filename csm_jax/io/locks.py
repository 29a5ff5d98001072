"""One writer at a time for a training workdir, a prepared shard, a voices folder or a conversion's output.

The lock is `fcntl.flock` on a small file that names its holder (pid and host). The kernel drops a flock when its
holder's process dies, however it dies (SIGKILL, OOM), so a killed run never leaves the lock stuck; the file itself
is removed on release. flock works across processes on one host and on most network filesystems (NFS, Lustre)
across hosts.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from csm_jax.core.errors import UserError


class Busy(UserError):
    """What the lock guards is being written by another process."""


@contextlib.contextmanager
def exclusive(lock_file: str | os.PathLike, what: str, alternative: str) -> Iterator[None]:
    """Holds `lock_file` (created if missing) for the block, or raises `Busy` at once, naming `what`, the holder
    and `alternative` (such as "give another workdir").

    Releasing unlinks the file while it is still held; an acquirer that finds, once it holds its lock, that the path
    no longer names the file it locked tries again, so two processes never both hold the lock."""
    lock_file = Path(lock_file)
    while True:
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot create the lock file {lock_file} ({e.strerror}); give {what} in a directory "
                            f"you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise Busy(f"{what} is in use by {holder}; wait for that run to end (or stop it), or {alternative}") \
                from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # released and removed by its holder between our open and flock
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} (since {time.strftime('%H:%M:%S')})".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_file)
        os.close(fd)


@contextlib.contextmanager
def exclusive_making_parents(lock_file: str | os.PathLike, what: str, alternative: str) -> Iterator[None]:
    """`exclusive`, creating the lock file's missing parent directories first and removing those of them that are
    empty afterwards: a run refused, or stopped before it wrote anything, leaves no directory behind."""
    lock_file = Path(os.path.abspath(lock_file))
    made = [p for p in lock_file.parents if not p.exists()]  # deepest first
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive(lock_file, what, alternative):
            yield
    finally:
        for directory in made:
            with contextlib.suppress(OSError):  # not empty: the run wrote there
                directory.rmdir()

"""One writer at a time: an exclusive flock on a lock file, which the kernel drops on any exit."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from instraug.errors import InputError


class WriterLock:
    """Holds `lock_file` exclusively, or fails at once naming `subject` and the pid that holds it.

    A lock held by a process that died (even by kill -9) is free again: flock belongs to the open
    file, which the kernel closes with the process. The lock file itself stays; removing it would
    let two processes lock two different files of the same name.
    """

    def __init__(self, lock_file: Path, subject: Path, what: str, hint: str) -> None:
        self.lock_file = lock_file
        self.subject = subject
        self.what = what
        self.hint = hint
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise InputError (exit 2) when another process has it."""
        try:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise InputError(
                f"cannot create the lock file {self.lock_file.name}: {exc.strerror or exc}", self.subject
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _pid_in(fd)
            os.close(fd)
            pid = f" (pid {holder})" if holder else ""
            raise InputError(
                f"another instraug run is using this {self.what}{pid}; {self.hint}", self.subject
            ) from None
        with contextlib.suppress(OSError):  # the pid is for messages only
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let the next writer in (closing the file drops the lock)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _pid_in(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode("ascii").strip())
    return None


def run_dir_lock(run_dir: Path) -> WriterLock:
    """The lock of a run directory (`expand -o`)."""
    return WriterLock(
        run_dir / ".instraug.lock", run_dir, "run directory", "wait for it or choose another -o"
    )


def cache_lock(cache: Path) -> WriterLock:
    """The lock of a response cache file, beside it (CACHE.lock)."""
    return WriterLock(
        cache.with_name(cache.name + ".lock"), cache, "LLM cache", "wait for it or choose another --cache"
    )

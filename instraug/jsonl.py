"""Streaming JSONL: read with line numbers in every error, write atomically (or to stdout)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import stat
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import jsonlines
import orjson

from instraug.errors import InputError

STDIO = "-"
_JSON_POSITION = re.compile(r": line \d+ column (\d+) \(char \d+\)")


def _loads(line: str | bytes) -> Any:
    return orjson.loads(line)


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; errors name path:line."""
    name = str(path)
    if name == STDIO:
        yield from _read_rows(sys.stdin.buffer, "<stdin>")
        return
    try:
        fp = open(path, "rb")  # noqa: SIM115 - closed below, after the generator finishes
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", name) from None
    with fp:
        yield from _read_rows(fp, name)


def _read_rows(fp: IO[bytes], name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    lineno = 0
    current = b""

    def numbered() -> Iterator[bytes]:
        nonlocal lineno, current
        for lineno, current in enumerate(fp, 1):  # noqa: B007 - read by the loop below
            yield current

    reader = jsonlines.Reader(numbered(), loads=_loads)
    try:
        for obj in reader.iter(skip_empty=True):
            if not isinstance(obj, dict):
                raise InputError(f"expected a JSON object, got {type(obj).__name__}", name, lineno)
            yield lineno, obj
    except jsonlines.InvalidLineError as exc:
        reason = _json_error(current) if isinstance(exc.__cause__, orjson.JSONDecodeError) else None
        if reason is None:
            reason = _JSON_POSITION.sub(r" at column \1", str(exc.__cause__ or exc))
        raise InputError(f"malformed JSON: {reason}", name, lineno) from None


def _json_error(raw: bytes) -> str | None:
    """What is wrong with a line and at which column (in characters) of the line as the file has it.

    The line is parsed again without its newline: parsed with it, a truncated line ends "at line 2
    column 1", and a string cut short reads as a control character instead of the end of the data.
    """
    text = raw.decode("utf-8").rstrip("\r\n")
    skipped = 1 if text.startswith(jsonlines.jsonlines.SKIPPABLE_SINGLE_INITIAL_CHARS) else 0
    try:
        orjson.loads(text[skipped:])
    except orjson.JSONDecodeError as exc:
        return f"{exc.msg} at column {exc.pos + 1 + skipped}"
    return None


class RowWriter:
    """Writes one compact JSON object per line (orjson; the hot path of every stage)."""

    __slots__ = ("_write",)

    def __init__(self, fp: IO[bytes]):
        self._write = fp.write

    def write(self, obj: Any) -> None:
        self._write(orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE))

    def write_all(self, rows: Iterable[Any]) -> int:
        count = 0
        write, dumps, newline = self._write, orjson.dumps, orjson.OPT_APPEND_NEWLINE
        for row in rows:
            write(dumps(row, option=newline))
            count += 1
        return count


@contextlib.contextmanager
def atomic_writer(path: str | Path) -> Iterator[RowWriter]:
    """A JSONL writer whose file appears only when the block ends without error."""
    with atomic_binary(path) as fp:
        yield RowWriter(fp)


@contextlib.contextmanager
def atomic_binary(path: str | Path) -> Iterator[IO[bytes]]:
    """Write to a temporary file beside `path`, rename it into place on success; `-` is stdout.

    The file gets the mode a shell redirection would give it: the umask's for a new file, the old
    file's when it replaces one. A symlink is written through, to the file it points to.
    """
    name = str(path)
    if name == STDIO:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    target = Path(path)
    if target.is_symlink():
        target = Path(os.path.realpath(target))
    if target.is_dir():
        raise InputError("cannot write: is a directory", name)
    if target.exists() and not target.is_file():  # /dev/null, a FIFO: write straight through
        try:
            with open(target, "wb") as fp:
                yield fp
        except OSError as exc:
            raise InputError(f"cannot write: {exc.strerror or exc}", name) from None
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        fd, tmp = _create_temporary(target)
    except OSError as exc:
        raise InputError(f"cannot write: {exc.strerror or exc}", name) from None
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as fp:
            yield fp
            try:
                fp.flush()
                # Renamed while the lock is held: a cleaner never sees a finished file as stale.
                os.replace(tmp, target)
            except OSError as exc:
                raise InputError(f"cannot write: {exc.strerror or exc}", name) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# Temporary files are named as tempfile.mkstemp names them (8 characters of this alphabet), so the
# leftovers of earlier versions, which used mkstemp, are recognised too.
_TMP_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789_"
_TMP_RANDOM = 8


def _temporary_name(target: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(target.name)}\.[{_TMP_ALPHABET}]{{{_TMP_RANDOM}}}\.tmp")


# Who is still writing a temporary file? Its writer holds an exclusive flock(2) on it from creation
# to rename, and the kernel drops that lock when the writer exits in any way, kill -9 included. A
# file that can be locked has no writer: it is stale. A pid in the name would not do: pids are
# reused, and a run on another machine sharing the folder (NFS, where Linux maps flock to POSIX
# locks) has pids this machine cannot check.


def _create_temporary(target: Path) -> tuple[int, str]:
    """A new, locked temporary file beside `target` with the mode the final file should have."""
    while True:
        suffix = "".join(secrets.choice(_TMP_ALPHABET) for _ in range(_TMP_RANDOM))
        tmp = os.path.join(target.parent, f".{target.name}.{suffix}.tmp")
        try:
            # 0o666 less the umask, as the kernel applies it: the mode any new file gets
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # A cleaner may have taken the file for stale between open and flock, and removed it.
            if os.path.samestat(os.fstat(fd), os.stat(tmp, follow_symlinks=False)):
                with contextlib.suppress(FileNotFoundError):
                    os.fchmod(fd, stat.S_IMODE(os.stat(target).st_mode) & 0o777)  # the old file's mode
                return fd, tmp
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)


def remove_stale_temporaries(target: str | Path) -> list[str]:
    """Remove the temporary files of `target` (`.NAME.*.tmp` beside it) whose writer is gone."""
    target = Path(target)
    pattern = _temporary_name(target)
    removed: list[str] = []
    try:
        entries = [e.path for e in os.scandir(target.parent) if pattern.fullmatch(e.name)]
    except OSError:
        return removed
    for path in entries:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is still running
            if os.path.samestat(info, os.stat(path, follow_symlinks=False)):
                os.unlink(path)
                removed.append(path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows atomically; return how many."""
    with atomic_writer(path) as writer:
        return writer.write_all(rows)

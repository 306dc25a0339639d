"""Streaming JSONL: read with line numbers in every error, write atomically (or to stdout)."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
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

    def numbered() -> Iterator[bytes]:
        nonlocal lineno
        for lineno, line in enumerate(fp, 1):  # noqa: B007 - read by the loop below
            yield line

    reader = jsonlines.Reader(numbered(), loads=_loads)
    try:
        for obj in reader.iter(skip_empty=True):
            if not isinstance(obj, dict):
                raise InputError(f"expected a JSON object, got {type(obj).__name__}", name, lineno)
            yield lineno, obj
    except jsonlines.InvalidLineError as exc:
        reason = _JSON_POSITION.sub(r" at column \1", str(exc.__cause__ or exc))
        raise InputError(f"malformed JSON: {reason}", name, lineno) from None


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
    """Write to a temporary file beside `path`, rename it into place on success; `-` is stdout."""
    name = str(path)
    if name == STDIO:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    target = Path(path)
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
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise InputError(f"cannot write: {exc.strerror or exc}", name) from None
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as fp:
            yield fp
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise InputError(f"cannot write: {exc.strerror or exc}", name) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows atomically; return how many."""
    with atomic_writer(path) as writer:
        return writer.write_all(rows)

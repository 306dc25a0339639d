"""JSONL writing: atomic for files, straight through for devices and pipes."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from instraug.errors import InputError
from instraug.jsonl import read_jsonl, write_jsonl


def test_writing_to_dev_null_leaves_the_device_alone() -> None:
    assert write_jsonl(os.devnull, [{"a": 1}]) == 1
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


def test_writing_to_a_fifo_streams_through_it(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    write_jsonl(fifo, [{"a": 1}, {"b": 2}])
    reader.join(10)
    assert received == [b'{"a":1}\n{"b":2}\n']
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_failed_write_leaves_no_file_and_no_temporary(tmp_path: Path) -> None:
    def rows():
        yield {"a": 1}
        raise InputError("boom")

    with pytest.raises(InputError):
        write_jsonl(tmp_path / "out.jsonl", rows())
    assert list(tmp_path.iterdir()) == []


def test_blank_lines_keep_their_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"a": 1}\n\n{"b": 2}\n')
    assert [line for line, _row in read_jsonl(path)] == [1, 3]

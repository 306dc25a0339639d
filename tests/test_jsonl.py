"""JSONL: errors at path:line:column; writes atomic for files, straight through for devices and pipes."""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from instraug.errors import InputError
from instraug.jsonl import atomic_writer, read_jsonl, remove_stale_temporaries, write_jsonl


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


# --------------------------------------------------------------------------------------------
# Malformed lines: the column of the line as the file has it


@pytest.mark.parametrize(
    ("content", "message"),
    [
        # the last line of a file cut short, without its newline
        (b'{"a": 1}\n{"b": [1, 2', "f.jsonl:2: malformed JSON: unexpected end of data at column 12"),
        # cut short before its newline: not "line 2 column 1" of the parser
        (b'{"b": [1, 2\n{"a": 1}\n', "f.jsonl:1: malformed JSON: unexpected end of data at column 12"),
        (b'{"b": [1, 2\r\n', "f.jsonl:1: malformed JSON: unexpected end of data at column 12"),
        # a string cut short ends the data; it is not a control character
        (b'{"b": "wh\n', "f.jsonl:1: malformed JSON: unexpected end of data at column 10"),
        # columns count characters, not bytes
        (
            '{"é": "ü", "x": ]\n'.encode(),
            "f.jsonl:1: malformed JSON: unexpected character, expected a JSON value at column 17",
        ),
        # a byte order mark is skipped, and counted
        (
            '\ufeff{"a": ]\n'.encode(),
            "f.jsonl:1: malformed JSON: unexpected character, expected a JSON value at column 8",
        ),
        (b'{"a": 1} x\n', "f.jsonl:1: malformed JSON: unexpected content after document at column 10"),
    ],
)
def test_a_malformed_line_names_its_column(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("f.jsonl").write_bytes(content)
    with pytest.raises(InputError) as error:
        list(read_jsonl("f.jsonl"))
    assert str(error.value) == message


# --------------------------------------------------------------------------------------------
# Modes, symlinks and temporary files


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_a_new_file_gets_the_umask_mode(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        write_jsonl(tmp_path / "out.jsonl", [{"a": 1}])
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "out.jsonl").st_mode) == 0o666 & ~umask


def test_a_replaced_file_keeps_its_mode(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    out.chmod(0o644)
    write_jsonl(out, [{"a": 1}])
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644
    out.chmod(0o600)
    write_jsonl(out, [{"a": 2}])
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert out.read_bytes() == b'{"a":2}\n'


def test_a_symlink_is_written_through(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    real = tmp_path / "data" / "out.jsonl"
    real.write_text("old\n")
    link = tmp_path / "out.jsonl"
    link.symlink_to("data/out.jsonl")
    write_jsonl(link, [{"a": 1}])
    assert link.is_symlink()
    assert real.read_bytes() == b'{"a":1}\n'
    assert temporaries(tmp_path) == temporaries(tmp_path / "data") == []


def test_a_running_writers_temporary_is_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with atomic_writer(out) as first:
        first.write({"first": 1})
        (held,) = temporaries(tmp_path)
        write_jsonl(out, [{"second": 2}])  # a second writer of the same output meanwhile
        assert temporaries(tmp_path) == [held]
        first.write({"first": 2})
    assert out.read_bytes() == b'{"first":1}\n{"first":2}\n'
    assert temporaries(tmp_path) == []


WRITER = """
import sys, time
from instraug.jsonl import atomic_writer
with atomic_writer(sys.argv[1]) as writer:
    writer.write({"a": 1})
    print("writing", flush=True)
    time.sleep(600)
"""


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path: Path) -> None:
    out = tmp_path / "generations.jsonl"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE)
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == b"writing\n"
        (left,) = temporaries(tmp_path)
        write_jsonl(out, [{"b": 1}])
        assert temporaries(tmp_path) == [left]  # its writer is alive
        writer.kill()  # SIGKILL: no cleanup runs
        writer.wait(timeout=30)
        assert temporaries(tmp_path) == [left]
        write_jsonl(out, [{"b": 2}])
        assert temporaries(tmp_path) == []
        assert out.read_bytes() == b'{"b":2}\n'
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        writer.stdout.close()  # type: ignore[union-attr]


def test_only_this_outputs_temporaries_are_judged(tmp_path: Path) -> None:
    names = [
        ".out.jsonl.abcdefgh.tmp",  # this output's, as a killed run leaves it: removed
        ".out.jsonl.abc.tmp",  # not a name instraug gives
        ".out.jsonl.keep_me_please.tmp",
        ".other.jsonl.abcdefgh.tmp",
        "out.jsonl.abcdefgh.tmp",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".out.jsonl.dir12345.tmp").mkdir()
    write_jsonl(tmp_path / "out.jsonl", [{"a": 1}])
    assert temporaries(tmp_path) == sorted([*names[1:], ".out.jsonl.dir12345.tmp"])


def test_a_writer_whose_new_temporary_a_cleaner_removed_starts_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The moment between creating a temporary file and locking it: a cleaner may take it for stale."""
    out = tmp_path / "out.jsonl"
    real_flock = fcntl.flock
    raced: list[list[str]] = []

    def flock_after_a_cleaner(fd: int, operation: int) -> None:
        if not raced and operation == fcntl.LOCK_EX:
            raced.append(remove_stale_temporaries(out))
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_a_cleaner)
    write_jsonl(out, [{"a": 1}])
    assert len(raced[0]) == 1  # the cleaner did remove the writer's first temporary
    assert out.read_bytes() == b'{"a":1}\n'
    assert temporaries(tmp_path) == []

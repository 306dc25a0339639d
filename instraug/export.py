"""Exports of a run's train.jsonl: LLaVA conversation JSON, a Hugging Face datasets folder, parquet.

Each output appears whole or not at all: it is written beside its final path and renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from instraug.errors import InputError, InstraugError
from instraug.jsonl import (
    _create_temporary,
    _temporary_name,
    atomic_binary,
    read_jsonl,
    remove_stale_temporaries,
)

if TYPE_CHECKING:
    import pyarrow as pa

TRAIN = "train.jsonl"
HF_EXTRA = "pip install 'instraug[hf]'"


#: Each format, and where it goes inside the run directory when no output path is given.
DEFAULT_OUTPUT = {"llava": "train_llava.json", "hf": "train_hf", "parquet": "train.parquet"}


class MissingExtraError(InstraugError):
    """An optional dependency is not installed; the message gives the pip command."""


def export(run_dir: Path, fmt: str, output: Path | None = None, *, progress: bool = True) -> tuple[Path, int]:
    """Write RUN_DIR/train.jsonl in `fmt` to `output` (default: inside the run dir); (path, rows)."""
    if fmt not in DEFAULT_OUTPUT:
        raise InputError(f"unknown export format {fmt!r} (choose {', '.join(DEFAULT_OUTPUT)})")
    train = Path(run_dir) / TRAIN
    if not train.is_file():
        raise InputError(f"not a run directory: no {TRAIN} (run `instraug expand` first)", run_dir)
    out = Path(output) if output is not None else Path(run_dir) / DEFAULT_OUTPUT[fmt]
    if fmt == "llava":
        return out, write_llava(read_jsonl(train), str(train), out)
    _require(*(("datasets", "pyarrow") if fmt == "hf" else ("pyarrow",)))
    table = arrow_table(train)
    if fmt == "parquet":
        write_parquet(table, out)
    else:
        write_hf_dataset(table, out, progress=progress)
    return out, table.num_rows


# --------------------------------------------------------------------------------------------
# LLaVA


def llava_item(row: dict[str, Any], source: str, line: int) -> dict[str, Any]:
    """One training row as a LLaVA conversation; a row without an image gets no <image> token."""
    for key in ("unique_id", "prompt", "target"):
        if not isinstance(row.get(key), str):
            raise InputError(f"a training row needs a '{key}' string for LLaVA", source, line)
    image = row.get("image_path")
    if image is not None and not isinstance(image, str):
        raise InputError("'image_path' must be a string or null", source, line)
    item: dict[str, Any] = {"id": row["unique_id"]}
    if image is not None:
        item["image"] = image
    human = f"<image>\n{row['prompt']}" if image is not None else row["prompt"]
    item["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": row["target"]}]
    return item


def write_llava(rows: Iterable[tuple[int, dict[str, Any]]], source: str, out: Path) -> int:
    """Stream the rows into one JSON list (one item per line); return how many."""
    count = 0
    with atomic_binary(out) as fp:
        fp.write(b"[")
        for line, row in rows:
            fp.write(b",\n" if count else b"\n")
            fp.write(orjson.dumps(llava_item(row, source, line)))
            count += 1
        fp.write(b"\n]\n" if count else b"]\n")
    return count


# --------------------------------------------------------------------------------------------
# Arrow: parquet and Hugging Face datasets


def _require(*modules: str) -> None:
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            raise MissingExtraError(
                f"this export needs {' and '.join(modules)} (the hf extra): {HF_EXTRA}"
            ) from None


def arrow_table(train: Path) -> pa.Table:
    """train.jsonl as an Arrow table: the union of the rows' keys, in first-seen order; missing = null."""
    import pyarrow as pa

    columns: dict[str, list[Any]] = {}
    rows = 0
    for _line, row in read_jsonl(train):
        for key in row:
            if key not in columns:
                columns[key] = [None] * rows
        for key, values in columns.items():
            values.append(row.get(key))
        rows += 1
    if not rows:
        raise InputError("no training rows to export", train)
    arrays = {}
    for key, values in columns.items():
        try:
            arrays[key] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            line = _first_odd_line(train, key)
            raise InputError(
                f"column '{key}' does not have one type across rows: {exc}", train, line
            ) from None
    return pa.table(arrays)


def _first_odd_line(train: Path, key: str) -> int | None:
    """The first line whose `key` has another JSON type than the first non-null value."""
    first: type | None = None
    for line, row in read_jsonl(train):
        value = row.get(key)
        if value is None:
            continue
        kind = float if isinstance(value, int) and not isinstance(value, bool) else type(value)
        if first is None:
            first = kind
        elif kind is not first:
            return line
    return None


def write_parquet(table: pa.Table, out: Path) -> None:
    """One parquet file, renamed into place when complete."""
    import pyarrow.parquet as pq

    with atomic_binary(out) as fp:
        pq.write_table(table, fp)


def write_hf_dataset(table: pa.Table, out: Path, *, progress: bool = True) -> None:
    """A `datasets.Dataset.save_to_disk` folder, swapped into place when complete."""
    import datasets
    from datasets.utils import logging as hf_logging  # these names hold from datasets 2.x to 5.x

    shown = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        with _atomic_folder(out) as tmp:
            datasets.Dataset(table).save_to_disk(str(tmp))
    finally:
        if shown:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _atomic_folder(out: Path) -> Iterator[Path]:
    """A fresh folder beside `out`; on success it replaces `out` (an earlier export folder).

    The folder is `.NAME.XXXXXXXX.tmp.d`, and its writer holds a flock on the temporary file
    `.NAME.XXXXXXXX.tmp` beside it (made as jsonl makes its own) until it is done, so the next
    export of `out` can tell the folders a killed export left from those of one still running.
    """
    if out.exists() and not (out / "dataset_info.json").is_file():
        what = "a file" if not out.is_dir() else "a folder that is not a dataset export"
        raise InputError(f"cannot write: already exists and is {what}", out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_folders(out)
        fd, lock = _create_temporary(out)
    except OSError as exc:
        raise InputError(f"cannot write: {exc.strerror or exc}", out) from None
    tmp, old = Path(lock + _FOLDER), Path(lock + _OLD)
    try:
        try:
            tmp.mkdir()  # not mkdtemp: the folder gets the umask's mode, like any other output
        except OSError as exc:
            raise InputError(f"cannot write: {exc.strerror or exc}", out) from None
        yield tmp
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError as exc:
            if old.exists():
                os.replace(old, out)
            raise InputError(f"cannot write: {exc.strerror or exc}", out) from None
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # before the flock goes: a cleaner never takes this writer for gone
        os.close(fd)


#: What follows the name of a writer's lock file: its new folder, and the export it displaces.
_FOLDER, _OLD = ".d", ".old"


def remove_stale_folders(out: Path) -> list[Path]:
    """Remove the temporary folders of `out` that a killed export left; never a running one's."""
    remove_stale_temporaries(out)  # the lock files no writer holds
    locks = _temporary_name(out)
    legacy = re.compile(rf"\.{re.escape(out.name)}\.(\d+)\.[0-9a-f]{{8}}\.(?:tmp|old)")
    removed: list[Path] = []
    try:
        entries = [entry for entry in os.scandir(out.parent) if entry.is_dir(follow_symlinks=False)]
    except OSError:
        return removed
    for entry in entries:
        lock, suffix = os.path.splitext(entry.path)
        if suffix in (_FOLDER, _OLD) and locks.fullmatch(os.path.basename(lock)):
            stale = not os.path.lexists(lock)
        elif match := legacy.fullmatch(entry.name):
            # Named by earlier versions after their writer's pid, with no lock to ask.
            stale = not _running(int(match.group(1)))
        else:
            continue
        if stale:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:
        return True  # another user's process
    return True

"""`instraug export`: LLaVA JSON, a datasets folder and parquet, each read back with its own library."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import read_jsonl, write_jsonl
from typer.testing import Result

from instraug.cli.export import ExportFormat
from instraug.errors import InputError
from instraug.export import DEFAULT_OUTPUT, MissingExtraError, export, llava_item

HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None
HAS_DATASETS = HAS_PYARROW and importlib.util.find_spec("datasets") is not None
needs_pyarrow = pytest.mark.skipif(
    not HAS_PYARROW, reason="pyarrow is not installed (pip install 'instraug[hf]')"
)
needs_datasets = pytest.mark.skipif(
    not HAS_DATASETS, reason="datasets is not installed (pip install 'instraug[hf]')"
)

#: MultiInstruct rows as `assemble` writes them: each task brings its own fields.
TRAIN = [
    {
        "unique_id": "GC_000",
        "task_name": "GC",
        "image_path": "images/GC/000.jpg",
        "region": ["12 40 180 220"],
        "target_txt": "a man on a bicycle",
        "prompt": "Describe the region 12 40 180 220.",
        "target": "a man on a bicycle",
        "instruction_id": "GC/0",
        "instruction_origin": "original",
    },
    {
        "unique_id": "VQA_color_000",
        "task_name": "VQA_color",
        "image_path": "images/VQA_color/000.jpg",
        "question": "What color is the bus?",
        "options": ["red", "blue"],
        "target_txt": "red",
        "prompt": "What color is the bus? Options: red||||blue",
        "target": "red",
        "instruction_id": "VQA_color/g3",
        "instruction_origin": "generated",
    },
    {
        "unique_id": "wikihow_000",
        "task_name": "wikihow_next_step",
        "image_path": "images/wikihow/000.jpg",
        "context": [],
        "meta_data": {"method": "Make Paper Lanterns"},
        "target_txt": "Unfold the paper.",
        "prompt": "Méthode « Make Paper Lanterns »: what comes next?\nStep 1",
        "target": "Unfold the paper.",
        "instruction_id": "wikihow_next_step/1",
        "instruction_origin": "original",
    },
    {
        "unique_id": "text_only_000",
        "task_name": "text_only",
        "image_path": None,
        "prompt": "Answer in one word.",
        "target": "yes",
        "instruction_id": "text_only/0",
        "instruction_origin": "original",
    },
]


def make_run(folder: Path, rows: list[dict[str, Any]] = TRAIN) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", rows)
    return folder


def without_added_nulls(exported: dict[str, Any], original: dict[str, Any]) -> dict[str, Any]:
    """An Arrow row has every column of the table: drop the nulls the original row did not have."""
    assert all(exported[key] is None for key in exported.keys() - original.keys()), exported
    return {key: exported[key] for key in original}


def block_import(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make `names` (and their submodules) fail to import, as when the extra is not installed."""
    for module in [m for m in sys.modules if m.split(".")[0] in names]:
        monkeypatch.delitem(sys.modules, module)
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def test_the_command_offers_exactly_the_formats_of_the_core() -> None:
    assert [f.value for f in ExportFormat] == list(DEFAULT_OUTPUT)


def test_llava_round_trip(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    path, rows = export(run, "llava")
    assert (path, rows) == (run / "train_llava.json", len(TRAIN))
    items = json.loads(path.read_text(encoding="utf-8"))
    assert len(items) == len(TRAIN)
    for item, row in zip(items, read_jsonl(run / "train.jsonl"), strict=True):
        assert item["id"] == row["unique_id"]
        if row["image_path"] is None:  # a text-only row: no image, no <image> token
            assert "image" not in item
            human = row["prompt"]
        else:
            assert item["image"] == row["image_path"]
            human = "<image>\n" + row["prompt"]
        assert item["conversations"] == [
            {"from": "human", "value": human},
            {"from": "gpt", "value": row["target"]},
        ]


def test_llava_of_no_rows_is_an_empty_list(tmp_path: Path) -> None:
    path, rows = export(make_run(tmp_path / "run", []), "llava", tmp_path / "out.json")
    assert rows == 0 and json.loads(path.read_text()) == []


def test_llava_bad_row_names_the_line_and_keeps_the_earlier_file(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    path, _ = export(run, "llava")
    before = path.read_bytes()
    write_jsonl(run / "train.jsonl", [*TRAIN[:2], {**TRAIN[2], "prompt": None}])
    with pytest.raises(InputError) as error:
        export(run, "llava")
    assert str(error.value) == f"{run / 'train.jsonl'}:3: a training row needs a 'prompt' string for LLaVA"
    assert path.read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["train.jsonl", "train_llava.json"]  # no temp file left


def test_llava_item_keeps_text_verbatim() -> None:
    row = {"unique_id": "u", "image_path": "a.jpg", "prompt": "{x} <b>\n", "target": "  t "}
    assert llava_item(row, "train.jsonl", 1)["conversations"][0]["value"] == "<image>\n{x} <b>\n"
    assert llava_item(row, "train.jsonl", 1)["conversations"][1]["value"] == "  t "


@needs_pyarrow
def test_parquet_round_trip(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    run = make_run(tmp_path / "run")
    path, rows = export(run, "parquet")
    assert (path, rows) == (run / "train.parquet", len(TRAIN))
    table = pq.read_table(path)
    assert table.column_names[:9] == list(TRAIN[0])  # first-seen column order
    exported = table.to_pylist()
    assert [without_added_nulls(e, o) for e, o in zip(exported, TRAIN, strict=True)] == TRAIN


@needs_datasets
def test_hf_round_trip(tmp_path: Path) -> None:
    import datasets

    run = make_run(tmp_path / "run")
    path, rows = export(run, "hf", progress=False)
    assert (path, rows) == (run / "train_hf", len(TRAIN))
    dataset = datasets.load_from_disk(str(path))
    assert dataset.num_rows == len(TRAIN)
    exported = dataset.to_list()
    assert [without_added_nulls(e, o) for e, o in zip(exported, TRAIN, strict=True)] == TRAIN
    # a second export replaces the first whole, and leaves no temporary folder behind
    write_jsonl(run / "train.jsonl", TRAIN[:2])
    export(run, "hf", progress=False)
    assert datasets.load_from_disk(str(path)).num_rows == 2
    assert sorted(p.name for p in run.iterdir()) == ["train.jsonl", "train_hf"]


@needs_datasets
def test_hf_refuses_to_replace_what_is_not_an_export(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="already exists and is a folder that is not a dataset export"):
        export(run, "hf", tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@needs_pyarrow
def test_a_column_of_mixed_types_names_its_first_odd_line(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", [{**TRAIN[0], "region": "12 40"}, TRAIN[0], TRAIN[1]])
    with pytest.raises(InputError) as error:
        export(run, "parquet")
    assert str(error.value).startswith(f"{run / 'train.jsonl'}:2: column 'region' does not have one type")
    assert not (run / "train.parquet").exists()


@needs_pyarrow
def test_no_rows_is_an_error_for_arrow_formats(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", [])
    with pytest.raises(InputError, match="no training rows to export"):
        export(run, "parquet")


def test_missing_extra_gives_the_pip_command(
    tmp_path: Path, cli: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    block_import(monkeypatch, "pyarrow", "datasets")
    run = make_run(tmp_path / "run")
    with pytest.raises(MissingExtraError):
        export(run, "parquet")
    for fmt, needs in (("parquet", "pyarrow"), ("hf", "datasets and pyarrow")):
        result = cli("export", run, "--format", fmt)
        assert result.exit_code == 2
        assert (
            result.stderr == f"Error: this export needs {needs} (the hf extra): pip install 'instraug[hf]'\n"
        )
    assert sorted(p.name for p in run.iterdir()) == ["train.jsonl"]


def test_missing_datasets_alone(
    tmp_path: Path, cli: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    if not HAS_PYARROW:
        pytest.skip("pyarrow is not installed (pip install 'instraug[hf]')")
    block_import(monkeypatch, "datasets")
    result = cli("export", make_run(tmp_path / "run"), "-f", "hf")
    assert result.exit_code == 2
    assert result.stderr == (
        "Error: this export needs datasets and pyarrow (the hf extra): pip install 'instraug[hf]'\n"
    )


def test_cli_export(tmp_path: Path, cli: Callable[..., Result]) -> None:
    run = make_run(tmp_path / "run")
    result = cli("export", run, "-f", "llava", "-o", tmp_path / "out" / "llava.json")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == f"{len(TRAIN)} training rows -> {tmp_path / 'out' / 'llava.json'}\n"
    assert len(json.loads((tmp_path / "out" / "llava.json").read_text())) == len(TRAIN)
    assert cli("export", run, "-f", "llava", "-q").stderr == ""
    missing = cli("export", tmp_path / "nowhere", "-f", "llava")
    assert missing.exit_code == 2
    reason = "not a run directory: no train.jsonl (run `instraug expand` first)"
    assert missing.stderr == f"Error: {tmp_path / 'nowhere'}: {reason}\n"
    bad = cli("export", run, "-f", "csv")
    assert bad.exit_code == 2 and "'csv' is not one of 'llava', 'hf', 'parquet'" in bad.stderr

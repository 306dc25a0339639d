"""Raw checkouts: rows as upstream's preprocessors write them (regions as numbers) read exactly as
the built rows upstream's build_dataset.py renders from them."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import pytest
from helpers import STEP_ORDER_TASKS, FixedOrder, pool_row, read_jsonl, write_jsonl
from hypothesis import given
from hypothesis import strategies as st

from instraug.derived import render_fields
from instraug.instances import (
    META_REGION_TASKS,
    REGION_OPTION_TASKS,
    REGION_OUTPUT_TASKS,
    SKIPPED_TASKS,
    build_instance,
    read_instances,
)
from instraug.multiinstruct import import_templates
from instraug.pool import InstructionPool


@pytest.fixture(scope="module")
def raw_dir(shared: Path) -> Path:
    folder = shared / "raw"
    if not (folder / "training_data").is_dir():
        pytest.skip(f"raw MultiInstruct rows not found: {folder / 'training_data'} is absent")
    return folder


@pytest.fixture(scope="module")
def pool(shared: Path) -> InstructionPool:
    rows = import_templates(shared / "templates.json")
    return InstructionPool(("templates.json", i, row) for i, row in enumerate(rows))


def _expected(shared_train: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(row["task_name"], row["unique_id"]): row for row in shared_train}


def _count_matches(
    source: Path, pool: InstructionPool, expected: dict[tuple[str, str], dict[str, Any]]
) -> tuple[int, int, dict[str, int], list[str]]:
    """(prompts reproduced, targets reproduced, skipped rows per task, misses) over `source`."""
    prompts = targets = 0
    skipped: dict[str, int] = {}
    misses: list[str] = []
    for _name, _line, task, row in read_instances(source):
        if row is None:
            skipped[task] = skipped.get(task, 0) + 1
            continue
        stored = expected[(task, row["unique_id"])]
        fields_row = {k: v for k, v in row.items() if k not in ("prompt", "target")}
        orders = itertools.permutations(("next", "previous")) if task in STEP_ORDER_TASKS else [()]
        rendered: set[str] = set()
        for order in orders:
            fields = render_fields(task, fields_row, FixedOrder(tuple(order)))
            template_set = pool.sets_for(task, fields)
            assert template_set is not None, task
            rendered |= {entry.compiled.render(fields) for entry in template_set.all}
        if stored["prompt"] in rendered:
            prompts += 1
        else:
            misses.append(f"prompt {task} {row['unique_id']}")
        if row.get("target", row["target_txt"]) == stored["target"]:
            targets += 1
        else:
            misses.append(f"target {task} {row['unique_id']}: {row['target_txt']!r} != {stored['target']!r}")
    return prompts, targets, skipped, misses


def test_raw_rows_render_the_stored_prompts_and_targets(
    raw_dir: Path, pool: InstructionPool, shared_train: list[dict[str, Any]]
) -> None:
    prompts, targets, skipped, misses = _count_matches(raw_dir, pool, _expected(shared_train))
    assert misses == []
    assert (prompts, targets) == (len(shared_train), len(shared_train)) == (59, 59)
    assert skipped == {"image_generation": 1}


def test_built_rows_give_the_same_counts(
    shared: Path, raw_dir: Path, pool: InstructionPool, shared_train: list[dict[str, Any]]
) -> None:
    expected = _expected(shared_train)
    built = _count_matches(shared / "train.jsonl", pool, expected)
    raw = _count_matches(raw_dir, pool, expected)
    assert built[:2] == raw[:2] == (59, 59)
    assert built[2] == {}  # the built file holds no row of a skipped task


def test_raw_and_built_rows_are_the_same_row(raw_dir: Path, shared_train: list[dict[str, Any]]) -> None:
    """Field by field: the built form of each raw row is the stored row without prompt/target."""
    expected = _expected(shared_train)
    for _name, _line, task, row in read_instances(raw_dir):
        if row is None:
            continue
        stored = {
            k: v for k, v in expected[(task, row["unique_id"])].items() if k not in ("prompt", "target")
        }
        assert row == stored, (task, row["unique_id"])


def test_assemble_on_the_raw_checkout_writes_the_stored_targets(
    cli: Any, shared: Path, raw_dir: Path, shared_train: list[dict[str, Any]], tmp_path: Path
) -> None:
    pool_file, out = tmp_path / "pool.jsonl", tmp_path / "train.jsonl"
    assert cli("import-templates", shared / "templates.json", "-o", pool_file).exit_code == 0
    result = cli("assemble", "-p", pool_file, "-i", raw_dir, "-o", out, "--include-held-out")
    assert result.exit_code == 0, result.stderr
    assert "tasks upstream's build skips (image-code outputs, missing tasks): image_generation (1)" in (
        result.stderr
    )
    expected = _expected(shared_train)
    rows = read_jsonl(out)
    assert len(rows) == 59
    assert [r["target"] for r in rows] == [expected[(r["task_name"], r["unique_id"])]["target"] for r in rows]
    for row in rows:  # the regions of the written row are upstream's strings
        assert all(isinstance(region, str) for region in row.get("region", []))


def test_render_on_the_raw_checkout_reproduces_the_stored_prompts(
    cli: Any, shared: Path, raw_dir: Path, shared_train: list[dict[str, Any]], tmp_path: Path
) -> None:
    pool_file, rendered = tmp_path / "pool.jsonl", tmp_path / "rendered.jsonl"
    assert cli("import-templates", shared / "templates.json", "-o", pool_file).exit_code == 0
    result = cli("render", "-t", pool_file, "-i", raw_dir, "-o", rendered)
    assert result.exit_code == 0, result.stderr
    by_key: dict[tuple[str, str], set[str]] = {}
    for row in read_jsonl(rendered):
        by_key.setdefault((row["task"], row["unique_id"]), set()).add(row["prompt"])
    exact = [r for r in shared_train if r["prompt"] in by_key.get((r["task_name"], r["unique_id"]), set())]
    assert {r["task_name"] for r in shared_train if r not in exact} <= STEP_ORDER_TASKS
    assert ("image_generation", "skipme_1") not in by_key


# --------------------------------------------------------------------------------------------
# The build steps, one by one


def test_numbers_are_written_as_python_str_writes_them() -> None:
    row = build_instance("VG", {"region": [[212.35, 0, 7.0, 1e16]], "target_txt": "x"})
    assert row == {"region": ["212.35 0 7.0 1e+16"], "target_txt": "212.35 0 7.0 1e+16"}


def test_region_output_target_is_the_joined_regions_whatever_it_was() -> None:
    row = build_instance("region_generation", {"region": [[1, 2, 3, 4], [5, 6, 7, 8]], "target_txt": "cat"})
    assert row is not None and row["target_txt"] == "1 2 3 4 5 6 7 8"
    # other tasks keep their target; their regions are converted all the same
    row = build_instance("GC", {"region": [[1, 2, 3, 4]], "target_txt": "a dog"})
    assert row == {"region": ["1 2 3 4"], "target_txt": "a dog"}


def test_region_options_and_meta_regions_are_converted_only_for_their_tasks() -> None:
    raw = {
        "options": [[1, 2, 3, 4], [5, 6, 7, 8]],
        "meta_data": {"object_regions": {"given_region": [[0, 0, 1, 1]]}},
    }
    row = build_instance("select_overlap_least_region", copy.deepcopy(raw))
    assert row is not None
    assert row["options"] == ["1 2 3 4", "5 6 7 8"]
    assert row["meta_data"]["object_regions"]["given_region"] == ["0 0 1 1"]
    untouched = build_instance("VQA", copy.deepcopy(raw))
    assert untouched == raw


def test_test_rows_hold_one_flat_region_per_meta_data_key() -> None:
    row = build_instance(
        "if_region_overlap", {"meta_data": {"object_regions": {"given_region": [3, 4.5, 6, 7]}}}
    )
    assert row == {"meta_data": {"object_regions": {"given_region": ["3 4.5 6 7"]}}}


@pytest.mark.parametrize("task", sorted(SKIPPED_TASKS))
def test_tasks_upstream_skips_are_skipped(task: str) -> None:
    assert build_instance(task, {"text": "a cat", "target_txt": "a cat"}) is None


@pytest.mark.parametrize(
    ("region", "shown"),
    [
        ([[1, "2", 3, 4]], "[1, '2', 3, 4]"),
        ([[True, 2, 3, 4]], "[True, 2, 3, 4]"),
        ([[]], "[]"),
        ([None], "None"),
        ([{"x": 1}], "{'x': 1}"),
    ],
)
def test_a_region_that_is_neither_numbers_nor_a_string_is_an_error_with_its_line(
    cli: Any, tmp_path: Path, region: Any, shown: str
) -> None:
    pool_file, data = tmp_path / "pool.jsonl", tmp_path / "train.jsonl"
    write_jsonl(pool_file, [pool_row("VG", 0, "Find {text}.")])
    write_jsonl(
        data,
        [
            {"task_name": "VG", "unique_id": "a", "text": "x", "region": [[1, 2, 3, 4]], "target_txt": "?"},
            {"task_name": "VG", "unique_id": "b", "text": "y", "region": region, "target_txt": "?"},
        ],
    )
    result = cli("assemble", "-p", pool_file, "-i", data, "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: {data}:2: task VG: region[0]: a region must be a list of numbers or a string, got {shown}\n"
    )
    assert not (tmp_path / "out.jsonl").exists()


def test_regions_that_are_not_a_list_are_an_error(cli: Any, tmp_path: Path) -> None:
    pool_file, data = tmp_path / "pool.jsonl", tmp_path / "train.jsonl"
    write_jsonl(pool_file, [pool_row("VG", 0, "Find {text}.")])
    write_jsonl(data, [{"task_name": "VG", "text": "x", "region": "1 2 3 4", "target_txt": "?"}])
    result = cli("assemble", "-p", pool_file, "-i", data, "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 2
    assert result.stderr == f"Error: {data}:1: task VG: region: expected a list of regions, got '1 2 3 4'\n"


def test_a_task_name_that_is_not_a_string_is_an_error(cli: Any, tmp_path: Path) -> None:
    pool_file, data = tmp_path / "pool.jsonl", tmp_path / "train.jsonl"
    write_jsonl(pool_file, [pool_row("VG", 0, "Find {text}.")])
    write_jsonl(data, [{"task_name": 7, "text": "x", "target_txt": "?"}])
    result = cli("assemble", "-p", pool_file, "-i", data, "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 2
    assert result.stderr == f"Error: {data}:1: task_name must be a string, got 7\n"


# --------------------------------------------------------------------------------------------
# Property: building is a fixed point (a built row reads as itself)

numbers = st.one_of(
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
)
region = st.lists(numbers, min_size=1, max_size=6)
regions = st.lists(region, max_size=4)
TASKS = sorted(REGION_OUTPUT_TASKS | REGION_OPTION_TASKS | META_REGION_TASKS | {"GC", "VQA", "image_caption"})


@given(
    task=st.sampled_from(TASKS),
    region_list=regions,
    options=st.one_of(regions, st.lists(st.text(max_size=8), max_size=4)),
    meta=st.dictionaries(st.sampled_from(["given_region", "subject", "object"]), st.one_of(regions, region)),
    target=st.text(max_size=10),
)
def test_building_a_built_row_changes_nothing(
    task: str, region_list: list[Any], options: list[Any], meta: dict[str, Any], target: str
) -> None:
    if task in REGION_OPTION_TASKS and options and isinstance(options[0], str):
        options = region_list  # region tasks hold regions as options
    raw = {
        "task_name": task,
        "region": region_list,
        "options": options,
        "meta_data": {"object_regions": meta},
        "target_txt": target,
    }
    once = build_instance(task, copy.deepcopy(raw))
    assert once is not None
    twice = build_instance(task, copy.deepcopy(once))
    assert twice == once
    assert all(isinstance(r, str) for r in once["region"])
    if task in REGION_OUTPUT_TASKS:
        assert once["target_txt"] == " ".join(once["region"])
    else:
        assert once["target_txt"] == target

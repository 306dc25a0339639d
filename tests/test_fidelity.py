"""Fidelity to MultiInstruct: the expert templates, converted by instraug, reproduce every stored
prompt of the reference train.jsonl character for character."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest
from helpers import STEP_ORDER_TASKS, FixedOrder, read_jsonl

from instraug.derived import render_fields
from instraug.multiinstruct import import_templates
from instraug.pool import InstructionPool


@pytest.fixture(scope="module")
def pool(shared: Path) -> InstructionPool:
    rows = import_templates(shared / "templates.json")
    return InstructionPool(("templates.json", i, row) for i, row in enumerate(rows))


def prompts_for(pool: InstructionPool, task: str, instance: dict[str, Any], rng: random.Random) -> set[str]:
    raw = {k: v for k, v in instance.items() if k not in ("prompt", "target")}
    fields = render_fields(task, raw, rng)
    template_set = pool.sets_for(task, fields)
    assert template_set is not None, f"no templates for {task}"
    return {entry.compiled.render(fields) for entry in template_set.all}


def test_every_stored_prompt_is_reproduced(pool: InstructionPool, shared_train: list[dict[str, Any]]) -> None:
    reproduced: list[str] = []
    missed: list[str] = []
    for instance in shared_train:
        task = instance["task_name"]
        if task in STEP_ORDER_TASKS:
            orders = list(itertools.permutations(("next", "previous")))
        else:
            orders = [()]
        prompts: set[str] = set()
        for order in orders:
            prompts |= prompts_for(pool, task, instance, FixedOrder(order))
        (reproduced if instance["prompt"] in prompts else missed).append(instance["unique_id"])
    assert missed == []
    assert len(reproduced) == 59


def test_step_order_prompts_need_the_order_upstream_drew(
    pool: InstructionPool, shared_train: list[dict[str, Any]]
) -> None:
    """Only the option order is free: each stored step-order prompt matches exactly one order."""
    lines = [i for i in shared_train if i["task_name"] in STEP_ORDER_TASKS]
    assert lines, "the reference data has step-order lines"
    for instance in lines:
        matches = [
            order
            for order in itertools.permutations(("next", "previous"))
            if instance["prompt"] in prompts_for(pool, instance["task_name"], instance, FixedOrder(order))
        ]
        assert len(matches) == 1, instance["unique_id"]


def test_render_command_reproduces_the_stored_prompts(
    cli: Any, shared: Path, shared_train: list[dict[str, Any]], tmp_path: Path
) -> None:
    """The same through the command line: import-templates, then render every template."""
    pool_file = tmp_path / "pool.jsonl"
    rendered_file = tmp_path / "rendered.jsonl"
    result = cli("import-templates", shared / "templates.json", "-o", pool_file)
    assert result.exit_code == 0, result.stderr
    result = cli("render", "-t", pool_file, "-i", shared / "train.jsonl", "-o", rendered_file)
    assert result.exit_code == 0, result.stderr
    by_id: dict[str, set[str]] = {}
    for row in read_jsonl(rendered_file):
        by_id.setdefault(row["unique_id"], set()).add(row["prompt"])
    exact = [i for i in shared_train if i["prompt"] in by_id.get(i["unique_id"], set())]
    others = [i for i in shared_train if i not in exact]
    assert {i["task_name"] for i in others} <= STEP_ORDER_TASKS
    assert len(exact) + len(others) == 59

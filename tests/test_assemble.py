"""Stage 4: instances x instruction pool -> training rows (seeded epsilon mix, streaming)."""

from __future__ import annotations

import copy
import itertools
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import pool_row, read_jsonl, write_jsonl

from instraug.config import HELD_OUT_TASKS
from instraug.errors import InputError
from instraug.placeholders import CompiledTemplate
from instraug.pool import InstructionPool
from instraug.records import Instruction
from instraug.stages.s4_assemble import AssemblySummary, assemble

VQA_ORIGINAL = [
    '{question}{options_token} {options|join("||||")}',
    "Question: {question}",
    "Answer this: {question}",
]
VQA_GENERATED = [f"Rephrased {i}: {{question}}" for i in range(4)]
CAPTION_ORIGINAL = ["Describe the image.", "What is the caption of the image?"]
DIALOG_IF = ['History: {dial_history|join(" ")} Q: {question}']
DIALOG_ELSE = ["Q: {question}"]

POOL_ROWS = [
    *(pool_row("VQA", i, t) for i, t in enumerate(VQA_ORIGINAL)),
    *(pool_row("VQA", i, t, origin="generated") for i, t in enumerate(VQA_GENERATED)),
    *(pool_row("image_caption", i, t) for i, t in enumerate(CAPTION_ORIGINAL)),
    pool_row("visual_dialog", 0, DIALOG_IF[0], variant="if: len(dial_history) > 0"),
    pool_row("visual_dialog", 1, DIALOG_ELSE[0], variant="else: len(dial_history) > 0"),
    pool_row(
        "visual_dialog", 0, "Gen Q: {question}", origin="generated", variant="else: len(dial_history) > 0"
    ),
]
TEMPLATES = {row["instruction_id"]: row["template"] for row in POOL_ROWS}


def vqa(i: int) -> dict[str, Any]:
    # keys in an unusual order, with fields instraug does not know about
    return {
        "zz_first": {"nested": [1, 2.5, None, "ü"]},
        "unique_id": f"vqa-{i}",
        "task_name": "VQA",
        "question": f"What is {{item}} #{i}?",
        "options": ["yes", "no", f"maybe {i}"],
        "target_txt": "yes",
        "image_path": f"./img/{i}.jpg",
        "aa_last": True,
    }


def caption(i: int) -> dict[str, Any]:
    return {"unique_id": f"cap-{i}", "task_name": "image_caption", "target_txt": f"a cat {i}"}


def dialog(i: int, turns: int) -> dict[str, Any]:
    hist = [{"q": f"q{t}", "a": f"a{t}"} for t in range(turns)]
    return {
        "unique_id": f"dlg-{i}",
        "task_name": "visual_dialog",
        "question": "what color",
        "meta_data": {"dialog_hist": hist},
        "target_txt": "red",
    }


@pytest.fixture(scope="module")
def pool() -> InstructionPool:
    return InstructionPool(
        ("pool.jsonl", i + 1, Instruction.model_validate(r)) for i, r in enumerate(POOL_ROWS)
    )


def rows_of(instances: list[dict[str, Any]]) -> Iterator[tuple[str, int, str, dict[str, Any]]]:
    for line, instance in enumerate(instances, 1):
        yield "instances.jsonl", line, instance["task_name"], copy.deepcopy(instance)


def run(pool: InstructionPool, instances: list[dict[str, Any]], **kwargs: Any) -> list[dict[str, Any]]:
    kwargs.setdefault("seed", 0)
    kwargs.setdefault("epsilon", 0.2)
    return list(assemble(pool, rows_of(instances), **kwargs))


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for a chi-square variable with `df` degrees of freedom (closed forms)."""
    half = x / 2
    if df % 2 == 0:
        return math.exp(-half) * sum(half**i / math.factorial(i) for i in range(df // 2))
    tail = math.erfc(math.sqrt(half))
    return tail + math.exp(-half) * sum(
        half ** (i - 0.5) / math.gamma(i + 0.5) for i in range(1, df // 2 + 1)
    )


def assert_uniform(counts: Counter[str], ids: list[str]) -> None:
    total = sum(counts.values())
    assert set(counts) == set(ids)
    expected = total / len(ids)
    statistic = sum((counts[i] - expected) ** 2 / expected for i in ids)
    assert chi2_sf(statistic, len(ids) - 1) > 1e-4, (counts, statistic)


def test_chi2_sf_matches_known_quantiles() -> None:
    assert chi2_sf(5.991, 2) == pytest.approx(0.05, abs=1e-4)
    assert chi2_sf(7.815, 3) == pytest.approx(0.05, abs=1e-4)
    assert chi2_sf(3.841, 1) == pytest.approx(0.05, abs=1e-4)


# --------------------------------------------------------------------------------------------
# The epsilon mix


N = 3000


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_epsilon_zero_uses_only_generated(pool: InstructionPool, seed: int) -> None:
    out = run(pool, [vqa(i) for i in range(N)], epsilon=0.0, seed=seed)
    assert {row["instruction_origin"] for row in out} == {"generated"}
    assert_uniform(Counter(row["instruction_id"] for row in out), [f"VQA/g{i}" for i in range(4)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_epsilon_one_uses_only_originals(pool: InstructionPool, seed: int) -> None:
    out = run(pool, [vqa(i) for i in range(N)], epsilon=1.0, seed=seed)
    assert {row["instruction_origin"] for row in out} == {"original"}
    assert_uniform(Counter(row["instruction_id"] for row in out), [f"VQA/{i}" for i in range(3)])


@pytest.mark.parametrize(("epsilon", "seed"), [(0.3, 0), (0.3, 1), (0.3, 7), (0.05, 3), (0.9, 4)])
def test_epsilon_is_the_share_of_originals(pool: InstructionPool, epsilon: float, seed: int) -> None:
    out = run(pool, [vqa(i) for i in range(N)], epsilon=epsilon, seed=seed)
    originals = sum(row["instruction_origin"] == "original" for row in out)
    tolerance = 4.5 * math.sqrt(N * epsilon * (1 - epsilon))  # binomial, 4.5 standard deviations
    assert abs(originals - N * epsilon) <= tolerance, (originals, N * epsilon, tolerance)
    by_id = Counter(row["instruction_id"] for row in out)
    assert_uniform(Counter({k: v for k, v in by_id.items() if "/g" not in k}), [f"VQA/{i}" for i in range(3)])
    assert_uniform(Counter({k: v for k, v in by_id.items() if "/g" in k}), [f"VQA/g{i}" for i in range(4)])


def test_task_without_generated_rows_falls_back_to_originals(pool: InstructionPool) -> None:
    out = run(pool, [caption(i) for i in range(600)], epsilon=0.0)
    assert {row["instruction_origin"] for row in out} == {"original"}
    assert_uniform(Counter(row["instruction_id"] for row in out), ["image_caption/0", "image_caption/1"])


def test_task_with_only_generated_rows_uses_them_even_at_epsilon_one() -> None:
    only = InstructionPool(
        [("p", 1, Instruction.model_validate(pool_row("VQA", 0, "G {question}", origin="generated")))]
    )
    out = run(only, [vqa(i) for i in range(20)], epsilon=1.0)
    assert {row["instruction_id"] for row in out} == {"VQA/g0"}


# --------------------------------------------------------------------------------------------
# Seeds


def test_same_seed_same_rows(pool: InstructionPool) -> None:
    instances = [vqa(i) for i in range(300)] + [caption(i) for i in range(50)]
    assert run(pool, instances, seed=11, epsilon=0.4) == run(pool, instances, seed=11, epsilon=0.4)


def test_different_seed_different_draws(pool: InstructionPool) -> None:
    instances = [vqa(i) for i in range(300)]
    first = [row["instruction_id"] for row in run(pool, instances, seed=1, epsilon=0.4)]
    second = [row["instruction_id"] for row in run(pool, instances, seed=2, epsilon=0.4)]
    assert first != second
    assert sum(a != b for a, b in zip(first, second, strict=True)) > 100  # not one changed draw


def test_cli_output_is_byte_identical_for_a_seed(cli: Any, tmp_path: Path) -> None:
    pool_file = write_jsonl(tmp_path / "pool.jsonl", POOL_ROWS)
    instances = write_jsonl(
        tmp_path / "train.jsonl", [vqa(i) for i in range(200)] + [caption(i) for i in range(20)]
    )
    outputs = []
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        out = tmp_path / f"{name}.jsonl"
        result = cli(
            "assemble", "-p", pool_file, "-i", instances, "-o", out, "--seed", seed, "--epsilon", "0.5"
        )
        assert result.exit_code == 0, result.stderr
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]
    assert len(outputs[0].splitlines()) == 220


# --------------------------------------------------------------------------------------------
# Held-out tasks


def test_held_out_tasks_are_excluded_and_counted(pool: InstructionPool) -> None:
    summary = AssemblySummary()
    instances = [vqa(0), dialog(0, 2), caption(0), dialog(1, 0), vqa(1)]
    out = run(pool, instances, held_out=HELD_OUT_TASKS, summary=summary)
    assert [row["unique_id"] for row in out] == ["vqa-0", "cap-0", "vqa-1"]
    assert summary.held_out == Counter({"visual_dialog": 2})
    assert summary.written == 3
    assert summary.by_task == Counter({"VQA": 2, "image_caption": 1})
    assert sum(summary.by_origin.values()) == 3


def test_cli_reports_held_out_tasks(cli: Any, tmp_path: Path) -> None:
    pool_file = write_jsonl(tmp_path / "pool.jsonl", POOL_ROWS)
    instances = write_jsonl(tmp_path / "train.jsonl", [vqa(0), dialog(0, 2), dialog(1, 0), caption(0)])
    out = tmp_path / "out.jsonl"
    result = cli("assemble", "-p", pool_file, "-i", instances, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert [row["task_name"] for row in read_jsonl(out)] == ["VQA", "image_caption"]
    assert "held-out tasks skipped: visual_dialog (2)" in result.stderr.splitlines()
    result = cli("assemble", "-p", pool_file, "-i", instances, "-o", out, "--include-held-out")
    assert result.exit_code == 0, result.stderr
    assert [row["task_name"] for row in read_jsonl(out)] == [
        "VQA",
        "visual_dialog",
        "visual_dialog",
        "image_caption",
    ]
    assert "held-out" not in result.stderr


def test_variant_is_chosen_by_its_condition(pool: InstructionPool) -> None:
    out = run(pool, [dialog(i, i % 2 * 2) for i in range(40)], epsilon=0.5)
    for i, row in enumerate(out):
        if i % 2:
            assert row["instruction_id"] == "visual_dialog/0"
            assert row["prompt"] == "History: q0, a0; q1, a1; Q: what color"
        else:
            assert row["instruction_id"] in {"visual_dialog/1", "visual_dialog/g0"}
            assert row["prompt"] in {"Q: what color", "Gen Q: what color"}


# --------------------------------------------------------------------------------------------
# The rows written


ADDED = ["prompt", "target", "instruction_id", "instruction_origin"]


def test_rows_keep_every_field_in_order_and_add_four(pool: InstructionPool) -> None:
    instances = [vqa(i) for i in range(50)] + [caption(i) for i in range(5)]
    for raw, row in zip(instances, run(pool, instances, epsilon=0.5), strict=True):
        assert list(row) == list(raw) + ADDED
        assert {k: row[k] for k in raw} == raw
        assert row["target"] == raw["target_txt"]
        template = CompiledTemplate(TEMPLATES[row["instruction_id"]], {"options_token": "\n\n[Options]:"})
        assert row["prompt"] == template.render(raw)
        assert row["instruction_origin"] == ("generated" if "/g" in row["instruction_id"] else "original")


def test_built_rows_keep_their_prompt_and_target_slots(pool: InstructionPool) -> None:
    built = {**vqa(0), "prompt": "old prompt", "target": "old target", "zz_after": 1}
    (row,) = run(pool, [built], epsilon=1.0)
    assert list(row) == list(built) + ["instruction_id", "instruction_origin"]
    assert row["prompt"] != "old prompt"
    assert row["target"] == "old target"


def test_prompt_shows_options_in_the_order_the_row_stores(pool: InstructionPool) -> None:
    instances = [vqa(i) for i in range(200)]
    out = run(pool, instances, epsilon=1.0, seed=3, shuffle_options=True)
    orders = set()
    for raw, row in zip(instances, out, strict=True):
        assert sorted(row["options"]) == sorted(raw["options"])
        orders.add(tuple(row["options"]))
        if row["instruction_id"] == "VQA/0":
            assert row["prompt"].endswith("[Options]: " + "||||".join(row["options"]))
    assert len(orders) > 3  # the options were really shuffled


def test_missing_target_is_an_error_at_its_line(pool: InstructionPool) -> None:
    bad = vqa(1)
    del bad["target_txt"]
    with pytest.raises(InputError) as info:
        run(pool, [vqa(0), bad])
    assert str(info.value) == "instances.jsonl:2: missing field 'target_txt' (the training target)"


def test_assembly_streams(pool: InstructionPool) -> None:
    def endless() -> Iterator[tuple[str, int, str, dict[str, Any]]]:
        for i in itertools.count():
            yield "stream", i + 1, "VQA", vqa(i)

    rows = assemble(pool, endless(), epsilon=0.5, seed=0)
    first = list(itertools.islice(rows, 5))
    assert [row["unique_id"] for row in first] == [f"vqa-{i}" for i in range(5)]


def test_derived_values_do_not_leak_into_the_row() -> None:
    task = "visual_object_region"
    template = 'Subject in {region}, relation "{meta_data.relation}"{options_str}'
    pool = InstructionPool([("p", 1, Instruction.model_validate(pool_row(task, 0, template)))])
    raw = {
        "task_name": task,
        "region": ["<raw>"],
        "options": ["x", "y"],
        "meta_data": {"relation": "on", "object_regions": {"subject": ["<s1>", "<s2>"]}},
        "target_txt": "t",
    }
    (row,) = run(pool, [raw], epsilon=1.0)
    assert row["prompt"] == 'Subject in <s1>||||<s2>, relation "on"\n\n[Options]: x||||y'
    assert list(row) == list(raw) + ADDED
    assert row["region"] == ["<raw>"]

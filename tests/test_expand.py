"""`instraug expand` end to end on the demo checkout, against the scripted OpenAI-compatible server."""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from fake_openai_server import Reply, ScriptedOpenAIServer, chat_body
from helpers import read_jsonl
from typer.testing import CliRunner, Result

from instraug.cli import app
from instraug.derived import CONSTANTS, render_fields
from instraug.funnel import REASONS
from instraug.instances import read_instances
from instraug.placeholders import CompiledTemplate, RenderError, mask_placeholders, placeholders_of

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "multiinstruct-mini"
HELD_OUT = "visual_nli"
KEY_ENV = "INSTRAUG_TEST_EXPAND_KEY"
OUTPUTS = (
    "templates.jsonl",
    "meta_prompts.jsonl",
    "generations.jsonl",
    "instructions.jsonl",
    "train.jsonl",
    "report.json",
)
STAGES = ("templates", "meta_prompts", "generations", "instructions", "train")

# --------------------------------------------------------------------------------------------
# The scripted LLM: a chatty model that sometimes answers junk

PREFIXES = ["Please", "Kindly", "Now", "Carefully", "Simply", "Quickly", "Go ahead and", "Try to", "Next,"]
TOKEN = re.compile(r"\{[A-Z]{1,2}\}")


def respond(body: dict[str, Any]) -> Reply:
    """Deterministic in the request; a few kinds of junk next to plausible rewrites."""
    messages = body["messages"]
    if len(messages) == 1:  # the bootstrap request asks for a list of rewriting strategies
        return Reply(
            body=chat_body(
                [
                    "Sure! Here are some ways to rewrite a sentence:\n"
                    "1. Use different words with the same meaning.\n"
                    "2. Change the order of the clauses.\n"
                    "3. Say the same thing in fewer words."
                ]
            )
        )
    shown = messages[-1]["content"]
    digest = hashlib.sha256(json.dumps([messages, body.get("temperature"), body.get("seed")]).encode())
    h = int(digest.hexdigest(), 16)
    kind = h % 8
    if kind == 0:
        text = "Sure!"  # nothing but chat
    elif kind == 1:
        text = "The answer is blue."  # an answer instead of an instruction
    elif kind == 2:
        text = f"{shown} Also consider {{Z}}."  # an invented mask token
    elif kind == 3 and TOKEN.search(shown):
        text = "Please " + TOKEN.sub("it", shown)  # the placeholders dropped
    else:
        prefix = PREFIXES[(h // 8) % len(PREFIXES)]
        text = f'Sure! Here is the rewritten instruction: "{prefix} {shown[0].lower()}{shown[1:]}"'
    return Reply(body=chat_body([text]))


def write_config(path: Path, base_url: str, **assembly: Any) -> Path:
    config = {
        "llm": {"backend": "openai", "base_url": base_url, "model": "fake", "api_key_env": KEY_ENV},
        "sampling": {"temperatures": [0.7, 1.0]},
        "meta_prompts": {"count": 4, "bootstrap_count": 3},
        "expansion": {"factor": 2, "max_attempts": 6},
        "assembly": {"held_out_tasks": [HELD_OUT], "epsilon": 0.3, "seed": 0, **assembly},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def expand(out: Path, config: Path, *extra: str | Path) -> Result:
    result = CliRunner().invoke(
        app,
        ["expand", str(EXAMPLE), "-c", str(config), "-o", str(out), *map(str, extra)],
        env={KEY_ENV: "sk-test-expand", "INSTRAUG_DEBUG": None},
    )
    assert result.exit_code == 0, result.stderr + repr(result.exception)
    return result


@dataclass
class FirstRun:
    out: Path
    config: Path
    server: ScriptedOpenAIServer
    requests: int  # what the server received during the first run

    def rows(self, name: str) -> list[dict[str, Any]]:
        return read_jsonl(self.out / name)

    @property
    def report(self) -> dict[str, Any]:
        return json.loads((self.out / "report.json").read_text())


@pytest.fixture(scope="module")
def server() -> Iterator[ScriptedOpenAIServer]:
    with ScriptedOpenAIServer() as srv:
        srv.responder = respond
        yield srv


@pytest.fixture(scope="module")
def first(server: ScriptedOpenAIServer, tmp_path_factory: pytest.TempPathFactory) -> FirstRun:
    base = tmp_path_factory.mktemp("expand")
    config = write_config(base / "config.yaml", server.url)
    expand(base / "run", config, "-q")
    return FirstRun(base / "run", config, server, len(server.requests))


def copy_run(first: FirstRun, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(first.out, out)
    return out


def instances_by_task() -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for _file, _line, task, instance in read_instances(EXAMPLE):
        if instance is not None:
            found.setdefault(task, []).append(instance)
    return found


# --------------------------------------------------------------------------------------------
# The first run


def test_every_output_file_exists(first: FirstRun) -> None:
    for name in OUTPUTS:
        assert (first.out / name).is_file(), name
        assert (first.out / name).stat().st_size > 0, name
    assert first.report["stages"] == dict.fromkeys(STAGES, "ran")
    assert first.requests > 0
    sent_keys = {v for h in first.server.headers for k, v in h.items() if k.lower() == "authorization"}
    assert sent_keys == {"Bearer sk-test-expand"}  # the key came from llm.api_key_env


def test_the_responder_produced_both_keeps_and_rejections(first: FirstRun) -> None:
    """The premise of the checks below: the run saw good rewrites and junk."""
    kept = Counter(row["kept"] for row in first.rows("generations.jsonl"))
    assert kept[True] > 0 and kept[False] > 0


def test_instructions_are_the_originals_plus_exactly_the_kept_generations(first: FirstRun) -> None:
    templates = first.rows("templates.jsonl")
    pool = first.rows("instructions.jsonl")
    originals = [row for row in pool if row["origin"] == "original"]
    generated = [row for row in pool if row["origin"] == "generated"]
    assert len(originals) + len(generated) == len(pool)
    assert [(r["instruction_id"], r["task"], r["template"]) for r in originals] == [
        (t["instruction_id"], t["task"], t["template"]) for t in templates
    ]
    kept = [row for row in first.rows("generations.jsonl") if row["kept"]]
    assert len(generated) == len(kept)
    assert [r["request_hash"] for r in generated] == [g["request_hash"] for g in kept]
    for row, gen in zip(generated, kept, strict=True):
        assert (row["task"], row["root_id"], row["parent_id"]) == (
            gen["task"],
            gen["root_id"],
            gen["parent_id"],
        )
        assert row["template"] == gen["template"]
        assert sorted(placeholders_of(row["template"])) == sorted(placeholders_of(gen["root_template"]))
    assert len({row["instruction_id"] for row in pool}) == len(pool)


def test_held_out_task_is_never_rephrased(first: FirstRun) -> None:
    held_out = [t["template"] for t in first.rows("templates.jsonl") if t["task"] == HELD_OUT]
    assert len(held_out) == 5  # the example has five visual_nli templates
    pool = first.rows("instructions.jsonl")
    assert not [row for row in pool if row["task"] == HELD_OUT and row["origin"] != "original"]
    assert not [row for row in first.rows("generations.jsonl") if row["task"] == HELD_OUT]
    shown = {body["messages"][-1]["content"] for body in first.server.requests[: first.requests]}
    assert not shown & {mask_placeholders(t).text for t in held_out}


def test_every_rejected_generation_has_a_reason(first: FirstRun) -> None:
    for row in first.rows("generations.jsonl"):
        if row["kept"]:
            assert row["reasons"] == []
        else:
            assert len(row["reasons"]) >= 1, row


def test_every_kept_template_renders_on_the_instances_of_its_task(first: FirstRun) -> None:
    instances = instances_by_task()
    originals = {row["instruction_id"]: row["template"] for row in first.rows("templates.jsonl")}
    generated = [row for row in first.rows("instructions.jsonl") if row["origin"] == "generated"]
    assert generated
    for row in generated:
        compiled = CompiledTemplate(row["template"], CONSTANTS)
        root = CompiledTemplate(originals[row["root_id"]], CONSTANTS)
        rendered = 0
        for instance in instances[row["task"]]:
            fields = render_fields(row["task"], instance, random.Random(0))
            try:
                root.render(fields)
            except RenderError:
                continue  # an instance the original cannot serve either
            text = compiled.render(fields)
            assert not TOKEN.search(text), text  # no mask token left behind
            rendered += 1
        assert rendered > 0, row["instruction_id"]


def test_report_funnel_agrees_with_generations(first: FirstRun) -> None:
    rows = first.rows("generations.jsonl")
    report = first.report

    def counts(of: list[dict[str, Any]]) -> dict[str, Any]:
        first_reason = Counter(min(r["reasons"], key=REASONS.index) for r in of if r["reasons"])
        return {
            "generated": len(of),
            "kept": sum(r["kept"] for r in of),
            "removed": {r: first_reason[r] for r in REASONS if first_reason[r]},
            "flagged": {r: n for r in REASONS if (n := sum(r in x["reasons"] for x in of))},
        }

    assert {k: v for k, v in report["funnel"].items() if k != "render_skipped"} == counts(rows)
    for task, entry in report["funnel_by_task"].items():
        of_task = [row for row in rows if row["task"] == task]
        assert {k: v for k, v in entry.items() if k != "render_skipped"} == counts(of_task)
    assert set(report["funnel_by_task"]) == {row["task"] for row in rows}
    for task, entry in report["achieved_factor"].items():
        of_task = [row for row in rows if row["task"] == task]
        roots = {row["root_id"] for row in of_task}
        assert entry["templates_augmented"] == len(roots)
        assert entry["kept"] == sum(row["kept"] for row in of_task)
        assert entry["short"] == (entry["kept"] < 2 * len(roots))
    assert report["assembly"]["written"] == len(first.rows("train.jsonl"))


def test_the_pool_holds_exactly_what_the_funnel_kept_per_task(first: FirstRun) -> None:
    """One verdict per generation: the funnel's kept count is the pool's generated rows, per task."""
    pool = Counter(row["task"] for row in first.rows("instructions.jsonl") if row["origin"] == "generated")
    kept = {task: entry["kept"] for task, entry in first.report["funnel_by_task"].items() if entry["kept"]}
    assert kept and dict(pool) == kept
    rejected = Counter(row["task"] for row in first.rows("rejected.jsonl"))
    assert dict(rejected) == {
        task: entry["generated"] - entry["kept"]
        for task, entry in first.report["funnel_by_task"].items()
        if entry["generated"] > entry["kept"]
    }


def test_rows_of_tasks_upstreams_build_skips_are_counted(first: FirstRun) -> None:
    skipped = first.report["assembly"]["skipped"]
    raw = Counter(task for _f, _l, task, row in read_instances(EXAMPLE) if row is None)
    assert skipped == dict(raw) == {"image_generation": 2}
    assert not [row for row in first.rows("train.jsonl") if row["task_name"] == "image_generation"]


def test_the_printed_summary_is_the_report_funnel(first: FirstRun, tmp_path: Path) -> None:
    out = copy_run(first, tmp_path)
    result = expand(out, first.config)
    funnel = first.report["funnel"]
    assert f"generated {funnel['generated']}, kept {funnel['kept']}" in result.stderr
    for reason, flagged in funnel["flagged"].items():
        removed = funnel["removed"].get(reason, 0)
        assert f"  removed by {reason}: {removed} (flagged {flagged})" in result.stderr


def test_held_out_instances_are_absent_from_train(first: FirstRun) -> None:
    train = first.rows("train.jsonl")
    expected = [
        i["unique_id"] for task, found in instances_by_task().items() if task != HELD_OUT for i in found
    ]
    assert sorted(row["unique_id"] for row in train) == sorted(expected)
    assert not [row for row in train if row["task_name"] == HELD_OUT]
    pool = {row["instruction_id"]: row for row in first.rows("instructions.jsonl")}
    for row in train:
        assert pool[row["instruction_id"]]["task"] == row["task_name"]
        assert row["prompt"] and row["target"] == row["target_txt"]


# --------------------------------------------------------------------------------------------
# Re-runs


def test_an_identical_second_run_is_a_no_op(first: FirstRun, tmp_path: Path) -> None:
    out = copy_run(first, tmp_path)
    before = {name: (out / name).read_bytes() for name in OUTPUTS if name != "report.json"}
    sent = len(first.server.requests)
    result = expand(out, first.config)
    assert len(first.server.requests) == sent
    assert json.loads((out / "report.json").read_text())["stages"] == dict.fromkeys(STAGES, "up to date")
    for stage in STAGES:
        assert f"{stage}: up to date" in result.stderr
    assert {name: (out / name).read_bytes() for name in before} == before


def test_changing_only_the_assembly_seed_reruns_only_train(first: FirstRun, tmp_path: Path) -> None:
    out = copy_run(first, tmp_path)
    pool = (out / "instructions.jsonl").read_bytes()
    sent = len(first.server.requests)
    expand(out, write_config(tmp_path / "seed1.yaml", first.server.url, seed=1), "-q")
    assert len(first.server.requests) == sent
    stages = json.loads((out / "report.json").read_text())["stages"]
    assert stages == {**dict.fromkeys(STAGES, "up to date"), "train": "ran"}
    assert (out / "instructions.jsonl").read_bytes() == pool


def test_offline_from_the_cache_reproduces_the_run_with_the_server_stopped(
    first: FirstRun, tmp_path: Path
) -> None:
    with ScriptedOpenAIServer() as stopped:
        url = stopped.url  # nothing listens at this address once the block ends
    cache = tmp_path / "cache.sqlite"
    shutil.copy(first.out / "cache.sqlite", cache)
    sent = len(first.server.requests)
    out = tmp_path / "offline"
    expand(out, write_config(tmp_path / "offline.yaml", url), "--offline", "--cache", cache, "-q")
    for name in ("train.jsonl", "instructions.jsonl", "generations.jsonl", "meta_prompts.jsonl"):
        assert (out / name).read_bytes() == (first.out / name).read_bytes(), name
    assert len(first.server.requests) == sent
    assert not (out / "cache.sqlite").exists()


def test_offline_without_the_answers_is_an_error(first: FirstRun, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["expand", str(EXAMPLE), "-c", str(first.config), "-o", str(tmp_path / "o"), "--offline", "-q"],
        env={KEY_ENV: "sk-test-expand", "INSTRAUG_DEBUG": None},
    )
    assert result.exit_code == 3
    assert result.stderr.startswith("Error: offline: a request is not in ")


def test_a_rerun_retries_the_requests_that_failed(tmp_path: Path) -> None:
    failing = {"on": True}

    def flaky(body: dict[str, Any]) -> Reply:
        digest = hashlib.sha256(json.dumps(body["messages"]).encode()).digest()
        if failing["on"] and len(body["messages"]) > 1 and digest[0] % 4 == 0:
            return Reply(status=500, body={"error": {"message": "overloaded"}})
        return respond(body)

    with ScriptedOpenAIServer() as srv:
        srv.responder = flaky
        config = write_config(tmp_path / "config.yaml", srv.url)
        settings = yaml.safe_load(config.read_text())
        settings["llm"].update(max_retries=0, retry_initial_wait=0)
        config.write_text(yaml.safe_dump(settings))
        args = ["expand", str(EXAMPLE), "-c", str(config), "-o", str(tmp_path / "run"), "-q"]
        env = {KEY_ENV: "sk-test-expand", "INSTRAUG_DEBUG": None}
        first = CliRunner().invoke(app, args, env=env)
        assert first.exit_code == 4  # finished, with failure rows
        failed = [
            r for r in read_jsonl(tmp_path / "run" / "generations.jsonl") if "failed_request" in r["reasons"]
        ]
        assert failed
        failing["on"] = False
        sent = len(srv.requests)
        again = CliRunner().invoke(app, args, env=env)
    assert again.exit_code == 0
    assert len(srv.requests) > sent  # the failed requests were sent again
    rows = read_jsonl(tmp_path / "run" / "generations.jsonl")
    assert not [r for r in rows if "failed_request" in r["reasons"]]

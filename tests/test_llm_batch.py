"""Batch mode (`llm.mode: batch`) and batch files (`--export-batch`, `--import-batch`) against the test
server's Files and Batches APIs: the same answers as the online path, byte for byte; a run killed
while its batch is in progress collects that batch instead of submitting it again; expired and
failed items go again as configured; batch files round-trip through an offline engine."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from fake_openai_server import EXPIRED_MESSAGE, Reply, ScriptedOpenAIServer, chat_body
from helpers import read_jsonl, write_jsonl
from llm_fixtures import (  # noqa: F401 - fixtures are found by their names
    TEST_KEY,
    TEST_KEY_ENV,
    api_key_fixture,
    cache_file_fixture,
    chat,
    child_env,
    fake_server_fixture,
    openai_config,
    prompts,
)
from processes import Spawner, spawn_fixture  # noqa: F401 - the spawn fixture is found by its name
from typer.testing import CliRunner, Result

from instraug.cli import app
from instraug.errors import LLMError
from instraug.llm import BatchRunStats, Completion, ledger_path, open_llm

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "multiinstruct-mini"


def rephraser(body: dict[str, Any]) -> Reply:
    """A deterministic model: about 60% of requests get a plausible rewrite of the instruction they
    carry, the rest an answer instead of a rewrite, so the scheduler needs several rounds."""
    last = body["messages"][-1]["content"]
    instruction = last.rsplit("Instruction:", 1)[-1].replace("Rewritten instruction:", "").strip()
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    if int(digest[:2], 16) < 150:
        text = f"Please {instruction[:1].lower()}{instruction[1:]} Variant {int(digest[2:6], 16)}."
    else:
        text = "Sure! The image shows a cat sitting on a mat."
    return Reply(body=chat_body([text], prompt_tokens=len(last.split())))


@pytest.fixture
def server(fake_server: ScriptedOpenAIServer) -> ScriptedOpenAIServer:
    fake_server.responder = rephraser
    return fake_server


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    """The example's templates and two meta-prompts."""
    templates, metas = tmp_path / "templates.jsonl", tmp_path / "meta_prompts.jsonl"
    source = EXAMPLE / "instruction_templates.py"
    assert CliRunner().invoke(app, ["import-templates", str(source), "-o", str(templates)]).exit_code == 0
    write_jsonl(
        metas,
        [
            {"id": "direct", "text": "Rewrite the instruction.", "origin": "direct"},
            {"id": "formal", "text": "Rewrite the instruction in a formal register.", "origin": "curated"},
        ],
    )
    return templates, metas


def config_file(path: Path, url: str, **llm: Any) -> Path:
    settings = {
        "llm": {
            "backend": "openai",
            "base_url": url,
            "model": "fake-model",
            "api_key_env": TEST_KEY_ENV,
            "max_retries": 1,
            "retry_initial_wait": 0,
            "retry_max_wait": 0,
            "batch_poll_interval": 0.02,
            **llm,
        },
        "expansion": {"factor": 2, "max_attempts": 4, "iterations": 2},
    }
    path.write_text(yaml.safe_dump(settings))
    return path


def generate(inputs: tuple[Path, Path], config: Path, cache: Path, out: Path, *extra: str | Path) -> Result:
    templates, metas = inputs
    args = ["generate", "-t", templates, "-m", metas, "-c", config, "-o", out, "--cache", cache, *extra]
    return CliRunner().invoke(app, [str(a) for a in args], env={"INSTRAUG_DEBUG": None})


def cache_rows(path: Path) -> dict[str, tuple[Any, ...]]:
    """key -> everything a cache row holds but its date."""
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT key, model, request, text, finish_reason, prompt_tokens, completion_tokens FROM responses"
        ).fetchall()
    return {key: tuple(rest) for key, *rest in rows}


def canonical(bodies: list[dict[str, Any]]) -> Counter[str]:
    return Counter(json.dumps(body, sort_keys=True) for body in bodies)


def run(config: Any, cache: Path | None, requests: list[Any]) -> list[Completion]:
    with open_llm(config, cache_path=cache, quiet=True) as llm:
        return sorted(llm.run(requests), key=lambda c: c.request.tag)


# --------------------------------------------------------------------------------------------
# The round trip: online and batch give the same bytes


def test_a_batch_run_writes_the_bytes_and_cache_of_an_online_run(
    server: ScriptedOpenAIServer, inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    online = generate(
        inputs,
        config_file(tmp_path / "online.yaml", server.url),
        tmp_path / "on.sqlite",
        tmp_path / "on.jsonl",
    )
    assert online.exit_code == 0, online.output
    online_bodies = list(server.requests)

    batch_config = config_file(tmp_path / "batch.yaml", server.url, mode="batch")
    batch = generate(inputs, batch_config, tmp_path / "b.sqlite", tmp_path / "b.jsonl")
    assert batch.exit_code == 0, batch.output
    assert len(server.requests) == len(online_bodies)  # nothing went online

    assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "on.jsonl").read_bytes()
    assert cache_rows(tmp_path / "b.sqlite") == cache_rows(tmp_path / "on.sqlite")
    # every batch line carried the body the online path sent, and each request went in one batch
    assert canonical(server.batches.answered) == canonical(online_bodies)
    submitted = [key for ids in server.batches.submitted_ids() for key in ids]
    assert sorted(submitted) == sorted(row["request_hash"] for row in read_jsonl(tmp_path / "b.jsonl"))
    rounds = server.batches.count("batches.create")
    assert rounds >= 3  # several rounds and a second iteration: each round is one batch
    assert server.batches.count("files.create") == rounds
    assert f"{rounds} batches" in batch.stderr
    assert json.loads(ledger_path(tmp_path / "b.sqlite").read_text()) == {"batches": []}
    assert TEST_KEY not in batch.stderr + ledger_path(tmp_path / "b.sqlite").read_text()


def test_batch_answers_cost_the_discounted_price(server: ScriptedOpenAIServer, cache_file: Path) -> None:
    prices = {"price_per_1k_input": 2.0, "price_per_1k_output": 4.0}
    config = openai_config(server, mode="batch", batch_poll_interval=0.01, batch_discount=0.5, **prices)
    with open_llm(config, cache_path=cache_file, quiet=True) as llm:
        answers = list(llm.run(prompts(6)))
        stats = llm.stats
    assert isinstance(stats, BatchRunStats) and all(a.error is None for a in answers)
    full = stats.prompt_tokens / 1000 * 2.0 + stats.completion_tokens / 1000 * 4.0
    assert stats.prompt_tokens > 0 and stats.cost == pytest.approx(full * 0.5)


def test_estimate_prices_batch_rates(tmp_path: Path) -> None:
    def cost(mode: str) -> float:
        config = config_file(
            tmp_path / f"{mode}.yaml", "http://127.0.0.1:9/v1", mode=mode, price_per_1k_input=1.0
        )
        args = ["expand", str(EXAMPLE), "-o", str(tmp_path / mode), "-c", str(config), "--estimate"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert f"mode: {mode}\n" in result.stdout
        return float(re.search(r"cost_max_usd: ([\d.]+)", result.stdout)[1])  # type: ignore[index]

    assert cost("batch") == pytest.approx(cost("online") * 0.5, abs=1e-4)


def test_a_round_larger_than_batch_max_requests_goes_in_several_batches(
    server: ScriptedOpenAIServer, cache_file: Path
) -> None:
    config = openai_config(server, mode="batch", batch_poll_interval=0.01, batch_max_requests=3)
    answers = run(config, cache_file, prompts(8))
    assert [len(ids) for ids in server.batches.submitted_ids()] == [3, 3, 2]
    online = run(openai_config(server), cache_file.with_name("online.sqlite"), prompts(8))
    assert [(a.key, a.text) for a in answers] == [(a.key, a.text) for a in online]


# --------------------------------------------------------------------------------------------
# kill -9 while a batch is in progress


def test_kill_9_during_a_batch_then_the_rerun_collects_it_instead_of_resubmitting(
    server: ScriptedOpenAIServer, inputs: tuple[Path, Path], tmp_path: Path, spawn: Spawner
) -> None:
    config = config_file(tmp_path / "batch.yaml", server.url, mode="batch")
    cache, out = tmp_path / "run.sqlite", tmp_path / "run.jsonl"
    ledger = ledger_path(cache)
    templates, metas = inputs
    command = [sys.executable, "-m", "instraug", "generate", "-t", str(templates), "-m", str(metas)]
    command += ["-c", str(config), "-o", str(out), "--cache", str(cache), "-q"]

    server.batches.hold.clear()  # the first batch stays in_progress
    victim = spawn(command, env=child_env())
    deadline = time.monotonic() + 60
    while not (
        server.batches.batches.get("batch_1")
        and server.batches.batches["batch_1"].status == "in_progress"
        and ledger.exists()
        and "batch_1" in ledger.read_text()
    ):
        assert victim.poll() is None, "the run ended before its batch was in progress"
        assert time.monotonic() < deadline, "no batch was submitted"
        time.sleep(0.01)
    os.killpg(victim.pid, signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    recorded = json.loads(ledger.read_text())["batches"]
    assert [(e["batch_id"], e["requests"]) for e in recorded] == [("batch_1", len(recorded[0]["keys"]))]
    first_round = set(recorded[0]["keys"])

    server.batches.hold.set()
    rerun = spawn([*command[:-1]], env=child_env(), stderr=open(tmp_path / "rerun.err", "w"))  # noqa: SIM115
    assert rerun.wait(timeout=120) == 0, (tmp_path / "rerun.err").read_text()
    assert "batch batch_1 (" in (tmp_path / "rerun.err").read_text()
    assert json.loads(ledger.read_text()) == {"batches": []}

    submitted = server.batches.submitted_ids()
    assert set(submitted[0]) == first_round
    assert not any(first_round & set(ids) for ids in submitted[1:])  # never submitted again
    every = [key for ids in submitted for key in ids]
    assert len(every) == len(set(every))
    assert server.batches.count("files.create") == server.batches.count("batches.create") == len(submitted)
    assert not server.requests  # and nothing went online

    # the answers are those of an online run that was never interrupted
    online = generate(
        inputs, config_file(tmp_path / "on.yaml", server.url), tmp_path / "on.sqlite", tmp_path / "on.jsonl"
    )
    assert online.exit_code == 0, online.output
    assert out.read_bytes() == (tmp_path / "on.jsonl").read_bytes()


def test_a_batch_created_but_not_recorded_is_found_by_its_tag(
    server: ScriptedOpenAIServer, cache_file: Path
) -> None:
    config = openai_config(server, mode="batch", batch_poll_interval=0.01)
    requests = prompts(4)
    run(config, cache_file, requests[:1])  # a session writes the ledger file beside the cache
    ledger = ledger_path(cache_file)
    # a run killed between creating a batch and recording its id left this entry:
    with open_llm(config, cache_path=None, quiet=True) as llm:
        from instraug.llm.batch_files import input_line

        keys = [llm.backend.key_for(r) for r in requests[1:]]
        data = b"".join(input_line(llm.backend, r) for r in requests[1:])
    import openai

    client = openai.OpenAI(base_url=server.url, api_key="x")
    upload = client.files.create(file=("in.jsonl", data), purpose="batch")
    client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"instraug_batch": "t1"},
    )
    entry = {
        "tag": "t1",
        "base_url": server.url,
        "model": "fake-model",
        "input_file_id": upload.id,
        "batch_id": None,
        "requests": 3,
        "submitted": 0,
        "keys": keys,
    }
    ledger.write_text(json.dumps({"batches": [entry]}))
    creates = server.batches.count("batches.create")

    answers = run(config, cache_file, requests)
    assert server.batches.count("batches.create") == creates
    assert [a.error for a in answers] == [None] * 4 and [a.cached for a in answers] == [
        True,
        False,
        False,
        False,
    ]
    assert json.loads(ledger.read_text()) == {"batches": []}


# --------------------------------------------------------------------------------------------
# Expired and failed items


def test_expired_items_are_sent_online_by_default(server: ScriptedOpenAIServer, cache_file: Path) -> None:
    server.batches.expire_next(answered=3)
    config = openai_config(server, mode="batch", batch_poll_interval=0.01)
    with open_llm(config, cache_path=cache_file, quiet=True) as llm:
        answers = sorted(llm.run(prompts(8)), key=lambda c: c.request.tag)
        retries = dict(llm.stats.retries)
    assert [a.error for a in answers] == [None] * 8
    assert retries == {"batch_expired": 5}
    assert server.batches.count("batches.create") == 1
    online = [body["messages"][-1]["content"] for body in server.requests]
    assert sorted(online) == [f"prompt {i}" for i in range(3, 8)]
    assert len(cache_rows(cache_file)) == 8


def test_expired_items_go_in_one_more_batch_when_configured(
    server: ScriptedOpenAIServer, cache_file: Path
) -> None:
    server.batches.expire_next(answered=3)
    config = openai_config(server, mode="batch", batch_poll_interval=0.01, batch_retry="batch")
    answers = run(config, cache_file, prompts(8))
    assert [a.error for a in answers] == [None] * 8
    first, second = server.batches.submitted_ids()
    assert second == first[3:]
    assert not server.requests


def test_items_that_keep_expiring_become_failure_rows_after_max_retries_batches(
    server: ScriptedOpenAIServer, cache_file: Path
) -> None:
    server.batches.expire_next(batches=3, answered=1)
    config = openai_config(server, mode="batch", batch_poll_interval=0.01, batch_retry="batch", max_retries=1)
    answers = run(config, cache_file, prompts(4))
    assert [a.error is None for a in answers] == [True, True, False, False]
    assert answers[3].error == f"batch_expired after 2 batches: {EXPIRED_MESSAGE}"
    assert [len(ids) for ids in server.batches.submitted_ids()] == [4, 3]


def test_server_errors_are_retried_and_refusals_are_failure_rows(
    server: ScriptedOpenAIServer, cache_file: Path
) -> None:
    server.push(
        Reply(status=500, body={"error": {"message": "overloaded"}}),
        Reply(status=400, body={"error": {"message": "This model's maximum context length is 8 tokens"}}),
    )
    config = openai_config(server, mode="batch", batch_poll_interval=0.01)
    with open_llm(config, cache_path=cache_file, quiet=True) as llm:
        answers = sorted(llm.run(prompts(3)), key=lambda c: c.request.tag)
        retries = dict(llm.stats.retries)
    assert answers[0].error is None and answers[2].error is None
    assert answers[1].error == "HTTP 400: This model's maximum context length is 8 tokens"
    assert retries == {"server_error": 1}
    assert [body["messages"][-1]["content"] for body in server.requests] == ["prompt 0"]
    assert len(cache_rows(cache_file)) == 2


def test_a_refused_batch_is_exit_3_with_the_servers_reason(
    server: ScriptedOpenAIServer, cache_file: Path
) -> None:
    server.batches.refuse_next("the model fake-model is not available in batches")
    config = openai_config(server, mode="batch", batch_poll_interval=0.01)
    with pytest.raises(LLMError) as caught:
        run(config, cache_file, prompts(2))
    assert str(caught.value) == (
        f"batch batch_1 was refused by {server.url}: line 1: the model fake-model is not available in batches"
    )
    assert json.loads(ledger_path(cache_file).read_text()) == {"batches": []}


def test_a_server_without_the_batch_api_is_exit_3_saying_what_to_do(
    server: ScriptedOpenAIServer, cache_file: Path
) -> None:
    server.batches.post = lambda *_: Reply(status=404, body={"error": {"message": "Not Found"}})  # type: ignore[method-assign]
    config = openai_config(server, mode="batch", batch_poll_interval=0.01)
    with pytest.raises(
        LLMError,
        match=r"HTTP 404 while uploading a batch file \(Not Found\); llm.mode: batch "
        r"needs a server with OpenAI's Files and Batches APIs \(for vLLM, use --export-batch",
    ):
        run(config, cache_file, prompts(2))


def test_batch_mode_needs_the_openai_backend(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("llm:\n  backend: local\n  mode: batch\n")
    result = CliRunner().invoke(app, ["config", "check", str(config)], env={"INSTRAUG_DEBUG": None})
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: {config}:3: llm.mode: batch needs backend: openai (a server with the Batch API), "
        "not 'local'\n"
    )


# --------------------------------------------------------------------------------------------
# --export-batch and --import-batch


def offline_engine(server: ScriptedOpenAIServer, requests: Path, results: Path) -> int:
    """What `vllm run-batch -i requests -o results` does: one output line per input line."""
    lines = []
    for number, line in enumerate(read_jsonl(requests), 1):
        body = rephraser(line["body"]).body
        response = {"status_code": 200, "request_id": f"vllm-batch-{number}", "body": body}
        lines.append(
            {"id": f"vllm-{number}", "custom_id": line["custom_id"], "response": response, "error": None}
        )
    write_jsonl(results, lines)
    return len(lines)


def test_export_writes_the_first_round_and_sends_nothing(
    server: ScriptedOpenAIServer, inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    config = config_file(tmp_path / "c.yaml", server.url)
    exported, out = tmp_path / "requests.jsonl", tmp_path / "g.jsonl"
    result = generate(inputs, config, tmp_path / "c.sqlite", out, "--export-batch", exported)
    assert result.exit_code == 0, result.output
    lines = read_jsonl(exported)
    assert result.stderr.splitlines()[-1] == (
        f"{len(lines)} requests of round 1 written to {exported}, nothing sent: run them "
        "(vllm run-batch, the Batch API), then run again with --import-batch RESULTS"
    )
    assert not out.exists() and not server.requests and not server.batches.events
    assert {(line["method"], line["url"]) for line in lines} == {("POST", "/v1/chat/completions")}
    assert len({line["custom_id"] for line in lines}) == len(lines) > 0

    online = generate(inputs, config, tmp_path / "on.sqlite", tmp_path / "on.jsonl")
    assert online.exit_code == 0, online.output
    first_round = read_jsonl(tmp_path / "on.jsonl")[: len(lines)]
    assert [line["custom_id"] for line in lines] == [row["request_hash"] for row in first_round]
    assert canonical([line["body"] for line in lines]) == canonical(server.requests[: len(lines)])


def test_rounds_of_export_offline_engine_import_give_the_online_bytes(
    server: ScriptedOpenAIServer, inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    config, cache, out = (
        config_file(tmp_path / "c.yaml", server.url),
        tmp_path / "c.sqlite",
        tmp_path / "g.jsonl",
    )
    results: Path | None = None
    sizes = []
    for number in range(1, 20):
        requests = tmp_path / f"requests-{number}.jsonl"
        extra = ["--import-batch", results] if results else []
        step = generate(inputs, config, cache, out, "--offline", "--export-batch", requests, *extra)
        assert step.exit_code == 0, step.output
        if not read_jsonl(requests):
            done = f"0 requests written to {requests}: every request is answered"
            assert done in step.stderr.splitlines()
            break
        results = tmp_path / f"results-{number}.jsonl"
        sizes.append(offline_engine(server, requests, results))
    assert len(sizes) >= 3 and not server.requests and not server.batches.events

    final = generate(inputs, config, cache, tmp_path / "offline.jsonl", "--offline")
    assert final.exit_code == 0, final.output
    online = generate(inputs, config, tmp_path / "on.sqlite", tmp_path / "on.jsonl")
    assert online.exit_code == 0, online.output
    assert (
        out.read_bytes() == (tmp_path / "offline.jsonl").read_bytes() == (tmp_path / "on.jsonl").read_bytes()
    )
    assert cache_rows(cache) == cache_rows(tmp_path / "on.sqlite")
    assert sum(sizes) == len(server.requests)


def test_import_counts_unknown_ids_and_failed_items_and_stores_only_answers(
    server: ScriptedOpenAIServer, inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    config, cache = config_file(tmp_path / "c.yaml", server.url), tmp_path / "c.sqlite"
    first = tmp_path / "r1.jsonl"
    assert generate(inputs, config, cache, tmp_path / "g.jsonl", "--export-batch", first).exit_code == 0
    lines = read_jsonl(first)
    results = tmp_path / "o1.jsonl"
    offline_engine(server, first, results)
    rows = read_jsonl(results)
    rows[1] = {
        "id": "x",
        "custom_id": rows[1]["custom_id"],
        "response": {"status_code": 500, "request_id": "r", "body": {"error": {"message": "boom"}}},
        "error": None,
    }
    rows.append({**rows[0], "custom_id": "not-one-of-ours"})
    write_jsonl(results, rows)

    second = tmp_path / "r2.jsonl"
    step = generate(
        inputs, config, cache, tmp_path / "g.jsonl", "--import-batch", results, "--export-batch", second
    )
    assert step.exit_code == 0, step.output
    assert (
        f"Imported {results}: {len(lines)} answers, {len(lines) - 1} stored in the cache, "
        "1 custom_ids not asked for by this run (unknown, or already answered), "
        "1 failed items not imported (a later export writes them again)"
    ) in step.stderr.splitlines()
    assert len(cache_rows(cache)) == len(lines) - 1
    assert [line["custom_id"] for line in read_jsonl(second)][:1] == [lines[1]["custom_id"]]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (
            {"custom_id": 5, "response": None, "error": None},
            "not a batch output line: 'custom_id' must be a string",
        ),
        (
            {"custom_id": "k", "response": "ok"},
            "not a batch output line: 'response' must be an object or null",
        ),
        (
            {"custom_id": "k", "response": {"status_code": "200"}},
            "not a batch output line: 'response.status_code' must be an integer",
        ),
        (
            {"custom_id": "a", "response": None, "error": {"code": "batch_expired"}},
            "custom_id a repeated (first at line 1)",
        ),
    ],
)
def test_a_bad_import_line_is_exit_2_naming_its_line(
    server: ScriptedOpenAIServer, inputs: tuple[Path, Path], tmp_path: Path, line: dict[str, Any], reason: str
) -> None:
    results = write_jsonl(tmp_path / "o.jsonl", [{"custom_id": "a", "response": None, "error": None}, line])
    config = config_file(tmp_path / "c.yaml", server.url)
    result = generate(inputs, config, tmp_path / "c.sqlite", tmp_path / "g.jsonl", "--import-batch", results)
    assert result.exit_code == 2
    assert result.stderr == f"Error: {results}:2: {reason}\n"
    assert not server.requests and not (tmp_path / "g.jsonl").exists()


def test_export_refuses_to_replace_an_input(
    server: ScriptedOpenAIServer, inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    templates, _metas = inputs
    before = templates.read_bytes()
    config = config_file(tmp_path / "c.yaml", server.url)
    result = generate(
        inputs, config, tmp_path / "c.sqlite", tmp_path / "g.jsonl", "--export-batch", templates
    )
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: {templates}: the output is an input of this command ({templates}); "
        "choose another --export-batch\n"
    )
    assert templates.read_bytes() == before

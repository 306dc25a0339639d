"""The LLM judge (filters.judge), on the scripted server: asked only about what every other rule
kept, read strictly, cached, counted in the funnel, the estimate and the request count."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fake_openai_server import Reply, ScriptedOpenAIServer, chat_body
from helpers import read_jsonl
from test_expand import EXAMPLE, KEY_ENV, respond, write_config
from typer.testing import CliRunner, Result

from instraug.cli import app
from instraug.config import JudgeConfig, LLMConfig
from instraug.stages.s3_judge import judge_llm_config, parse_answer

JUDGE_OPENING = "You check rewritten instructions"


def rewrite_of(body: dict[str, Any]) -> str:
    return body["messages"][-1]["content"].split("Rewritten instruction:\n", 1)[1].split("\n\n", 1)[0]


def verdict_for(rewrite: str) -> str:
    """The scripted judge: mostly yes, some no, some neither (deterministic in the rewrite)."""
    h = int(hashlib.sha256(rewrite.encode()).hexdigest(), 16) % 6
    return "no" if h == 0 else "Maybe, it depends." if h == 1 else "Yes."


def respond_with_judge(body: dict[str, Any]) -> Reply:
    content = body["messages"][-1]["content"]
    if content.startswith(JUDGE_OPENING):
        return Reply(body=chat_body([verdict_for(rewrite_of(body))]))
    return respond(body)


@pytest.fixture(scope="module")
def server() -> Iterator[ScriptedOpenAIServer]:
    with ScriptedOpenAIServer() as srv:
        srv.responder = respond_with_judge
        yield srv


def judged_config(path: Path, url: str, **judge: Any) -> Path:
    write_config(path, url)
    config = yaml.safe_load(path.read_text())
    config["filters"] = {"judge": {"enabled": True, **judge}}
    path.write_text(yaml.safe_dump(config))
    return path


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args], env={KEY_ENV: "sk-test", "INSTRAUG_DEBUG": None})


def judge_requests(server: ScriptedOpenAIServer) -> list[dict[str, Any]]:
    return [b for b in server.requests if b["messages"][-1]["content"].startswith(JUDGE_OPENING)]


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("yes", True),
        ("Yes.", True),
        (" NO ", False),
        ("no!", False),
        ("Yes, it asks for the same task.", None),
        ("Maybe", None),
        ("", None),
        (None, None),
    ],
)
def test_answers_are_read_strictly(text: str | None, verdict: bool | None) -> None:
    assert parse_answer(text) is verdict


def test_the_judge_uses_the_generation_model_unless_told_otherwise() -> None:
    llm = LLMConfig(backend="local")
    assert judge_llm_config(llm, JudgeConfig(enabled=True)) is None
    own = judge_llm_config(llm, JudgeConfig(enabled=True, model="judge-7b", base_url="http://127.0.0.1:9/v1"))
    assert own is not None
    assert (own.backend, own.model, own.base_url) == ("openai", "judge-7b", "http://127.0.0.1:9/v1")


def test_the_judge_rejects_what_it_says_no_to_and_the_funnel_counts_it(
    server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    config = judged_config(tmp_path / "judge.yaml", server.url)
    before = len(server.requests)
    result = run("expand", EXAMPLE, "-o", out, "-c", config)
    assert result.exit_code == 0, result.stderr
    rows = read_jsonl(out / "generations.jsonl")
    asked = judge_requests(server)
    assert asked, "the judge was asked"
    about = {rewrite_of(body) for body in asked}
    for row in rows:
        other = [r for r in row["reasons"] if r != "judge"]
        if "judge" in row["reasons"]:
            assert other == []  # asked only about what every other rule kept
            assert verdict_for(row["template"]) != "Yes."
            assert row["notes"]["judge"] in (
                "the judge said it is not the same task",
                "the judge answered neither yes nor no: 'Maybe, it depends.'",
            )
        elif row["kept"]:
            assert row["template"] in about and verdict_for(row["template"]) == "Yes."
    report = json.loads((out / "report.json").read_text())
    judged_out = sum("judge" in row["reasons"] for row in rows)
    assert judged_out > 0
    assert report["funnel"]["removed"]["judge"] == judged_out
    pool = Counter(r["task"] for r in read_jsonl(out / "instructions.jsonl") if r["origin"] == "generated")
    assert sum(pool.values()) == report["funnel"]["kept"]
    assert report["llm"]["requests"] == len(server.requests) - before  # judge requests counted too

    sent = len(server.requests)
    again = run("expand", EXAMPLE, "-o", tmp_path / "again", "-c", config, "--cache", out / "cache.sqlite")
    assert again.exit_code == 0, again.stderr
    assert len(server.requests) == sent  # every judge answer came from the cache
    assert read_jsonl(tmp_path / "again" / "generations.jsonl") == rows


def test_the_estimate_counts_one_judge_request_per_rewrite_at_most(
    server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    plain = write_config(tmp_path / "plain.yaml", server.url)
    judged = judged_config(tmp_path / "judged.yaml", server.url)

    def plan(config: Path) -> dict[str, str]:
        result = run("expand", EXAMPLE, "-o", tmp_path / "run", "-c", config, "--estimate")
        assert result.exit_code == 0, result.stderr
        return dict(line.split(": ", 1) for line in result.stdout.splitlines())

    without, with_judge = plan(plain), plan(judged)
    bootstrap = 1
    assert int(with_judge["requests_max"]) - bootstrap == 2 * (int(without["requests_max"]) - bootstrap)
    assert int(with_judge["prompt_tokens_max"]) > int(without["prompt_tokens_max"])

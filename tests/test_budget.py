"""`expand --estimate` sends nothing; budget.max_requests stops generation cleanly and resumably."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fake_openai_server import Reply, ScriptedOpenAIServer, chat_body
from typer.testing import CliRunner

from instraug.cli import app
from instraug.errors import EXIT_BUDGET_REACHED

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "multiinstruct-mini"
KEY_ENV = "INSTRAUG_TEST_BUDGET_KEY"


def rephrase(body: dict[str, Any]) -> Reply:
    """A well-behaved model: prefixes the shown template, so every answer is a new instruction."""
    shown = body["messages"][-1]["content"]
    return Reply(body=chat_body([f"Please {shown[0].lower()}{shown[1:]} [{body.get('seed')}]"]))


class CountingServer(ScriptedOpenAIServer):
    """Counts the chat requests it answers."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.responder = self._count

    def _count(self, body: dict[str, Any]) -> Reply:
        self.count += 1
        return rephrase(body)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingServer]:
    monkeypatch.setenv(KEY_ENV, "test-key")
    with CountingServer() as srv:
        yield srv


def config(tmp_path: Path, server: ScriptedOpenAIServer, **budget: Any) -> Path:
    data = {
        "llm": {
            "backend": "openai",
            "base_url": server.url,
            "model": "fake",
            "api_key_env": KEY_ENV,
            "max_concurrency": 2,
            "price_per_1k_input": 1.0,
            "price_per_1k_output": 2.0,
        },
        "meta_prompts": {"merge": "curated"},
        "expansion": {"factor": 2, "max_attempts": 4},
        "filters": {"reject_answer_like": False},
        "budget": budget,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run(*args: Any) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def test_estimate_sends_nothing_and_bounds_the_plan(tmp_path: Path, server: CountingServer) -> None:
    result = run("expand", EXAMPLE, "-o", tmp_path / "run", "-c", config(tmp_path, server), "--estimate")
    assert result.exit_code == 0, result.output
    plan = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert server.count == 0
    assert not (tmp_path / "run" / "generations.jsonl").exists()
    templates = int(plan["templates_augmented"])
    # the example: 34 templates, 5 of them held out (visual_nli) and 1 pure placeholder
    assert templates == 28
    assert int(plan["requests_min"]) == templates * 2
    assert int(plan["requests_max"]) == templates * 4
    assert float(plan["cost_max_usd"]) > 0


def test_max_requests_stops_cleanly_and_the_next_run_resumes(tmp_path: Path, server: CountingServer) -> None:
    out = tmp_path / "run"
    limited = config(tmp_path, server, max_requests=10)
    first = run("expand", EXAMPLE, "-o", out, "-c", limited)
    assert first.exit_code == EXIT_BUDGET_REACHED, first.output
    assert "budget.max_requests (10) reached" in first.output
    assert server.count == 10
    partial = (out / "generations.jsonl").read_text().splitlines()
    assert len(partial) == 10
    assert (out / "train.jsonl").is_file()  # the stages after it still ran on what was kept

    sent_before = server.count
    unlimited = config(tmp_path, server)
    second = run("expand", EXAMPLE, "-o", out, "-c", unlimited)
    assert second.exit_code == 0, second.output
    complete = (out / "generations.jsonl").read_text().splitlines()
    assert complete[:10] == partial  # the answered requests come back from the cache, in order
    assert server.count - sent_before == len(complete) - 10  # nothing answered is sent again

    fresh = tmp_path / "fresh"
    third = run("expand", EXAMPLE, "-o", fresh, "-c", unlimited)
    assert third.exit_code == 0, third.output
    assert (fresh / "generations.jsonl").read_text().splitlines() == complete


def test_the_estimate_counts_what_the_run_directory_cache_already_answers(
    tmp_path: Path, server: CountingServer
) -> None:
    out = tmp_path / "run"
    settings = config(tmp_path, server)
    before = run("expand", EXAMPLE, "-o", out, "-c", settings, "--estimate")
    plan = dict(line.split(": ", 1) for line in before.stdout.splitlines())
    cached, first_round = map(int, plan["first_round_cached"].split(" of "))
    assert cached == 0 and first_round == int(plan["templates_augmented"]) * 2
    assert run("expand", EXAMPLE, "-o", out, "-c", settings).exit_code == 0
    sent = server.count
    after = run("expand", EXAMPLE, "-o", out, "-c", settings, "--estimate")
    plan = dict(line.split(": ", 1) for line in after.stdout.splitlines())
    assert plan["first_round_cached"] == f"{first_round} of {first_round}"
    assert server.count == sent

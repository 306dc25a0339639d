"""Runs that go wrong: nothing kept, every request failed, the server down, a bad run directory or
cache, and two runs on one run directory or one cache. Each ends with the documented exit code, a
message that says what happened, and a report.md that agrees with report.json."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from fake_openai_server import Reply, ScriptedOpenAIServer
from helpers import read_jsonl
from llm_fixtures import child_env
from processes import Spawner, spawn_fixture  # noqa: F401 - the spawn fixture is found by its name
from typer.testing import CliRunner, Result

from instraug.cli import app
from instraug.errors import InputError
from instraug.locks import run_dir_lock
from instraug.rundir import STATE_FILE, RunState

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "multiinstruct-mini"
KEY_ENV = "INSTRAUG_TEST_HARDENING_KEY"
ENV = {KEY_ENV: "sk-test-hardening", "INSTRAUG_DEBUG": None}
CACHE_COLUMNS = "key, model, request, text, finish_reason, prompt_tokens, completion_tokens, created"


def write_config(path: Path, url: str, **sections: dict[str, Any]) -> Path:
    settings: dict[str, Any] = {
        "llm": {
            "backend": "openai",
            "base_url": url,
            "model": "fake",
            "api_key_env": KEY_ENV,
            "max_retries": 1,
            "retry_initial_wait": 0,
            "retry_max_wait": 0,
        },
        "meta_prompts": {"count": 3, "bootstrap_count": 3},
        "expansion": {"factor": 2, "max_attempts": 4},
        "assembly": {"held_out_tasks": ["visual_nli"], "seed": 0},
    }
    for section, values in sections.items():
        settings.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(settings))
    return path


def instraug(*args: str | Path, input: str | None = None) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV, input=input)


def expand(out: Path, config: Path, *extra: str | Path, quiet: bool = True) -> Result:
    return instraug("expand", EXAMPLE, "-o", out, "-c", config, *(["-q"] if quiet else []), *extra)


def report_json(run: Path) -> dict[str, Any]:
    return json.loads((run / "report.json").read_text())


def closed_url() -> str:
    """An address nothing listens on."""
    with ScriptedOpenAIServer() as gone:
        return gone.url


# --------------------------------------------------------------------------------------------
# Empty and failed runs


def test_a_run_that_keeps_no_rephrasing_finishes_with_a_report_that_says_so(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with ScriptedOpenAIServer() as server:
        config = write_config(tmp_path / "c.yaml", server.url, filters={"banned_patterns": ["."]})
        result = expand(run, config, quiet=False)
    assert result.exit_code == 0, result.stderr
    rows = read_jsonl(run / "generations.jsonl")
    flagged = Counter(reason for row in rows for reason in row["reasons"])
    assert rows and not [row for row in rows if row["kept"]] and flagged["banned_pattern"] == len(rows)
    listed = ", ".join(f"{k} {n}" for k, n in sorted(flagged.items(), key=lambda kv: (-kv[1], kv[0])))
    message = f"No rephrasing was kept: all {len(rows)} rewrites were rejected ({listed})."
    assert result.stderr.endswith(f"report: {run / 'report.md'}\n{message}\n")
    assert report_json(run)["outcome"] == {"status": "completed", "exit_code": 0, "message": message}
    markdown = (run / "report.md").read_text()
    assert f"\n\nOutcome: {message}\n\n## Summary\n" in markdown
    assert "| generated | 0 | n/a | n/a | n/a | n/a |" in markdown
    originals = len(read_jsonl(run / "templates.jsonl"))
    assert f"- Instruction pool: {originals} original + 0 generated = {originals}\n" in markdown
    again = instraug("report", run)
    assert again.exit_code == 0, again.stderr
    assert (run / "report.md").read_text() == markdown  # the same run, the same report
    quiet = expand(run, config)  # up to date: the same outcome, not printed with --quiet
    assert (quiet.exit_code, quiet.stderr) == (0, "")
    assert report_json(run)["outcome"] == {"status": "completed", "exit_code": 0, "message": message}


def test_every_request_failing_is_exit_4_and_the_report_says_every_request_failed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with ScriptedOpenAIServer() as server:
        server.responder = lambda body: Reply(status=500, body={"error": {"message": "overloaded"}})
        result = expand(run, write_config(tmp_path / "c.yaml", server.url))
        attempts = len(server.requests)
    assert result.exit_code == 4, result.stderr
    report = report_json(run)
    asked = report["llm"]["requests"]
    assert asked > 1 and attempts == 2 * asked  # max_retries: 1
    message = (
        f"Every request failed: {asked} of {asked} requests failed after all retries (first error: "
        "server_error after 2 attempts: HTTP 500: overloaded). A re-run sends the failed requests again. "
        "No rephrasing was kept."
    )
    assert result.stderr == f"{message}\n"
    assert report["outcome"] == {"status": "completed_with_failures", "exit_code": 4, "message": message}
    assert report["stages"] == {
        "templates": "ran",
        "meta_prompts": "incomplete",
        "generations": "incomplete",
        "instructions": "ran",
        "train": "ran",
    }
    assert f"\n\nOutcome: {message}\n\n" in (run / "report.md").read_text()


def test_a_refused_request_is_exit_3_and_replaces_the_report_of_the_previous_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with ScriptedOpenAIServer() as server:
        config = write_config(tmp_path / "c.yaml", server.url)
        assert expand(run, config).exit_code == 0
        assert "## Filter funnel" in (run / "report.md").read_text()
        server.responder = lambda body: Reply(status=400, body={"error": {"message": "no such parameter"}})
        sent = len(server.requests)
        result = expand(run, write_config(tmp_path / "c2.yaml", server.url, llm={"seed": 7}))
        assert len(server.requests) == sent + 1  # stopped at the first refusal
    error = (
        f"{server.url} refused the request (HTTP 400: no such parameter); "
        "check llm.model and the sampling settings"
    )
    assert result.exit_code == 3
    assert result.stderr == f"Error: {error}\n"
    message = f"The LLM could not be used; the run stopped in stage meta_prompts: {error}"
    report = report_json(run)
    assert report["outcome"] == {"status": "failed", "exit_code": 3, "message": message}
    assert report["stages"] == {
        "templates": "up to date",
        "meta_prompts": "failed",
        "generations": "not run",
        "instructions": "not run",
        "train": "not run",
    }
    markdown = (run / "report.md").read_text()
    assert markdown.startswith(f"# instraug run report: run\n\nOutcome: {message}\n\n## Stages\n")
    assert "| meta_prompts | failed |" in markdown and "## Filter funnel" not in markdown
    # `instraug report` on that run directory says the same
    assert instraug("report", run).exit_code == 0
    assert (run / "report.md").read_text() == markdown


UNREACHABLE = (
    r"cannot reach {url}: {n} of {n} requests failed to connect \({error}\); start the server or check "
    r"llm.base_url, then run again \(answers so far are cached\)"
)


def test_expand_with_the_server_down_is_exit_3_with_a_report(tmp_path: Path) -> None:
    url, run = closed_url(), tmp_path / "run"
    result = expand(run, write_config(tmp_path / "c.yaml", url))
    assert result.exit_code == 3
    error = UNREACHABLE.format(
        url=re.escape(url), n=1, error=r"connection after 2 attempts: cannot reach the server: [^()]+"
    )
    assert re.fullmatch(f"Error: {error}\n", result.stderr), result.stderr
    outcome = report_json(run)["outcome"]
    assert (
        outcome["message"]
        == f"The LLM could not be used; the run stopped in stage meta_prompts: {result.stderr[7:-1]}"
    )
    assert (outcome["status"], outcome["exit_code"]) == ("failed", 3)
    assert f"Outcome: {outcome['message']}\n" in (run / "report.md").read_text()


def test_generate_with_the_server_down_is_exit_3(tmp_path: Path) -> None:
    url = closed_url()
    templates, metas, out = tmp_path / "t.jsonl", tmp_path / "m.jsonl", tmp_path / "g.jsonl"
    assert instraug("import-templates", EXAMPLE / "instruction_templates.py", "-o", templates).exit_code == 0
    metas.write_text(
        json.dumps({"id": "direct", "text": "Rewrite the instruction.", "origin": "direct"}) + "\n"
    )
    config = write_config(tmp_path / "c.yaml", url)
    result = instraug(
        "generate",
        "-t",
        templates,
        "-m",
        metas,
        "-c",
        config,
        "-o",
        out,
        "--cache",
        tmp_path / "c.sqlite",
        "-q",
    )
    assert result.exit_code == 3
    rows = read_jsonl(out)  # the failure rows are written, each with its error
    assert rows and all(row["error"] == rows[0]["error"] for row in rows)
    error = UNREACHABLE.format(url=re.escape(url), n=len(rows), error=re.escape(rows[0]["error"]))
    assert re.fullmatch(f"Error: {error}\n", result.stderr), result.stderr


# --------------------------------------------------------------------------------------------
# A run directory or a cache that cannot be one


def test_an_output_that_is_a_file_is_exit_2_and_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "notes.txt"
    out.write_text("precious\n")
    result = expand(out, write_config(tmp_path / "c.yaml", closed_url()))
    assert result.exit_code == 2
    assert result.stderr == f"Error: {out}: not a directory: -o names a run directory, and this is a file\n"
    assert out.read_text() == "precious\n"


def test_an_output_under_a_file_is_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("precious\n")
    out = blocker / "runs" / "demo"
    result = expand(out, write_config(tmp_path / "c.yaml", closed_url()))
    assert result.exit_code == 2
    assert result.stderr == f"Error: {out}: cannot create the run directory: {blocker} is a file\n"
    assert blocker.read_text() == "precious\n"


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root writes in a read-only directory (the test above covers it)"
)
def test_a_read_only_run_directory_is_exit_2(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        config = write_config(tmp_path / "c.yaml", closed_url())
        inside = expand(locked / "run", config)
        assert inside.exit_code == 2
        assert (
            inside.stderr == f"Error: {locked / 'run'}: cannot create the run directory: Permission denied\n"
        )
        itself = expand(locked, config)
        assert itself.exit_code == 2
        assert itself.stderr == (
            f"Error: {locked}: cannot create the lock file .instraug.lock: Permission denied\n"
        )
    finally:
        locked.chmod(0o755)


def foreign_database(path: Path, *statements: str) -> bytes:
    with sqlite3.connect(path) as db:
        for statement in statements:
            db.execute(statement)
    db.close()
    return path.read_bytes()


@pytest.mark.parametrize(
    ("statements", "reason"),
    [
        (
            [
                "CREATE TABLE embeddings (key TEXT PRIMARY KEY, vector BLOB)",
                "INSERT INTO embeddings VALUES ('a', x'00')",
            ],
            "cannot use it as the LLM cache: it is an SQLite database with other tables (embeddings)",
        ),
        (
            ["CREATE TABLE responses (key TEXT, value TEXT)"],
            "cannot use it as the LLM cache: its table 'responses' has the columns (key, value), "
            f"not ({CACHE_COLUMNS})",
        ),
        (None, "cannot open the LLM cache: file is not a database"),
    ],
    ids=["other-tables", "other-columns", "not-sqlite"],
)
def test_a_cache_that_is_not_an_llm_cache_is_exit_2_and_left_alone(
    tmp_path: Path, statements: list[str] | None, reason: str
) -> None:
    cache = tmp_path / "their.sqlite"
    if statements is None:
        cache.write_bytes(b"not a database, just text\n" * 200)
        before = cache.read_bytes()
    else:
        before = foreign_database(cache, *statements)
    with ScriptedOpenAIServer() as server:
        result = expand(tmp_path / "run", write_config(tmp_path / "c.yaml", server.url), "--cache", cache)
        assert server.requests == []
    assert result.exit_code == 2
    assert result.stderr == f"Error: {cache}: {reason}\n"
    assert cache.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("their")) == [
        "their.sqlite",
        "their.sqlite.lock",
    ]  # no -wal or -shm: the file was never opened for writing
    stats = instraug("cache", "stats", "--cache", cache)
    assert (stats.exit_code, stats.stderr) == (2, f"Error: {cache}: {reason}\n")


# --------------------------------------------------------------------------------------------
# One writer per run directory and per cache


def test_a_second_lock_on_a_run_directory_names_the_holder(tmp_path: Path) -> None:
    with run_dir_lock(tmp_path):
        with pytest.raises(InputError) as caught:
            run_dir_lock(tmp_path).acquire()
    assert str(caught.value) == (
        f"{tmp_path}: another instraug run is using this run directory (pid {os.getpid()}); "
        "wait for it or choose another -o"
    )
    with run_dir_lock(tmp_path):  # released: free again
        pass


def test_run_state_saves_from_two_writers_never_collide(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def save_often(name: str) -> None:
        state = RunState(tmp_path)
        try:
            for i in range(200):
                (tmp_path / name).write_text(str(i))
                state.record(name, tmp_path / name, str(i))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    writers = [threading.Thread(target=save_often, args=(name,)) for name in ("a", "b")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert errors == []
    assert json.loads((tmp_path / STATE_FILE).read_text())  # whole JSON, whoever wrote last
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The scripted server in a process of its own, answering after 0.2 s: (URL, request log)."""
    folder = tmp_path_factory.mktemp("slow")
    port_file, log = folder / "port", folder / "requests.jsonl"
    spawner = Spawner()
    try:
        server = spawner(
            [sys.executable, str(HERE / "fake_openai_server.py"), "--port-file", str(port_file)]
            + ["--log", str(log), "--delay", "0.2"],
            env=child_env(),
        )
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert server.poll() is None and time.monotonic() < deadline, "the scripted server did not start"
            time.sleep(0.02)
        yield port_file.read_text(), log
    finally:
        spawner.close()


def logged(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def start_holder(spawn: Spawner, run: Path, config: Path, log: Path, *extra: str | Path) -> Any:
    """`instraug expand` in a process of its own, returned once it is sending requests."""
    before = len(logged(log))
    holder = spawn(
        [sys.executable, "-m", "instraug", "expand", str(EXAMPLE), "-o", str(run), "-c", str(config), "-q"]
        + [str(e) for e in extra],
        env={**child_env(), KEY_ENV: "sk-test-hardening"},
    )
    deadline = time.monotonic() + 60
    while len(logged(log)) <= before:
        assert holder.poll() is None, "the run ended before it sent anything"
        assert time.monotonic() < deadline, "the run sent nothing"
        time.sleep(0.02)
    return holder


def slow_config(path: Path, url: str) -> Path:
    """One request at a time: a run that lasts several seconds."""
    return write_config(path, url, llm={"model": "fake-slow", "max_concurrency": 1})


def test_a_second_run_on_a_run_directory_stops_at_once(
    slow_server: tuple[str, Path], spawn: Spawner, tmp_path: Path
) -> None:
    url, log = slow_server
    run, config = tmp_path / "run", slow_config(tmp_path / "c.yaml", url)
    sent_before = len(logged(log))
    holder = start_holder(spawn, run, config, log)
    second = expand(run, config)
    assert second.exit_code == 2
    assert second.stderr == (
        f"Error: {run}: another instraug run is using this run directory (pid {holder.pid}); "
        "wait for it or choose another -o\n"
    )
    assert holder.wait(timeout=300) == 0
    bodies = logged(log)[sent_before:]
    assert len(bodies) == len(set(bodies))  # no request was sent twice
    assert report_json(run)["stages"] == dict.fromkeys(
        ("templates", "meta_prompts", "generations", "instructions", "train"), "ran"
    )


def test_a_second_run_on_a_cache_stops_at_once_and_readers_go_on(
    slow_server: tuple[str, Path], spawn: Spawner, tmp_path: Path
) -> None:
    url, log = slow_server
    cache, config = tmp_path / "shared.sqlite", slow_config(tmp_path / "c.yaml", url)
    holder = start_holder(spawn, tmp_path / "a", config, log, "--cache", cache)
    second = expand(tmp_path / "b", config, "--cache", cache)
    assert second.exit_code == 2
    reason = (
        f"another instraug run is using this LLM cache (pid {holder.pid}); "
        "wait for it or choose another --cache"
    )
    assert second.stderr == f"Error: {cache}: {reason}\n"
    assert report_json(tmp_path / "b")["outcome"] == {
        "status": "failed",
        "exit_code": 2,
        "message": f"The run stopped in stage meta_prompts: {cache}: {reason}",
    }
    importing = instraug("cache", "import", "-", "--cache", cache, input="")
    assert (importing.exit_code, importing.stderr) == (2, f"Error: {cache}: {reason}\n")
    stats = instraug("cache", "stats", "--cache", cache)  # a reader is not blocked
    assert stats.exit_code == 0 and stats.stdout.startswith(f"{cache}: ")
    assert holder.poll() is None


def test_a_run_killed_with_kill_9_leaves_its_run_directory_free(
    slow_server: tuple[str, Path], spawn: Spawner, tmp_path: Path
) -> None:
    url, log = slow_server
    run = tmp_path / "run"
    with ScriptedOpenAIServer() as fast:
        fast_config = write_config(tmp_path / "fast.yaml", fast.url)
        assert expand(run, fast_config).exit_code == 0
        holder = start_holder(spawn, run, slow_config(tmp_path / "slow.yaml", url), log)
        assert (run / ".instraug.lock").read_text() == f"{holder.pid}\n"
        reading = instraug("report", run)  # a reader is not blocked
        assert reading.exit_code == 0, reading.stderr
        holder.kill()
        assert holder.wait(timeout=30) == -9
        again = expand(run, fast_config)
    assert again.exit_code == 0, again.stderr
    assert report_json(run)["outcome"]["status"] == "completed"

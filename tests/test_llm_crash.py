"""kill -9 in the middle of a run, then re-run: no answered request is sent again, nothing is lost.

Run as a script (`python tests/test_llm_crash.py URL CACHE OUTPUT COUNT`) it is the program under test.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from llm_fixtures import child_env
from processes import Spawner, spawn_fixture  # noqa: F401 - the spawn fixture is found by its name

HERE = Path(__file__).resolve().parent
COUNT = 160


def drive(base_url: str, cache: str, output: str, count: int) -> None:
    """Ask `count` distinct questions through open_llm, appending each answer to `output` as it comes."""
    from llm_fixtures import chat

    from instraug.config import LLMConfig
    from instraug.llm import open_llm

    config = LLMConfig(
        backend="openai", base_url=base_url, model="fake-model", max_concurrency=8, api_key_env="NO_KEY_SET"
    )
    requests = [chat(f"crash prompt {i}", tag=i) for i in range(count)]
    with open_llm(config, cache_path=cache, quiet=True) as llm, open(output, "a", encoding="utf-8") as out:
        for completion in llm.run(requests):
            out.write(json.dumps({"tag": completion.request.tag, "text": completion.text}) + "\n")
            out.flush()


@pytest.fixture
def server_process(tmp_path: Path, spawn: Spawner) -> tuple[str, Path]:
    """The scripted server in its own process (it outlives the killed client): (URL, request log)."""
    port_file, log = tmp_path / "port", tmp_path / "requests.jsonl"
    command = [sys.executable, str(HERE / "fake_openai_server.py"), "--port-file", str(port_file)]
    process = spawn([*command, "--log", str(log), "--delay", "0.02"], env=child_env())
    deadline = time.monotonic() + 30
    while not port_file.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the scripted server did not start"
        time.sleep(0.02)
    return port_file.read_text(), log


def run_driver(spawn: Spawner, url: str, cache: Path, output: Path) -> subprocess.Popen[bytes]:
    """A run of `drive`; the spawn fixture kills it if the test ends first, however it ends."""
    return spawn([sys.executable, __file__, url, str(cache), str(output), str(COUNT)], env=child_env())


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def prompt_of(body: dict) -> str:
    return body["messages"][-1]["content"]


def test_kill_9_mid_run_then_rerun_resends_nothing_that_was_answered(
    server_process: tuple[str, Path], tmp_path: Path, spawn: Spawner
) -> None:
    url, log = server_process
    cache, output = tmp_path / "cache.sqlite", tmp_path / "interrupted.jsonl"

    victim = run_driver(spawn, url, cache, output)
    deadline = time.monotonic() + 60
    while len(lines(output)) < COUNT // 4:
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL

    with sqlite3.connect(cache) as db:
        stored = [json.loads(r) for (r,) in db.execute("SELECT request FROM responses")]
    cached_at_kill = {request["messages"][-1][1] for request in stored}
    sent_before = len(lines(log))
    assert COUNT // 4 <= len(cached_at_kill) < COUNT, "the kill did not land mid-run"

    assert run_driver(spawn, url, cache, output).wait(timeout=120) == 0
    resent = [prompt_of(json.loads(line)) for line in lines(log)[sent_before:]]
    assert not set(resent) & cached_at_kill
    assert len(resent) == len(set(resent)) == COUNT - len(cached_at_kill)

    # The answers equal those of a run that was never interrupted.
    fresh = tmp_path / "fresh.jsonl"
    assert run_driver(spawn, url, tmp_path / "fresh.sqlite", fresh).wait(timeout=120) == 0
    after_rerun = {row["tag"]: row["text"] for row in map(json.loads, lines(output))}
    uninterrupted = [json.loads(line) for line in lines(fresh)]
    assert len(uninterrupted) == COUNT and all(row["text"] for row in uninterrupted)
    assert after_rerun == {row["tag"]: row["text"] for row in uninterrupted}


if __name__ == "__main__":
    os.environ.pop("OPENAI_BASE_URL", None)
    drive(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))

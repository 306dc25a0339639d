"""The embedded llama.cpp server for real: round trips, cache, n > 1, and no server left behind, ever.

Run as a script (`python tests/test_llm_local.py COUNT`) it is an instraug run the tests signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from llm_fixtures import LOCAL_EXTRA_MISSING, alive, chat, child_env, llama_server_pids
from processes import Spawner, sigint, spawn_fixture  # noqa: F401 - the spawn fixture is found by its name

from instraug.config import LLMConfig
from instraug.errors import LLMError
from instraug.llm import LLMSession, open_llm

pytestmark = [
    pytest.mark.local_server,
    pytest.mark.skipif(
        bool(LOCAL_EXTRA_MISSING),
        reason=f"needs instraug[local] ({', '.join(LOCAL_EXTRA_MISSING)} not importable)",
    ),
]

SHORT = {"max_tokens": 16, "temperature": 0.7}


def server_pid(llm: LLMSession) -> int:
    server = getattr(llm.backend, "server", None)
    assert server is not None and server.process is not None
    return server.process.pid


def children_running_llama(parent: int) -> set[int]:
    """llama_cpp.server processes whose parent is `parent`."""
    found = set()
    for pid in llama_server_pids():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            found.add(pid)
    return found


def wait_gone(pid: int, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def local_llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LLMSession, Path]]:
    """One embedded server for the module's round-trip tests."""
    cache = tmp_path_factory.mktemp("local") / "cache.sqlite"
    with open_llm(LLMConfig(max_concurrency=3), cache_path=cache, quiet=True) as llm:
        pid = server_pid(llm)
        assert alive(pid)
        yield llm, cache
    assert wait_gone(pid, 0), "the server outlived its session"


def test_a_round_trip_answers_with_the_bundled_model(local_llm: tuple[LLMSession, Path]) -> None:
    llm, _ = local_llm
    [completion] = llm.run([chat("Rephrase: 'Describe the image.'", **SHORT)])
    assert completion.error is None and isinstance(completion.text, str)
    assert completion.model == "SmolLM2-135M-Instruct.Q4_1.gguf" == llm.model
    assert completion.finish_reason in {"stop", "length"}
    # llama-cpp-python counts the token that hit the limit too, so "length" can report max_tokens + 1.
    assert completion.prompt_tokens > 0 and 0 < completion.completion_tokens <= 16 + 1
    assert not completion.cached


def test_concurrent_requests_each_get_their_answer_and_a_rerun_sends_nothing(
    local_llm: tuple[LLMSession, Path],
) -> None:
    llm, cache = local_llm
    batch = [chat(f"Rephrase instruction {i}: 'Answer the question.'", tag=i, **SHORT) for i in range(6)]
    sent_before = llm.stats.requests_sent
    first = {c.request.tag: c for c in llm.run(batch)}
    assert sorted(first) == list(range(6)) and all(c.error is None for c in first.values())
    assert llm.stats.requests_sent == sent_before + 6
    assert len({c.key for c in first.values()}) == 6

    again = {c.request.tag: c for c in llm.run(batch)}
    assert llm.stats.requests_sent == sent_before + 6
    assert all(c.cached for c in again.values())
    assert {t: c.text for t, c in again.items()} == {t: c.text for t, c in first.items()}

    # A later run answers offline from the same cache, without starting a server.
    before = llama_server_pids()
    with open_llm(LLMConfig(), cache_path=cache, offline=True, quiet=True) as offline:
        assert [c.cached for c in offline.run(batch)] == [True] * 6
        assert llama_server_pids() <= before


def test_n_above_one_refills_the_samples_llama_cpp_does_not_return_and_errors_stop_the_server() -> None:
    samples = [chat("Rephrase: 'What is in the box?'", sample_index=i, **SHORT) for i in range(3)]
    with pytest.raises(RuntimeError, match="failure inside the block"):
        with open_llm(LLMConfig(n=3), cache_path=None, quiet=True) as llm:
            pid = server_pid(llm)
            completions = list(llm.run(samples))
            assert sorted(c.request.sample_index for c in completions) == [0, 1, 2]
            assert all(c.error is None for c in completions)
            # llama-cpp-python answers one choice per call: the other two samples were asked again.
            assert llm.stats.retries["fewer_samples"] == 2 and llm.stats.api_calls == 3
            raise RuntimeError("failure inside the block")
    assert wait_gone(pid, 0)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "kill-9"])
def test_a_signalled_instraug_run_leaves_no_server(sig: signal.Signals, spawn: Spawner) -> None:
    script = [sys.executable, __file__, "400"]
    run = spawn(script, env=child_env(), stdout=subprocess.PIPE, text=True)
    assert run.stdout is not None
    pid = int(run.stdout.readline().split()[-1])  # "server <pid>"
    assert alive(pid) and run.stdout.readline().startswith("answer")
    run.send_signal(sig)
    code = run.wait(timeout=30)
    assert code == (128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGKILL)
    # SIGTERM: instraug stops the server itself; kill -9: the kernel kills it (parent-death signal).
    assert wait_gone(pid), f"llama_cpp.server {pid} survived {sig.name} to instraug"


def test_instraug_serve_prints_a_base_url_the_openai_backend_can_use_and_ctrl_c_stops_it(
    spawn: Spawner,
) -> None:
    # SIGINT as in a terminal, whatever this test inherited (a background job inherits it ignored)
    serve = spawn(
        [sys.executable, "-m", "instraug", "serve", "--quiet"],
        preexec_fn=sigint(signal.SIG_DFL),
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert serve.stdout is not None
    base_url = serve.stdout.readline().strip()
    assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
    [pid] = children_running_llama(serve.pid)
    config = LLMConfig(backend="openai", base_url=base_url, model="SmolLM2-135M-Instruct.Q4_1.gguf")
    with open_llm(config, cache_path=None, quiet=True) as llm:
        completions = list(llm.run([chat(f"Rephrase: 'Count the dogs.' ({i})", **SHORT) for i in range(2)]))
    assert all(c.error is None and c.text is not None for c in completions)
    serve.send_signal(signal.SIGINT)
    assert serve.wait(timeout=30) == 0
    assert wait_gone(pid)


def test_instraug_serve_started_as_a_background_job_stops_on_sigterm(spawn: Spawner, tmp_path: Path) -> None:
    """A shell starts a background job with SIGINT ignored; serve keeps it so and stops on SIGTERM."""
    errors = tmp_path / "stderr.txt"
    with open(errors, "w") as stderr:
        serve = spawn(
            [sys.executable, "-m", "instraug", "serve"],
            preexec_fn=sigint(signal.SIG_IGN),
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert serve.stdout is not None
    assert serve.stdout.readline().startswith("http://127.0.0.1:")
    [pid] = children_running_llama(serve.pid)
    serve.send_signal(signal.SIGINT)
    with pytest.raises(subprocess.TimeoutExpired):
        serve.wait(timeout=1)  # ignored, as the shell asked
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(timeout=30) == 0
    assert wait_gone(pid)
    lines = errors.read_text().splitlines()
    assert f"SIGINT is ignored here (as in a background job): stop it with `kill {serve.pid}`" in lines
    assert "stopped" in lines


def test_a_server_that_cannot_start_is_reported_with_its_output(tmp_path: Path) -> None:
    junk = tmp_path / "not-a-model.gguf"
    junk.write_bytes(b"this is not a GGUF file")
    before = llama_server_pids()
    ended = r"server (exited with code \d+|was killed by \w+) while starting"
    with pytest.raises(LLMError, match=ended) as caught:
        with open_llm(LLMConfig(model_path=str(junk)), cache_path=None, quiet=True):
            pass
    assert "its last output:" in str(caught.value)
    with pytest.raises(LLMError, match=r"did not answer within 0.2 s \(llm.server_startup_timeout\)"):
        with open_llm(LLMConfig(server_startup_timeout=0.2), cache_path=None, quiet=True):
            pass
    assert llama_server_pids() <= before


def _run_until_signalled(count: int) -> None:
    """Print the server's pid, then answers, one line each, until killed."""
    with open_llm(LLMConfig(max_concurrency=2), cache_path=None, quiet=True) as llm:
        print(f"server {server_pid(llm)}", flush=True)
        for i, completion in enumerate(
            llm.run(chat(f"Rephrase {i}: 'Read the sign.'") for i in range(count))
        ):
            print(f"answer {i} {completion.error is None}", flush=True)


if __name__ == "__main__":
    os.environ.pop("OPENAI_BASE_URL", None)
    _run_until_signalled(int(sys.argv[1]))

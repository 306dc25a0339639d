"""The openai backend against a scripted OpenAI-compatible server: retries, failures, fatal errors, n."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fake_openai_server import Reply, ScriptedOpenAIServer, chat_body, echo_text
from llm_fixtures import (  # noqa: F401 - fixtures are found by their name= in this namespace
    TEST_KEY,
    TEST_KEY_ENV,
    api_key_fixture,
    cache_file_fixture,
    chat,
    fake_server_fixture,
    openai_config,
    prompts,
)

from instraug.errors import LLMError
from instraug.llm import count_cached, open_llm
from instraug.llm.base import derive_seed
from instraug.llm.local import free_port


def error(status: int, message: str = "scripted failure", **headers: str) -> Reply:
    return Reply(status=status, body={"error": {"message": message, "type": "test"}}, headers=headers)


def test_round_trip_sends_the_request_and_streams_every_answer(fake_server: ScriptedOpenAIServer) -> None:
    config = openai_config(fake_server, seed=11)
    requests = [chat(f"rephrase {i}", tag=i, stop=("\n",), max_tokens=20) for i in range(6)]
    with open_llm(config, cache_path=None, quiet=True) as llm:
        completions = list(llm.run(requests))
        stats = llm.stats
    assert sorted(c.request.tag for c in completions) == list(range(6))
    for c in completions:
        prompt = c.request.messages[0][1]
        body = next(b for b in fake_server.requests if b["messages"][-1]["content"] == prompt)
        assert c.text == echo_text(body)
        assert (c.finish_reason, c.cached, c.error, c.model) == ("stop", False, None, "fake-model")
        assert c.prompt_tokens == 7 and c.completion_tokens == len(c.text.split())
        assert body["model"] == "fake-model"
        assert body["messages"] == [{"role": "user", "content": c.request.messages[0][1]}]
        sampling = (body["temperature"], body["top_p"], body["max_tokens"], body["stop"])
        assert sampling == (0.7, 1.0, 20, ["\n"])
        assert body["seed"] == derive_seed(11, 0)
        assert "n" not in body
    assert (stats.requests, stats.requests_sent, stats.api_calls, stats.failures) == (6, 6, 6, 0)
    assert stats.prompt_tokens == 42
    assert all(h.get("authorization") == f"Bearer {TEST_KEY}" for h in fake_server.headers)


def test_rerun_answers_from_the_cache_and_sends_nothing(
    fake_server: ScriptedOpenAIServer, cache_file: Path
) -> None:
    config = openai_config(fake_server)
    with open_llm(config, cache_path=cache_file, quiet=True) as llm:
        first = {c.request.tag: c.text for c in llm.run(prompts(5))}
    sent = len(fake_server.requests)
    with open_llm(config, cache_path=cache_file, quiet=True) as llm:
        again = list(llm.run(prompts(5)))
        stats = llm.stats
    assert len(fake_server.requests) == sent == 5
    assert {c.request.tag: c.text for c in again} == first
    assert all(c.cached for c in again)
    assert (stats.cache_hits, stats.requests_sent, stats.api_calls) == (5, 0, 0)


def test_count_cached_needs_no_key_and_sends_nothing(
    fake_server: ScriptedOpenAIServer, cache_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = openai_config(fake_server, seed=5)
    with open_llm(config, cache_path=cache_file, quiet=True) as llm:
        list(llm.run(prompts(2)))
    monkeypatch.delenv(TEST_KEY_ENV)
    assert count_cached(cache_file, config.model_copy(update={"base_url": None}), prompts(4)) == 2
    assert count_cached(cache_file, config.model_copy(update={"model": "other-model"}), prompts(4)) == 0
    assert len(fake_server.requests) == 2
    with pytest.raises(LLMError, match="llm.model is required for the openai backend"):
        count_cached(cache_file, config.model_copy(update={"model": None}), prompts(4))


def test_429_waits_as_long_as_retry_after_says(fake_server: ScriptedOpenAIServer) -> None:
    fake_server.push(error(429, "slow down", **{"Retry-After": "1"}))
    with open_llm(openai_config(fake_server, max_concurrency=1), cache_path=None, quiet=True) as llm:
        [completion] = llm.run([chat("hello")])
        retries = dict(llm.stats.retries)
    assert completion.error is None and completion.text is not None
    assert retries == {"rate_limit": 1}
    assert fake_server.times[1] - fake_server.times[0] >= 1.0


@pytest.mark.parametrize(
    ("replies", "cause"),
    [
        ([error(500), error(503)], "server_error"),
        ([Reply(body=b"{not json at all")], "malformed"),
        ([Reply(body={"object": "chat.completion"})], "malformed"),
        ([Reply(body=chat_body([]))], "empty"),
        ([Reply(body={"choices": [{"index": 0, "message": {"role": "assistant"}}]})], "malformed"),
        ([Reply(body=chat_body(["late"]), delay=1.5)], "timeout"),
    ],
    ids=["5xx", "not-json", "no-choices", "empty-choices", "no-content", "timeout"],
)
def test_transient_failures_are_retried_until_an_answer_comes(
    fake_server: ScriptedOpenAIServer, replies: list[Reply], cause: str
) -> None:
    fake_server.push(*replies)
    config = openai_config(fake_server, max_concurrency=1, timeout=0.5)
    with open_llm(config, cache_path=None, quiet=True) as llm:
        [completion] = llm.run([chat("hello")])
        stats = llm.stats
    assert completion.error is None
    assert completion.text == echo_text(fake_server.requests[-1])
    assert dict(stats.retries) == {cause: len(replies)}
    assert stats.api_calls == len(replies) + 1 and stats.failures == 0


def test_an_answer_cut_at_max_tokens_is_kept_and_counted(
    fake_server: ScriptedOpenAIServer, cache_file: Path
) -> None:
    fake_server.push(Reply(body=chat_body(["cut mid"], finish_reason="length")))
    with open_llm(openai_config(fake_server), cache_path=cache_file, quiet=True) as llm:
        [completion] = llm.run([chat("hello")])
        assert llm.stats.truncated == 1
    assert (completion.text, completion.finish_reason, completion.error) == ("cut mid", "length", None)
    with open_llm(openai_config(fake_server), cache_path=cache_file, quiet=True) as llm:
        [again] = llm.run([chat("hello")])
    assert again.cached and again.finish_reason == "length"


def test_401_stops_the_run_at_once_with_an_actionable_message(fake_server: ScriptedOpenAIServer) -> None:
    fake_server.responder = lambda body: error(401, f"Incorrect API key provided: {TEST_KEY}")
    config = openai_config(fake_server, max_concurrency=1)
    with pytest.raises(LLMError) as caught, open_llm(config, cache_path=None, quiet=True) as llm:
        list(llm.run(prompts(20)))
    message = str(caught.value)
    assert "HTTP 401" in message and TEST_KEY_ENV in message and fake_server.url in message
    assert TEST_KEY not in message
    assert len(fake_server.requests) == 1
    assert caught.value.exit_code == 3


@pytest.mark.parametrize(("status", "hint"), [(404, "llm.model ('fake-model')"), (403, "HTTP 403")])
def test_other_client_errors_are_fatal(fake_server: ScriptedOpenAIServer, status: int, hint: str) -> None:
    fake_server.responder = lambda body: error(status, "model not found")
    with pytest.raises(LLMError, match="model not found") as caught:
        with open_llm(openai_config(fake_server, max_concurrency=1), cache_path=None, quiet=True) as llm:
            list(llm.run(prompts(5)))
    assert hint in str(caught.value)
    assert len(fake_server.requests) == 1


def test_exhausted_retries_become_failure_rows_and_the_run_goes_on(
    fake_server: ScriptedOpenAIServer, cache_file: Path
) -> None:
    def flaky(body: dict) -> Reply:
        if body["messages"][-1]["content"] == "prompt 2":
            return error(500, f"overloaded; your key is {TEST_KEY}")
        return fake_server.echo(body)

    fake_server.responder = flaky
    config = openai_config(fake_server, max_retries=2)
    with open_llm(config, cache_path=cache_file, quiet=True) as llm:
        completions = {c.request.tag: c for c in llm.run(prompts(5))}
        stats = llm.stats
    failed = completions.pop(2)
    assert failed.text is None and failed.finish_reason is None
    assert failed.error is not None and "server_error after 3 attempts" in failed.error
    assert TEST_KEY not in failed.error and "***" in failed.error
    assert all(c.error is None and c.text for c in completions.values())
    assert stats.failures == 1 and stats.retries["server_error"] == 2
    # Failures are not cached: a re-run sends only the failed request.
    sent = len(fake_server.requests)
    fake_server.responder = fake_server.echo
    with open_llm(config, cache_path=cache_file, quiet=True) as llm:
        again = {c.request.tag: c for c in llm.run(prompts(5))}
    assert [b["messages"][-1]["content"] for b in fake_server.requests[sent:]] == ["prompt 2"]
    assert again[2].error is None and not again[2].cached
    assert TEST_KEY.encode() not in cache_file.read_bytes()


def test_unreachable_server_gives_failure_rows_after_retries(api_key: str) -> None:
    class Nowhere:
        url = f"http://127.0.0.1:{free_port()}/v1"

    config = openai_config(Nowhere(), max_retries=1)  # type: ignore[arg-type]
    with open_llm(config, cache_path=None, quiet=True) as llm:
        [completion] = llm.run([chat("hello")])
        assert llm.stats.retries == {"connection": 1}
    assert completion.error is not None and completion.error.startswith("connection after 2 attempts")


def test_samples_of_one_prompt_share_a_call_when_n_is_above_one(fake_server: ScriptedOpenAIServer) -> None:
    requests = [chat("a", sample_index=i, tag=("a", i)) for i in range(3)]
    requests += [chat("b", sample_index=i, tag=("b", i)) for i in range(3)]
    config = openai_config(fake_server, n=3, seed=5)
    with open_llm(config, cache_path=None, quiet=True) as llm:
        completions = {c.request.tag: c for c in llm.run(requests)}
    assert sorted(b["n"] for b in fake_server.requests) == [3, 3]
    assert all(b["seed"] == derive_seed(5, 0) for b in fake_server.requests)
    for prompt in "ab":
        texts = [completions[(prompt, i)].text for i in range(3)]
        assert texts == [f"echo: {prompt} [seed {derive_seed(5, 0)} choice {i}]" for i in range(3)]
    assert len({c.key for c in completions.values()}) == 6


def test_missing_samples_are_requested_again_when_the_server_ignores_n(api_key: str) -> None:
    requests = [chat(p, sample_index=i, tag=(p, i)) for p in "abc" for i in range(3)]
    with ScriptedOpenAIServer(max_n=1) as server:
        config = openai_config(server, n=3, max_concurrency=1)
        with open_llm(config, cache_path=None, quiet=True) as llm:
            completions = {c.request.tag: c for c in llm.run(requests)}
            stats = llm.stats
    assert len(completions) == 9 and all(c.error is None for c in completions.values())
    # Each sample was answered with its own seed, so the answers differ.
    for p in "abc":
        assert len({completions[(p, i)].text for i in range(3)}) == 3
    # The first call asked for 3 and got 1; from then on the backend asks for what the server gives.
    assert [b.get("n", 1) for b in server.requests] == [3] + [1] * 8
    assert stats.retries["fewer_samples"] == 2


def test_seeds_follow_llm_seed_and_sample_index() -> None:
    seeds = {derive_seed(s, i) for s in range(3) for i in range(3)}
    assert len(seeds) == 9
    assert derive_seed(1, 0) != derive_seed(0, 1)
    assert all(0 <= s < 2**31 for s in seeds)


def test_requests_per_minute_spaces_the_calls(fake_server: ScriptedOpenAIServer) -> None:
    config = openai_config(fake_server, requests_per_minute=600, max_concurrency=4)
    with open_llm(config, cache_path=None, quiet=True) as llm:
        began = time.monotonic()
        list(llm.run(prompts(4)))
    # At 600 a minute the k-th call cannot leave before k tenths of a second have passed.
    arrivals = sorted(t - began for t in fake_server.times)
    assert len(arrivals) == 4 and all(t >= k * 0.1 for k, t in enumerate(arrivals))


def test_the_openai_backend_needs_a_model_and_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from instraug.config import LLMConfig

    with pytest.raises(LLMError, match="llm.model is required"):
        with open_llm(LLMConfig(backend="openai"), cache_path=None):
            pass
    monkeypatch.delenv("INSTRAUG_NO_SUCH_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    config = LLMConfig(backend="openai", model="gpt-4o-mini", api_key_env="INSTRAUG_NO_SUCH_KEY")
    with pytest.raises(LLMError, match="set the environment variable INSTRAUG_NO_SUCH_KEY"):
        with open_llm(config, cache_path=None, quiet=True):
            pass


def test_openai_base_url_from_the_environment_is_honored(
    fake_server: ScriptedOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", fake_server.url)
    config = openai_config(fake_server, base_url=None)
    with open_llm(config, cache_path=None, quiet=True) as llm:
        [completion] = llm.run([chat("via env")])
    assert completion.error is None and len(fake_server.requests) == 1

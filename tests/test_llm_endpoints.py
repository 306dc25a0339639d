"""Several endpoints (llm.base_url as a list) on scripted servers: spreading, setting aside, recovery."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_openai_server import Reply, ScriptedOpenAIServer, echo_text
from llm_fixtures import (  # noqa: F401 - fixtures are found by their name= in this namespace
    TEST_KEY_ENV,
    api_key_fixture,
    cache_file_fixture,
    openai_config,
    prompts,
)

from instraug.config import LLMConfig, load_config
from instraug.errors import ConfigError
from instraug.llm import open_llm
from instraug.llm.cache import ResponseCache
from instraug.llm.local import free_port


def several(urls: list[str], **overrides: Any) -> LLMConfig:
    """The openai backend on these endpoints, with fast retries and health checks."""

    class First:
        url = urls[0]

    settings: dict[str, Any] = {"base_url": urls, "endpoint_cooldown": 0.3, **overrides}
    return openai_config(First(), **settings)  # type: ignore[arg-type]


@pytest.fixture(name="servers")
def servers_fixture(api_key: str) -> Iterator[list[ScriptedOpenAIServer]]:
    """Three scripted servers, each answering after 20 ms."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(ScriptedOpenAIServer(delay=0.02)) for _ in range(3)]


class Gauge:
    """A responder that counts the requests a server is answering at once."""

    def __init__(self, server: ScriptedOpenAIServer, delay: float) -> None:
        self.server, self.delay = server, delay
        self.now = self.peak = 0
        self._lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        time.sleep(self.delay)
        with self._lock:
            self.now -= 1
        return self.server.echo(body)


def server_error(body: dict[str, Any]) -> Reply:
    return Reply(status=500, body={"error": {"message": "scripted outage"}})


def nowhere() -> str:
    """A URL nobody listens on."""
    return f"http://127.0.0.1:{free_port()}/v1"


def test_requests_are_spread_with_max_concurrency_on_each_endpoint(
    servers: list[ScriptedOpenAIServer],
) -> None:
    gauges = [Gauge(server, 0.05) for server in servers]
    for server, gauge in zip(servers, gauges, strict=True):
        server.responder = gauge
    config = several([s.url for s in servers], max_concurrency=3)
    with open_llm(config, cache_path=None, quiet=True) as llm:
        completions = list(llm.run(prompts(45)))
        stats = llm.stats
    assert sorted(c.request.tag for c in completions) == list(range(45))
    assert all(c.error is None for c in completions)
    counts = [len(s.requests) for s in servers]
    assert sum(counts) == 45 and min(counts) >= 10, counts
    # max_concurrency is per endpoint: each was used up to it, never beyond.
    assert [g.peak for g in gauges] == [3, 3, 3]
    assert stats.endpoints == {
        s.url: {"requests": n, "failed_calls": 0, "set_aside": 0}
        for s, n in zip(servers, counts, strict=True)
    }
    assert stats.as_dict()["endpoints"] == stats.endpoints
    for server, n in zip(servers, counts, strict=True):
        assert f"{server.url} answered {n}" in stats.summary()
    # Each endpoint's health was checked once, before the first request.
    assert [len(s.models_checks) for s in servers] == [1, 1, 1]
    assert all(s.models_checks[0] <= s.times[0] for s in servers)


def test_answers_and_cache_keys_are_those_of_one_endpoint(
    servers: list[ScriptedOpenAIServer], tmp_path: Path
) -> None:
    single, spread = tmp_path / "single.sqlite", tmp_path / "spread.sqlite"
    with open_llm(openai_config(servers[0]), cache_path=single, quiet=True) as llm:
        one = {c.request.tag: (c.key, c.text) for c in llm.run(prompts(12))}
    config = several([s.url for s in servers])
    with open_llm(config, cache_path=spread, quiet=True) as llm:
        many = {c.request.tag: (c.key, c.text) for c in llm.run(prompts(12))}
    assert all(len(s.requests) > 0 for s in servers[1:])
    assert many == one
    with ResponseCache(single) as a, ResponseCache(spread) as b:
        assert a.keys() == b.keys() == {key for key, _ in one.values()}
    # The endpoint is not part of the key: the several-endpoint config finds the single run's answers.
    sent = [len(s.requests) for s in servers]
    with open_llm(config, cache_path=single, quiet=True) as llm:
        again = list(llm.run(prompts(12)))
        assert llm.stats.requests_sent == 0
    assert all(c.cached for c in again) and [len(s.requests) for s in servers] == sent


@pytest.mark.parametrize("fault", ["refused", "unhealthy"])
def test_an_endpoint_down_from_the_start_is_set_aside_and_its_share_goes_elsewhere(
    servers: list[ScriptedOpenAIServer], fault: str
) -> None:
    if fault == "refused":
        down = nowhere()
    else:  # it listens, but its health check says it is in trouble
        servers[2].models_reply = Reply(status=503, body={"error": {"message": "loading"}})
        down = servers[2].url
    urls = [servers[0].url, down, servers[1].url]
    with open_llm(several(urls), cache_path=None, quiet=True) as llm:
        completions = list(llm.run(prompts(20)))
        stats = llm.stats
    assert all(c.error is None for c in completions) and len(completions) == 20
    assert len(servers[0].requests) + len(servers[1].requests) == 20
    assert len(servers[2].requests) == 0
    assert stats.endpoints[down] == {"requests": 0, "failed_calls": 0, "set_aside": 1}
    assert stats.failures == 0 and sum(stats.retries.values()) == 0
    assert f"{down} answered 0 (set aside 1x)" in stats.summary()


def test_an_endpoint_failing_mid_run_is_set_aside_then_used_again_after_its_cool_down(
    servers: list[ScriptedOpenAIServer],
) -> None:
    good, flaky = servers[0], servers[1]
    config = several([good.url, flaky.url], max_concurrency=2, endpoint_max_failures=2, endpoint_cooldown=0.4)
    with open_llm(config, cache_path=None, quiet=True) as llm:
        first = list(llm.run(prompts(10, "before")))
        answered_before = len(flaky.requests)
        assert answered_before > 0 and llm.stats.endpoints[flaky.url]["set_aside"] == 0

        # The flaky endpoint starts failing: its calls, and its health check, answer 500 / 503.
        flaky.responder = server_error
        flaky.models_reply = Reply(status=503, body={"error": {"message": "down"}})
        broke = time.monotonic()
        during = list(llm.run(prompts(20, "during")))
        counts = dict(llm.stats.endpoints[flaky.url])
        failed_times = [t for t in flaky.times if t >= broke]

        # It recovers; the next cool-down's health check finds it, and it takes requests again.
        flaky.responder = flaky.echo
        flaky.models_reply = None
        fixed = time.monotonic()
        while not [t for t in flaky.models_checks if t > fixed]:
            assert time.monotonic() < fixed + 5, "no health check after the cool-down"
            time.sleep(0.05)
        time.sleep(0.1)
        back = len(flaky.requests)
        after = list(llm.run(prompts(20, "after")))
        stats = llm.stats
    assert all(c.error is None for c in first + during + after)
    # Every request the flaky endpoint failed was answered by the good one, none failed.
    assert counts["set_aside"] == 1 and counts["failed_calls"] == len(failed_times) >= 2
    assert counts["requests"] == answered_before
    assert stats.failures == 0 and stats.retries["server_error"] == len(failed_times)
    # Set aside: no call reached it until a health check after the cool-down said it was back.
    checks_after = [t for t in flaky.models_checks if t > broke]
    assert checks_after and min(checks_after) - max(failed_times) >= 0.4
    assert len(flaky.requests) > back, "the recovered endpoint took no requests"
    assert stats.endpoints[flaky.url]["requests"] == len(flaky.requests) - len(failed_times)


def test_a_hung_endpoint_s_in_flight_requests_are_answered_by_another(
    servers: list[ScriptedOpenAIServer],
) -> None:
    hung = servers[1]
    hung.responder = lambda body: Reply(body=b"{}", delay=2.0)
    config = several([servers[0].url, hung.url], max_concurrency=2, timeout=0.3, endpoint_max_failures=2)
    with open_llm(config, cache_path=None, quiet=True) as llm:
        completions = list(llm.run(prompts(12)))
        stats = llm.stats
    assert all(c.error is None for c in completions) and len(completions) == 12
    assert 2 <= len(hung.requests) <= 3  # its first calls time out; then it is set aside
    assert stats.endpoints[hung.url] == {"requests": 0, "failed_calls": len(hung.requests), "set_aside": 1}
    assert len(servers[0].requests) == 12
    for c in completions:
        body = next(
            b for b in servers[0].requests if b["messages"][-1]["content"] == c.request.messages[0][1]
        )
        assert c.text == echo_text(body)


def test_when_every_endpoint_is_down_requests_fail_and_the_run_reports_it(api_key: str) -> None:
    urls = [nowhere(), nowhere()]
    with open_llm(several(urls, max_retries=2), cache_path=None, quiet=True) as llm:
        completions = list(llm.run(prompts(3)))
        error = llm.unreachable_error()
        stats = llm.stats
    assert all(c.error is not None and c.error.startswith("connection after 3 attempts") for c in completions)
    assert error is not None and error.exit_code == 3
    assert f"cannot reach {urls[0]}, {urls[1]}: 3 of 3 requests failed to connect" in str(error)
    # The last endpoint in use is never set aside: one stays, and takes the retries.
    assert sum(counts["set_aside"] for counts in stats.endpoints.values()) == 1
    assert sum(counts["failed_calls"] for counts in stats.endpoints.values()) == 9


def test_one_endpoint_keeps_the_single_endpoint_summary(servers: list[ScriptedOpenAIServer]) -> None:
    with open_llm(openai_config(servers[0]), cache_path=None, quiet=True) as llm:
        list(llm.run(prompts(3)))
        stats = llm.stats
    assert "endpoints" not in stats.as_dict() and stats.endpoints == {}
    assert servers[0].models_checks == []  # no health check with one endpoint


def test_base_url_list_in_a_config(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("llm:\n  backend: openai\n  model: m\n  base_url: [http://a:1/v1, http://b:2/v1]\n")
    assert load_config(path).llm.base_url == ["http://a:1/v1", "http://b:2/v1"]
    for value, reason in [
        ("[]", "must name at least one URL"),
        ("[http://a:1/v1, http://a:1/v1]", "names http://a:1/v1 twice"),
        ("[http://a:1/v1, 3]", "item 1 must be a URL"),
        ("{a: 1}", "must be a URL or a list of URLs"),
    ]:
        path.write_text(f"llm:\n  backend: openai\n  model: m\n  base_url: {value}\n")
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert str(caught.value) == f"{path}:4: llm.base_url: {reason}"


def test_a_url_s_credentials_never_show(servers: list[ScriptedOpenAIServer]) -> None:
    host = servers[0].url.removeprefix("http://")
    secret_url = f"http://user:{TEST_KEY_ENV}-pw@{host}"
    with open_llm(several([secret_url, servers[1].url]), cache_path=None, quiet=True) as llm:
        list(llm.run(prompts(6)))
        stats = llm.stats
    assert list(stats.endpoints) == [servers[0].url, servers[1].url]
    assert "-pw" not in stats.summary() and "-pw" not in llm.backend.base_url  # type: ignore[attr-defined]


def test_retry_after_pauses_only_the_endpoint_that_asked(servers: list[ScriptedOpenAIServer]) -> None:
    paused, other = servers[0], servers[1]
    paused.push(Reply(status=429, body={"error": {"message": "slow down"}}, headers={"Retry-After": "1"}))
    config = several([paused.url, other.url], max_concurrency=2)
    with open_llm(config, cache_path=None, quiet=True) as llm:
        completions = list(llm.run(prompts(150)))  # the other one alone needs 1.5 s for them
        stats = llm.stats
    assert all(c.error is None for c in completions) and stats.retries == {"rate_limit": 1}
    asked = paused.times[0]
    # While the endpoint waits out its Retry-After, the other one goes on answering ...
    assert sum(1 for t in other.times if asked < t < asked + 0.9) >= 10
    # ... and no call reaches the paused one before its second is up.
    assert not [t for t in paused.times if asked + 0.05 < t < asked + 0.95]
    assert paused.times[-1] > asked + 0.95  # then it is used again

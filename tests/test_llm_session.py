"""LLMSession over a queue-driven backend: cache hits, offline mode, duplicates, rounds, clean-up."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest
from llm_fixtures import (  # noqa: F401 - fixtures are found by their name= in this namespace
    QueueBackend,
    cache_file_fixture,
    chat,
    prompts,
    queue_backend_fixture,
)

from instraug.config import LLMConfig
from instraug.errors import CacheMissError, LLMError
from instraug.llm import EXIT_COMPLETED_WITH_FAILURES, count_cached, open_llm
from instraug.llm.base import BACKENDS, RunStats

QUEUE = LLMConfig(backend="queue")


def llm_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "instraug-llm"]


def test_unknown_backend_names_the_known_ones() -> None:
    with pytest.raises(LLMError) as caught:
        with open_llm(LLMConfig(backend="gpt5-turbo"), cache_path=None):
            pass
    assert str(caught.value) == "unknown llm.backend 'gpt5-turbo'; known backends: local, openai"
    assert {"local", "openai"} <= set(BACKENDS)


def test_cached_requests_are_not_sent_again(queue_backend: type[QueueBackend], cache_file: Path) -> None:
    with open_llm(QUEUE, cache_path=cache_file, quiet=True) as llm:
        first = {c.request.tag: (c.text, c.key) for c in llm.run(prompts(3))}
    with open_llm(QUEUE, cache_path=cache_file, quiet=True) as llm:
        second = list(llm.run(prompts(5)))
        stats = llm.stats
    assert len(queue_backend.sent) == 5
    assert [r.tag for r in queue_backend.sent[3:]] == [3, 4]
    assert {c.request.tag: (c.text, c.key) for c in second if c.cached} == first
    assert (stats.requests, stats.cache_hits, stats.requests_sent) == (5, 3, 2)


def test_failures_are_counted_and_not_cached(queue_backend: type[QueueBackend], cache_file: Path) -> None:
    queue_backend.answers.extend(["fine", None])
    with open_llm(QUEUE, cache_path=cache_file, quiet=True) as llm:
        completions = {c.request.tag: c for c in llm.run(prompts(2))}
        assert llm.stats.failures == 1
    assert completions[1].text is None and completions[1].error == "scripted failure"
    with open_llm(QUEUE, cache_path=cache_file, quiet=True) as llm:
        again = {c.request.tag: c for c in llm.run(prompts(2))}
    assert again[0].cached and not again[1].cached
    assert [r.tag for r in queue_backend.sent] == [0, 1, 1]
    assert EXIT_COMPLETED_WITH_FAILURES == 4


def test_offline_answers_from_the_cache_and_never_starts_the_backend(
    queue_backend: type[QueueBackend], cache_file: Path
) -> None:
    with open_llm(QUEUE, cache_path=cache_file, quiet=True) as llm:
        list(llm.run(prompts(2)))
    assert queue_backend.started == 1
    with open_llm(QUEUE, cache_path=cache_file, offline=True, quiet=True) as llm:
        assert [c.cached for c in llm.run(prompts(2))] == [True, True]
        with pytest.raises(CacheMissError) as caught:
            list(llm.run([chat("never asked before")]))
    assert queue_backend.started == 1 and len(queue_backend.sent) == 2
    message = str(caught.value)
    assert str(cache_file) in message and "'never asked before'" in message and "--offline" in message
    assert caught.value.exit_code == 3


def test_count_cached_counts_what_a_session_would_find_and_sends_nothing(
    queue_backend: type[QueueBackend], cache_file: Path
) -> None:
    assert count_cached(cache_file, QUEUE, prompts(5)) == 0
    assert not cache_file.exists()  # counting creates no cache
    with open_llm(QUEUE, cache_path=cache_file, quiet=True) as llm:
        list(llm.run(prompts(3)))
    sent = len(queue_backend.sent)
    assert count_cached(cache_file, QUEUE, prompts(5)) == 3
    assert count_cached(cache_file, QUEUE, [chat("prompt 0", sample_index=1)]) == 0
    assert count_cached(cache_file, QUEUE.model_copy(update={"seed": QUEUE.seed + 1}), prompts(5)) == 0
    # The model in the keys is the one the backend resolves: the queue backend's default name here.
    assert count_cached(cache_file, QUEUE.model_copy(update={"model": "queue-model"}), prompts(5)) == 3
    assert count_cached(cache_file, QUEUE.model_copy(update={"model": "other-model"}), prompts(5)) == 0
    assert len(queue_backend.sent) == sent and queue_backend.started == 1
    with open_llm(QUEUE, cache_path=cache_file, quiet=True) as llm:
        list(llm.run(prompts(5)))
        assert llm.stats.cache_hits == 3


def test_offline_without_a_cache_is_an_error(queue_backend: type[QueueBackend]) -> None:
    with pytest.raises(CacheMissError, match="no cache path"):
        with open_llm(QUEUE, cache_path=None, offline=True):
            pass


def test_identical_requests_are_sent_once_and_answered_for_each_asker(
    queue_backend: type[QueueBackend],
) -> None:
    with open_llm(QUEUE, cache_path=None, quiet=True) as llm:
        completions = list(llm.run([chat("same", tag="first"), chat("same", tag="second")]))
        stats = llm.stats
    assert len(queue_backend.sent) == 1
    assert sorted(c.request.tag for c in completions) == ["first", "second"]
    assert completions[0].text == completions[1].text and completions[0].key == completions[1].key
    assert (stats.requests, stats.requests_sent) == (2, 1)


def test_a_session_serves_many_rounds_even_after_one_is_abandoned(
    queue_backend: type[QueueBackend],
) -> None:
    with open_llm(QUEUE, cache_path=None, quiet=True) as llm:
        for completion in llm.run(prompts(50, "abandoned")):
            assert completion.text
            break
        assert [c.request.tag for c in llm.run(prompts(3))] == [0, 1, 2]
        assert len(list(llm.run(prompts(4, "third")))) == 4
        assert len(llm_threads()) == 1
    assert llm_threads() == []


def test_an_error_inside_the_block_stops_everything(queue_backend: type[QueueBackend]) -> None:
    with pytest.raises(RuntimeError, match="caller bug"), open_llm(QUEUE, cache_path=None, quiet=True) as llm:
        list(llm.run(prompts(2)))
        raise RuntimeError("caller bug")
    assert queue_backend.stopped == 1 and llm_threads() == []


def test_a_backend_error_reaches_the_caller_and_the_session_stays_usable(
    queue_backend: type[QueueBackend],
) -> None:
    queue_backend.answers.extend(["ok", LLMError("server gone")])
    with open_llm(QUEUE, cache_path=None, quiet=True) as llm:
        with pytest.raises(LLMError, match="server gone"):
            list(llm.run(prompts(3)))
        assert len(list(llm.run(prompts(2, "after")))) == 2


def test_sigterm_unwinds_only_while_the_session_is_open(queue_backend: type[QueueBackend]) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with open_llm(QUEUE, cache_path=None, quiet=True):
        assert signal.getsignal(signal.SIGTERM) is not before
        with pytest.raises(SystemExit) as caught:
            signal.raise_signal(signal.SIGTERM)
        assert caught.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_progress_and_summary_go_to_stderr_unless_quiet(
    queue_backend: type[QueueBackend], capsys: pytest.CaptureFixture[str]
) -> None:
    with open_llm(QUEUE, cache_path=None) as llm:
        list(llm.run(prompts(3)))
    out, err = capsys.readouterr()
    assert out == ""
    assert "LLM: 3 requests, 0 cached, 3 sent (3 API calls), 0 retries, 0 failed" in err
    with open_llm(QUEUE, cache_path=None, quiet=True) as llm:
        list(llm.run(prompts(3)))
    assert capsys.readouterr() == ("", "")


def test_stats_summary_reports_retries_failures_and_cost() -> None:
    stats = RunStats(price_per_1k_input=0.5, price_per_1k_output=2.0)
    stats.requests, stats.cache_hits, stats.requests_sent, stats.api_calls = 10, 4, 6, 9
    stats.retries.update({"rate_limit": 2, "timeout": 1})
    stats.failures, stats.prompt_tokens, stats.completion_tokens = 1, 2000, 500
    assert stats.cost == pytest.approx(2.0)
    assert stats.summary() == (
        "LLM: 10 requests, 4 cached, 6 sent (9 API calls), 3 retries (rate_limit 2, timeout 1), "
        "1 failed, tokens in/out 2000/500, cost 2.0000"
    )
    assert stats.as_dict()["retries"] == {"rate_limit": 2, "timeout": 1}
    assert RunStats().cost is None

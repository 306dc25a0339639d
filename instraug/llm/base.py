"""A chat request and its identity (the cache key), the backend interface, and its name registry.

A backend takes chat requests and yields completions as they arrive; the key of a request is the
sha256 of the canonical JSON of everything that determines its answer.
"""

from __future__ import annotations

import abc
import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from instraug.errors import LLMError
from instraug.sqlite import key_of

if TYPE_CHECKING:
    from instraug.config import LLMConfig


@dataclass(frozen=True)
class Constraint:
    """Decoding restricted by the server: a GBNF grammar (llama.cpp) or a regular expression (vLLM)."""

    kind: Literal["grammar", "regex"]
    text: str

    def body(self) -> dict[str, Any]:
        """The fields of the HTTP request body that ask the server for it."""
        if self.kind == "grammar":  # llama.cpp's server and llama-cpp-python's
            return {"grammar": self.text}
        # vLLM: structured_outputs since 0.10.2, guided_regex before 0.12; each reads the one it knows
        return {"structured_outputs": {"regex": self.text}, "guided_regex": self.text}


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion to ask for: the messages, the sampling settings and which sample it is."""

    messages: tuple[tuple[str, str], ...]
    temperature: float
    top_p: float
    max_tokens: int
    stop: tuple[str, ...] = ()
    sample_index: int = 0
    tag: Any = field(default=None, compare=False, hash=False)
    constraint: Constraint | None = None

    def same_prompt(self, other: ChatRequest) -> bool:
        """True when the two differ only in sample index (and tag)."""
        return (
            self.messages == other.messages
            and self.temperature == other.temperature
            and self.top_p == other.top_p
            and self.max_tokens == other.max_tokens
            and self.stop == other.stop
            and self.constraint == other.constraint
        )


def keyed_fields(model: str, request: ChatRequest, seed: int) -> dict[str, Any]:
    """Everything that determines a response, and nothing else (a constraint only when there is one,
    so that the keys of unconstrained requests never change)."""
    fields: dict[str, Any] = {
        "model": model,
        "messages": [[role, content] for role, content in request.messages],
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_tokens": request.max_tokens,
        "stop": list(request.stop),
        "seed": seed,
        "sample_index": request.sample_index,
    }
    if request.constraint is not None:
        fields["constraint"] = {"kind": request.constraint.kind, "text": request.constraint.text}
    return fields


def request_key(model: str, request: ChatRequest, seed: int) -> str:
    """The cache key of one request sent to `model` with `seed`."""
    return key_of(keyed_fields(model, request, seed))


def derive_seed(seed: int, sample_index: int) -> int:
    """The per-sample seed sent with a request: stable, and distinct across (seed, sample index)."""
    digest = hashlib.sha256(f"{seed}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass
class Completion:
    """The answer to one ChatRequest; `text` is None and `error` says why when it failed."""

    request: ChatRequest
    key: str
    model: str
    text: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    error: str | None = None

    @classmethod
    def failure(cls, request: ChatRequest, key: str, model: str, error: str) -> Completion:
        """A request that got no answer, with why."""
        return cls(request, key, model, None, None, 0, 0, False, error)


@dataclass
class RunStats:
    """What a session did: requests, cache hits, retries by cause, failures, tokens and cost."""

    price_per_1k_input: float | None = None
    price_per_1k_output: float | None = None
    requests: int = 0
    cache_hits: int = 0
    requests_sent: int = 0
    api_calls: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    failures: int = 0
    truncated: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: With several endpoints: per endpoint, requests answered, failed calls and times set aside.
    endpoints: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def cost(self) -> float | None:
        """Spent on the requests sent, when prices are configured."""
        from instraug.funnel import cost

        prices = (self.price_per_1k_input, self.price_per_1k_output)
        return cost(self.prompt_tokens, self.completion_tokens, *prices)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready numbers."""
        data: dict[str, Any] = {
            "requests": self.requests,
            "cache_hits": self.cache_hits,
            "requests_sent": self.requests_sent,
            "api_calls": self.api_calls,
            "retries": dict(sorted(self.retries.items())),
            "failures": self.failures,
            "truncated": self.truncated,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost": self.cost,
        }
        if self.endpoints:
            data["endpoints"] = {url: dict(counts) for url, counts in self.endpoints.items()}
        return data

    def summary(self) -> str:
        """One line for people."""
        retries = sum(self.retries.values())
        causes = ", ".join(f"{cause} {n}" for cause, n in sorted(self.retries.items()))
        parts = [
            f"{self.requests} requests",
            f"{self.cache_hits} cached",
            f"{self.requests_sent} sent ({self.api_calls} API calls)",
            f"{retries} retries" + (f" ({causes})" if causes else ""),
            f"{self.failures} failed",
            f"tokens in/out {self.prompt_tokens}/{self.completion_tokens}",
        ]
        if self.truncated:
            parts.append(f"{self.truncated} cut at max_tokens")
        for url, counts in self.endpoints.items():
            trouble = [f"{counts['failed_calls']} failed calls"] if counts["failed_calls"] else []
            trouble += [f"set aside {counts['set_aside']}x"] if counts["set_aside"] else []
            parts.append(
                f"{url} answered {counts['requests']}" + (f" ({', '.join(trouble)})" if trouble else "")
            )
        if self.cost is not None:
            parts.append(f"cost {self.cost:.4f}")
        return "LLM: " + ", ".join(parts)


class Backend(abc.ABC):
    """Turns chat requests into completions; one instance serves a whole session."""

    name: ClassVar[str]

    def __init__(self, config: LLMConfig, stats: RunStats, *, quiet: bool = False) -> None:
        self.config = config
        self.stats = stats
        self.quiet = quiet
        self.model = self.resolve_model(config)

    @classmethod
    @abc.abstractmethod
    def resolve_model(cls, config: LLMConfig) -> str:
        """The model name that goes into cache keys, known without starting anything."""

    def start(self) -> None:  # noqa: B027 - optional hook
        """Blocking set-up before the first request (start a server, check settings)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release what lives on the event loop (HTTP connections)."""

    def stop(self) -> None:  # noqa: B027 - optional hook
        """Blocking tear-down after the event loop has stopped (stop a server)."""

    @abc.abstractmethod
    def complete(self, requests: Sequence[ChatRequest]) -> AsyncIterator[Completion]:
        """Answer every request exactly once, yielding completions in the order they finish."""

    def seed_for(self, request: ChatRequest) -> int:
        """The seed this backend sends for the request."""
        return derive_seed(self.config.seed, request.sample_index)

    def keyed_fields(self, request: ChatRequest) -> dict[str, Any]:
        """What determines this backend's answer to the request."""
        return keyed_fields(self.model, request, self.seed_for(request))

    def key_for(self, request: ChatRequest) -> str:
        """The request's cache key for this backend."""
        return key_of(self.keyed_fields(request))


B = TypeVar("B", bound=type[Backend])

#: Backend name (the `llm.backend` config value) -> class.
BACKENDS: dict[str, type[Backend]] = {}


def register_backend(name: str) -> Callable[[B], B]:
    """Class decorator: make a backend available as `llm.backend: <name>`."""

    def register(cls: B) -> B:
        cls.name = name
        BACKENDS[name] = cls
        return cls

    return register


def get_backend(name: str) -> type[Backend]:
    """The backend class registered under `name`; an unknown name lists the known ones."""
    try:
        return BACKENDS[name]
    except KeyError:
        known = ", ".join(sorted(BACKENDS)) or "none"
        raise LLMError(f"unknown llm.backend '{name}'; known backends: {known}") from None

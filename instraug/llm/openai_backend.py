"""Any OpenAI-compatible server(s): the one place that builds the client; bounded concurrency, retries.

`llm.base_url` may list several endpoints serving the same model: one client each, `max_concurrency`
requests in flight on each, spread and set aside by llm/endpoints.py.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from instraug.errors import LLMError
from instraug.llm.base import Backend, ChatRequest, Completion, RunStats, register_backend
from instraug.llm.endpoints import COUNTERS, Endpoint, EndpointPool, endpoint_name
from instraug.llm.responses import (
    MAX_RETRY_AFTER,
    RejectedRequest,
    RetryableError,
    WaitRetryAfterOrBackoff,
    is_context_overflow,
    parse_choices,
    retry_after_seconds,
    server_message,
    token_count,
)

if TYPE_CHECKING:
    from openai import APIStatusError, AsyncOpenAI

    from instraug.config import LLMConfig

#: Sent when no key is set and the server is not api.openai.com (vLLM, Ollama, llama.cpp ignore it).
PLACEHOLDER_KEY = "no-key"
_RETRY_STATUS = frozenset({408, 409, 429})
#: Failures that say the endpoint, not the request, is in trouble: counted towards setting it aside.
_ENDPOINT_FAILURES = frozenset({"connection", "timeout", "server_error"})
#: Longest wait for an endpoint's health check (/v1/models).
_HEALTH_TIMEOUT = 10.0


def build_client(*, base_url: str | None, api_key: str, timeout: float, connections: int) -> AsyncOpenAI:
    """The AsyncOpenAI client; its own retries are off because tenacity owns them."""
    import openai

    limits = type(openai.DEFAULT_CONNECTION_LIMITS)(
        max_connections=max(connections, 1000), max_keepalive_connections=max(connections, 100)
    )
    return openai.AsyncOpenAI(
        base_url=base_url,
        api_key=api_key,
        timeout=timeout,
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout),
    )


def group_samples(requests: Sequence[ChatRequest], size: int) -> Iterator[list[ChatRequest]]:
    """Runs of up to `size` requests for the same prompt with consecutive sample indices."""
    group: list[ChatRequest] = []
    for request in requests:
        if (
            group
            and len(group) < size
            and request.sample_index == group[-1].sample_index + 1
            and request.same_prompt(group[-1])
        ):
            group.append(request)
            continue
        if group:
            yield group
        group = [request]
    if group:
        yield group


@register_backend("openai")
class OpenAIBackend(Backend):
    """Chat completions from an OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp ...)."""

    def __init__(self, config: LLMConfig, stats: RunStats, *, quiet: bool = False) -> None:
        super().__init__(config, stats, quiet=quiet)
        configured = config.base_url
        self.base_urls: list[str | None] = (
            list(configured)
            if isinstance(configured, list)
            else [configured or os.environ.get("OPENAI_BASE_URL") or None]
        )
        self._api_key = ""
        self._pool: EndpointPool | None = None
        self._group_size = config.n
        self._interval = 60.0 / config.requests_per_minute if config.requests_per_minute else 0.0
        self._next_slot = 0.0

    @property
    def base_url(self) -> str | None:
        """The endpoint (several: joined by commas); None means OpenAI's API."""
        if self.base_urls == [None]:
            return None
        return ", ".join(endpoint_name(url) for url in self.base_urls)

    @base_url.setter
    def base_url(self, url: str | None) -> None:
        self.base_urls = [url]

    @classmethod
    def resolve_model(cls, config: LLMConfig) -> str:
        if not config.model:
            raise LLMError("llm.model is required for the openai backend (for example gpt-4o-mini)")
        return config.model

    def start(self) -> None:
        self._api_key = os.environ.get(self.config.api_key_env, "")
        if not self._api_key:
            if self.base_url is None:
                raise LLMError(
                    f"no API key: set the environment variable {self.config.api_key_env} "
                    "(llm.api_key_env names the variable), or set llm.base_url for a local server"
                )
            self._api_key = PLACEHOLDER_KEY

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None

    async def _endpoints(self) -> EndpointPool:
        """The endpoints, each with its client; on first use, those failing health are set aside."""
        if self._pool is None:
            several = len(self.base_urls) > 1
            endpoints = []
            for url in self.base_urls:
                client = build_client(
                    base_url=url,
                    api_key=self._api_key or PLACEHOLDER_KEY,
                    timeout=self.config.timeout,
                    connections=self.config.max_concurrency,
                )
                endpoint = Endpoint(url, client)
                if several:  # the summary shows requests per endpoint
                    endpoint.counts = self.stats.endpoints.setdefault(
                        endpoint.name, dict.fromkeys(COUNTERS, 0)
                    )
                endpoints.append(endpoint)
            self._pool = EndpointPool(
                endpoints,
                capacity=self.config.max_concurrency,
                max_failures=self.config.endpoint_max_failures,
                cooldown=self.config.endpoint_cooldown,
                healthy=self._healthy,
            )
            await self._pool.check_health()
        return self._pool

    async def _healthy(self, endpoint: Endpoint) -> bool:
        """True when the endpoint answers /v1/models (an error status below 500 still says it is up)."""
        import openai

        try:
            timeout = min(self.config.timeout, _HEALTH_TIMEOUT)
            await endpoint.client.get("/models", cast_to=bytes, options={"timeout": timeout})
        except openai.APIStatusError as exc:
            return exc.status_code < 500
        except openai.APIError:
            return False
        return True

    async def complete(self, requests: Sequence[ChatRequest]) -> AsyncIterator[Completion]:
        if not requests:
            return
        pool = await self._endpoints()
        todo = deque(group_samples(requests, self.config.n))
        results: asyncio.Queue[Completion | BaseException] = asyncio.Queue()

        async def worker() -> None:
            try:
                while todo:
                    group = todo.popleft()
                    if len(group) > self._group_size:
                        todo.appendleft(group[self._group_size :])
                        group = group[: self._group_size]
                    answered, missing = await self._answer(group)
                    for completion in answered:
                        results.put_nowait(completion)
                    if missing:
                        self.stats.retries["fewer_samples"] += len(missing)
                        todo.appendleft(missing)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
                todo.clear()  # a fatal error: start nothing new
                results.put_nowait(exc)

        workers = [asyncio.create_task(worker()) for _ in range(min(pool.slots, len(todo)))]
        try:
            for _ in range(len(requests)):
                item = await results.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _answer(self, group: list[ChatRequest]) -> tuple[list[Completion], list[ChatRequest]]:
        """One API call for a group of samples: the completions it gave, and the samples it did not."""
        first = group[0]
        params: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": role, "content": content} for role, content in first.messages],
            "temperature": first.temperature,
            "top_p": first.top_p,
            "max_tokens": first.max_tokens,
            "seed": self.seed_for(first),
        }
        if first.stop:
            params["stop"] = list(first.stop)
        if first.constraint is not None:
            params.update(first.constraint.body())
        if len(group) > 1:
            params["n"] = len(group)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.config.max_retries + 1),
            wait=WaitRetryAfterOrBackoff(self.config.retry_initial_wait, self.config.retry_max_wait),
            retry=retry_if_exception_type(RetryableError),
            before_sleep=self._count_retry,
            reraise=True,
        )
        failed_on: list[Endpoint] = []  # where each failed attempt went: a retry goes elsewhere if it can
        try:
            async for attempt in retrying:
                with attempt:
                    data, endpoint = await self._post(params, failed_on)
        except RetryableError as exc:
            tries = self.config.max_retries + 1
            return [self._failure(r, f"{exc.cause} after {tries} attempts: {exc}") for r in group], []
        except RejectedRequest as exc:
            return [self._failure(r, str(exc)) for r in group], []

        choices = data["choices"][: len(group)]
        usage = data.get("usage")
        if not isinstance(usage, dict):
            usage = {}
        prompt_tokens = token_count(usage.get("prompt_tokens"))
        completion_tokens = token_count(usage.get("completion_tokens"))
        self.stats.prompt_tokens += prompt_tokens
        self.stats.completion_tokens += completion_tokens
        share, extra = divmod(completion_tokens, len(choices))
        answered = [
            Completion(
                request=request,
                key=self.key_for(request),
                model=self.model,
                text=text,
                finish_reason=finish_reason,
                prompt_tokens=prompt_tokens,
                completion_tokens=share + (extra if i == 0 else 0),
                cached=False,
            )
            for i, (request, (text, finish_reason)) in enumerate(
                zip(group[: len(choices)], choices, strict=True)
            )
        ]
        endpoint.counts["requests"] += len(answered)
        if len(choices) < len(group):
            # The server gives fewer samples per call than asked (llama.cpp, Ollama): ask for fewer.
            self._group_size = max(1, min(self._group_size, len(choices)))
        return answered, group[len(choices) :]

    def _failure(self, request: ChatRequest, error: str) -> Completion:
        return Completion.failure(request, self.key_for(request), self.model, self._scrub(error))

    def _count_retry(self, retry_state: RetryCallState) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        self.stats.retries[exc.cause if isinstance(exc, RetryableError) else "other"] += 1

    async def _throttle(self, endpoint: Endpoint) -> None:
        """Wait for a rate-limit slot (llm.requests_per_minute is for all endpoints together) and for
        any pause the endpoint asked for."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, endpoint.paused_until)
        if self._interval:
            start = max(start, self._next_slot)
            self._next_slot = start + self._interval
        if start > now:
            await asyncio.sleep(start - now)

    async def _post(
        self, params: dict[str, Any], failed_on: list[Endpoint]
    ) -> tuple[dict[str, Any], Endpoint]:
        """One HTTP attempt on an endpoint in use (not the one that failed last, if another has room).

        Every failure becomes RetryableError, RejectedRequest or LLMError; the endpoint's own failures
        (connection, timeout, 5xx) count towards setting it aside, and a retry leaves at once when
        they did.
        """
        assert self._pool is not None
        endpoint = await self._pool.acquire(avoid=failed_on[-1] if failed_on else None)
        try:
            content = await self._send(endpoint, params)
        except RetryableError as exc:
            if exc.cause in _ENDPOINT_FAILURES:
                exc.elsewhere = self._pool.failed(endpoint)
            failed_on.append(endpoint)
            raise
        finally:
            self._pool.release(endpoint)
        self._pool.succeeded(endpoint)
        return parse_choices(content), endpoint

    async def _send(self, endpoint: Endpoint, params: dict[str, Any]) -> bytes:
        """The HTTP request itself, on the endpoint's client."""
        import openai

        await self._throttle(endpoint)
        self.stats.api_calls += 1
        try:
            # The client's documented raw request: its chat.completions.create() would spend more CPU
            # re-typing these plain parameters and building pydantic models than the rest of a request.
            content: bytes = await endpoint.client.post("/chat/completions", body=params, cast_to=bytes)
        except openai.APITimeoutError:
            raise RetryableError("timeout", f"no answer within {self.config.timeout:g} s") from None
        except openai.APIConnectionError as exc:
            server = f"the server at {endpoint.name}" if len(self.base_urls) > 1 else "the server"
            raise self._unreachable(self._scrub(f"cannot reach {server}: {exc.__cause__ or exc}")) from None
        except openai.APIStatusError as exc:
            raise self._status_error(exc, endpoint) from None
        return content

    def _unreachable(self, message: str) -> Exception:
        """What a connection failure means here: worth a retry."""
        return RetryableError("connection", message)

    def _status_error(self, exc: APIStatusError, endpoint: Endpoint) -> Exception:
        status = exc.status_code
        message = self._scrub(server_message(exc))
        where = endpoint.name
        if status in _RETRY_STATUS or status >= 500:
            retry_after = retry_after_seconds(exc.response.headers) if status in (429, 503) else None
            if retry_after is not None and self._pool is not None:
                self._pool.pause(endpoint, min(retry_after, MAX_RETRY_AFTER))
            cause = "rate_limit" if status == 429 else "server_error" if status >= 500 else f"http_{status}"
            return RetryableError(cause, f"HTTP {status}: {message}", retry_after)
        if status == 400 and is_context_overflow(message):
            return RejectedRequest(f"HTTP 400: {message}")
        if status == 401:
            return LLMError(
                f"{where} rejected the API key (HTTP 401: {message}); "
                f"check the environment variable {self.config.api_key_env}"
            )
        if status == 403:
            return LLMError(f"{where} denied access (HTTP 403: {message}); check the key's permissions")
        if status == 404:
            return LLMError(
                f"{where} answered HTTP 404 ({message}); check llm.model ('{self.model}') and llm.base_url"
            )
        return LLMError(
            f"{where} refused the request (HTTP {status}: {message}); "
            "check llm.model and the sampling settings"
        )

    def _scrub(self, text: str) -> str:
        """The text with the API key blanked out, so no message, log or row ever carries it."""
        if self._api_key and self._api_key != PLACEHOLDER_KEY:
            text = text.replace(self._api_key, "***")
        return text

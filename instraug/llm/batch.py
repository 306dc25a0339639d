"""Batch mode (`llm.mode: batch`): a round's uncached requests as OpenAI batches, resumable.

Each round (one `LLMSession.run`) is uploaded with the Files API (purpose `batch`), submitted with
the Batches API (24h window), polled every `llm.batch_poll_interval` seconds, and its output and
error files are read into completions the session caches exactly as online answers. Before waiting,
each batch is recorded in the ledger beside the response cache (llm/batch_ledger.py), so a run that
is killed finds its batches again and collects them instead of submitting anew. Expired or failed
items go again online or in one more batch (`llm.batch_retry`).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from instraug.errors import LLMError
from instraug.funnel import cost as priced
from instraug.llm.base import Backend, ChatRequest, Completion, RunStats
from instraug.llm.batch_files import Answer, ItemFailure, input_line, read_results
from instraug.llm.batch_ledger import BatchLedger
from instraug.llm.endpoints import endpoint_name
from instraug.llm.responses import RetryableError, WaitRetryAfterOrBackoff, server_message

if TYPE_CHECKING:
    from openai import APIStatusError, AsyncOpenAI

    from instraug.config import LLMConfig

T = TypeVar("T")
#: How the session is told about a batch: (text, True for a line of its own / False for the status).
Notify = Callable[[str, bool], None]
#: Statuses after which a batch changes no more.
_FINAL = frozenset({"completed", "failed", "expired", "cancelled"})
#: The metadata key that lets a run find a batch it created but could not record.
_TAG = "instraug_batch"
_RETRY_STATUS = frozenset({408, 409, 429})


def batch_url(config: LLMConfig) -> str | None:
    """The one server batches go to: llm.base_url (a list of one), else $OPENAI_BASE_URL, else OpenAI."""
    configured: Any = config.base_url
    if isinstance(configured, list):
        if len(configured) > 1:
            raise LLMError(
                f"llm.mode: batch submits to one server, but llm.base_url lists {len(configured)}; "
                "name one, or use llm.mode: online to spread requests across them"
            )
        configured = configured[0]
    return configured or os.environ.get("OPENAI_BASE_URL") or None


@dataclass
class BatchRunStats(RunStats):
    """RunStats whose cost prices the tokens of batch answers at `batch_discount` of the online price."""

    batch_discount: float = 1.0
    batch_prompt_tokens: int = 0
    batch_completion_tokens: int = 0
    batches: int = 0  # batches submitted

    def summary(self) -> str:
        return super().summary() + f", {self.batches} batches"

    @property
    def cost(self) -> float | None:
        full = super().cost
        prices = (self.price_per_1k_input, self.price_per_1k_output)
        batch = priced(self.batch_prompt_tokens, self.batch_completion_tokens, *prices)
        if full is None or batch is None:
            return full
        return full - batch * (1.0 - self.batch_discount)


@dataclass
class _Job:
    """A batch being waited for, and the ledger entry that records it."""

    entry: dict[str, Any]
    status: str = "validating"
    completed: int = 0
    failed: int = 0
    total: int = 0
    batch: Any = None

    @property
    def id(self) -> str:
        return str(self.entry.get("batch_id"))


class _Missing(LLMError):
    """The server does not know the object asked for (HTTP 404)."""


@dataclass
class BatchSender:
    """Sends requests as batches: `complete` answers each exactly once, as a backend does."""

    backend: Backend
    ledger: BatchLedger
    notify: Notify = lambda _text, _line: None
    _client: AsyncOpenAI | None = None
    _stash: dict[str, Answer] = field(default_factory=dict)  # answers a collected batch gave early

    @property
    def config(self) -> LLMConfig:
        return self.backend.config

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def complete(self, requests: Sequence[ChatRequest]) -> AsyncIterator[Completion]:
        """Answer every request once: from batches (recorded ones first), then per llm.batch_retry."""
        todo = {self.backend.key_for(r): r for r in requests}
        for key in [k for k in todo if k in self._stash]:
            yield self._answered(todo.pop(key), key, self._stash.pop(key))
        batches = 0
        while todo:
            failures: dict[str, ItemFailure] = {}
            async for key, outcome in self._run_batches(todo):
                if key not in todo:  # a recorded batch answered a request of another round
                    if isinstance(outcome, Answer):
                        self._stash[key] = outcome
                    continue
                if isinstance(outcome, Answer):
                    yield self._answered(todo.pop(key), key, outcome)
                elif not outcome.retryable:
                    yield self._failed(todo.pop(key), key, outcome.message)
                else:
                    failures[key] = outcome
            batches += 1
            if not todo:
                break
            missing = ItemFailure("batch_not_run", "the batch gave no result for it", True)
            causes = Counter(failures.get(key, missing).cause for key in todo)
            self.backend.stats.retries.update(causes)
            if self.config.batch_retry == "online":
                self.notify(f"{len(todo)} requests without an answer ({_listed(causes)}): sent online", True)
                async for completion in self.backend.complete(list(todo.values())):
                    yield completion
                return
            if batches > self.config.max_retries:
                for key, request in todo.items():
                    failure = failures.get(key, missing)
                    yield self._failed(
                        request, key, f"{failure.cause} after {batches} batches: {failure.message}"
                    )
                return
            self.notify(
                f"{len(todo)} requests without an answer ({_listed(causes)}): in one more batch", True
            )

    def _answered(self, request: ChatRequest, key: str, answer: Answer) -> Completion:
        stats = self.backend.stats
        stats.prompt_tokens += answer.prompt_tokens
        stats.completion_tokens += answer.completion_tokens
        if isinstance(stats, BatchRunStats):
            stats.batch_prompt_tokens += answer.prompt_tokens
            stats.batch_completion_tokens += answer.completion_tokens
        return Completion(
            request=request,
            key=key,
            model=self.backend.model,
            text=answer.text,
            finish_reason=answer.finish_reason,
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.completion_tokens,
            cached=False,
        )

    def _failed(self, request: ChatRequest, key: str, error: str) -> Completion:
        return Completion.failure(request, key, self.backend.model, self._scrub(error))

    # -- one pass: recorded batches, new ones, wait, collect ----------------------------------

    async def _run_batches(
        self, todo: dict[str, ChatRequest]
    ) -> AsyncIterator[tuple[str, Answer | ItemFailure]]:
        """Every item of the recorded batches that answer some of `todo`, and of new batches for the rest."""
        url = endpoint_name(batch_url(self.config))
        jobs: list[_Job] = []
        covered: set[str] = set()
        for entry in list(self.ledger.entries):
            if entry.get("base_url") == url and entry.get("model") == self.backend.model:
                if not covered.isdisjoint(entry["keys"]) or todo.keys().isdisjoint(entry["keys"]):
                    continue
                job = await self._resume(entry)
                if job is not None:
                    jobs.append(job)
                    covered.update(entry["keys"])
        rest = [key for key in todo if key not in covered]
        size = self.config.batch_max_requests
        for start in range(0, len(rest), size):
            jobs.append(await self._submit([todo[key] for key in rest[start : start + size]], url))
        async for item in self._wait(jobs):
            yield item

    async def _submit(self, requests: list[ChatRequest], url: str) -> _Job:
        """Upload one input file, record it, create its batch, record the batch id."""
        client = self._api()
        data = b"".join(input_line(self.backend, request) for request in requests)
        upload = await self._call(
            "uploading a batch file",
            lambda: client.files.create(
                file=("instraug-batch.jsonl", data, "application/jsonl"), purpose="batch"
            ),
        )
        entry = {
            "tag": uuid.uuid4().hex,
            "base_url": url,
            "model": self.backend.model,
            "input_file_id": upload.id,
            "batch_id": None,
            "requests": len(requests),
            "submitted": round(time.time(), 3),
            "keys": [self.backend.key_for(request) for request in requests],
        }
        self.ledger.add(entry)  # before the batch exists: a run killed now finds it by its tag
        await self._create(entry)
        self.notify(
            f"batch {entry['batch_id']} submitted: {len(requests)} requests"
            + (f", recorded in {self.ledger.path}" if self.ledger.path else ""),
            True,
        )
        return _Job(entry, total=len(requests))

    async def _create(self, entry: dict[str, Any]) -> None:
        client = self._api()
        batch = await self._call(
            "creating a batch",
            lambda: client.batches.create(
                input_file_id=entry["input_file_id"],
                endpoint="/v1/chat/completions",
                completion_window="24h",
                metadata={_TAG: entry["tag"]},
            ),
        )
        self.ledger.update(entry, batch_id=batch.id)
        if isinstance(self.backend.stats, BatchRunStats):
            self.backend.stats.batches += 1
        self.backend.stats.api_calls += entry["requests"]

    async def _resume(self, entry: dict[str, Any]) -> _Job | None:
        """The job of a recorded batch; None (and the entry forgotten) when the server lost it."""
        client = self._api()
        if entry.get("batch_id") is None:  # killed between upload and create: was it created?

            async def find() -> str | None:
                async for batch in client.batches.list(limit=100):
                    if (batch.metadata or {}).get(_TAG) == entry["tag"]:
                        return str(batch.id)
                return None

            found = await self._call("listing batches", find)
            if found is not None:
                self.ledger.update(entry, batch_id=found)
            else:
                try:
                    await self._create(entry)
                except _Missing:
                    self.ledger.remove(entry)
                    return None
        try:
            await self._call("checking a batch", lambda: client.batches.retrieve(entry["batch_id"]))
        except _Missing:
            self.notify(f"batch {entry['batch_id']} is unknown to {entry['base_url']}: submitted again", True)
            self.ledger.remove(entry)
            return None
        self.notify(f"batch {entry['batch_id']} ({entry['requests']} requests) found: collecting it", True)
        return _Job(entry, total=entry["requests"])

    async def _wait(self, jobs: list[_Job]) -> AsyncIterator[tuple[str, Answer | ItemFailure]]:
        """Poll until each batch ends; yield its items, then forget it (the caller cached them)."""
        client = self._api()
        pending = list(jobs)
        while pending:
            for job in list(pending):
                batch = await self._call("checking a batch", partial(client.batches.retrieve, job.id))
                counts = batch.request_counts
                job.status, job.batch = batch.status, batch
                if counts is not None:
                    job.completed, job.failed = counts.completed, counts.failed
                    job.total = counts.total or job.total
                if job.status not in _FINAL:
                    continue
                pending.remove(job)
                if job.status == "failed":
                    self.ledger.remove(job.entry)
                    raise LLMError(f"batch {job.id} was refused by {job.entry['base_url']}: {_errors(batch)}")
                for name in ("output_file_id", "error_file_id"):
                    file_id = getattr(batch, name, None)
                    try:
                        content = file_id and await self._call(
                            "downloading batch results", partial(client.files.content, file_id)
                        )
                    except _Missing:  # deleted, or past its retention: its requests have no answer
                        self.notify(f"the {name[:-8]} file {file_id} of batch {job.id} is gone", True)
                        continue
                    for item in read_results(content.content) if content else ():
                        yield item
                self.ledger.remove(job.entry)
                self.notify(
                    f"batch {job.id} {job.status}: {job.completed} answered, {job.failed} failed", True
                )
            self.notify(_progress(jobs), False)
            if pending:
                await asyncio.sleep(self.config.batch_poll_interval)

    # -- the client and its calls ---------------------------------------------------------------

    def _api(self) -> AsyncOpenAI:
        if self._client is None:
            from instraug.llm.openai_backend import PLACEHOLDER_KEY, build_client

            self._client = build_client(
                base_url=batch_url(self.config),
                api_key=self._key() or PLACEHOLDER_KEY,
                timeout=self.config.timeout,
                connections=4,
            )
        return self._client

    def _key(self) -> str:
        return os.environ.get(self.config.api_key_env, "")

    def _scrub(self, text: str) -> str:
        key = self._key()
        return text.replace(key, "***") if key else text

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """One Files/Batches API call, retried as online requests are; what cannot be fixed by waiting
        is an LLMError (exit 3) that says the batches are recorded."""
        import openai

        where = endpoint_name(batch_url(self.config))

        def count(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            self.backend.stats.retries[exc.cause if isinstance(exc, RetryableError) else "other"] += 1

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.config.max_retries + 1),
            wait=WaitRetryAfterOrBackoff(self.config.retry_initial_wait, self.config.retry_max_wait),
            retry=retry_if_exception_type(RetryableError),
            before_sleep=count,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    try:
                        return await call()
                    except openai.APITimeoutError:
                        raise RetryableError(
                            "timeout", f"no answer within {self.config.timeout:g} s"
                        ) from None
                    except openai.APIConnectionError as exc:
                        message = self._scrub(f"cannot reach {where}: {exc.__cause__ or exc}")
                        raise RetryableError("connection", message) from None
                    except openai.APIStatusError as exc:
                        raise self._status_error(exc, what, where) from None
        except RetryableError as exc:
            tries, hint = self.config.max_retries + 1, self._resume_hint()
            raise LLMError(f"{what}: {exc.cause} after {tries} attempts: {exc}{hint}") from None
        raise AssertionError("unreachable")  # pragma: no cover - tenacity returns or raises above

    def _status_error(self, exc: APIStatusError, what: str, where: str) -> Exception:
        status, message = exc.status_code, self._scrub(server_message(exc))
        if status in _RETRY_STATUS or status >= 500:
            cause = "rate_limit" if status == 429 else "server_error" if status >= 500 else f"http_{status}"
            return RetryableError(cause, f"HTTP {status}: {message}")
        if status == 401:
            return LLMError(
                f"{where} rejected the API key (HTTP 401: {message}); "
                f"check the environment variable {self.config.api_key_env}"
            )
        if status == 404:
            return _Missing(
                f"{where} answered HTTP 404 while {what} ({message}); llm.mode: batch needs a server with "
                "OpenAI's Files and Batches APIs (for vLLM, use --export-batch and vllm run-batch)"
            )
        return LLMError(f"{where} refused {what} (HTTP {status}: {message}); check llm.model")

    def _resume_hint(self) -> str:
        if self.ledger.entries and self.ledger.path is not None:
            return f"; the submitted batches are recorded in {self.ledger.path}: run again to collect them"
        return ""


def _listed(causes: Counter[str]) -> str:
    return ", ".join(f"{cause} {n}" for cause, n in sorted(causes.items()))


def _errors(batch: Any) -> str:
    """What a failed batch's errors say (the first three)."""
    data = list(getattr(getattr(batch, "errors", None), "data", None) or [])
    shown = [
        (f"line {e.line}: " if getattr(e, "line", None) else "") + str(e.message or e.code or "error")
        for e in data[:3]
    ]
    more = f" (and {len(data) - 3} more)" if len(data) > 3 else ""
    return ("; ".join(shown) or "no reason given") + more


def _progress(jobs: list[_Job]) -> str:
    """The batches' state in a few words, for the progress bar."""
    states = Counter(job.status for job in jobs)
    done = sum(job.completed for job in jobs)
    total = sum(job.total for job in jobs)
    failed = sum(job.failed for job in jobs)
    return f"batches {_listed(states)}: {done}/{total} answered" + (f", {failed} failed" if failed else "")

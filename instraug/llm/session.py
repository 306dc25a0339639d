"""The session the stages talk to: cache hits at once, the rest from the backend on a loop thread.

`open_llm(config)` opens one; `count_cached` says how many requests a cache already answers. Where
uncached requests go is the mode: to the backend one by one (`llm.mode: online`), as OpenAI batches
(`batch`, llm/batch.py), or into a batch input file (`--export-batch`, llm/batch_files.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sys
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import instraug.llm.openai_backend  # noqa: F401 - registers the openai backend
from instraug.errors import CacheMissError, LLMError
from instraug.llm.base import (
    Backend,
    ChatRequest,
    Completion,
    RunStats,
    derive_seed,
    get_backend,
    request_key,
)
from instraug.llm.batch import BatchRunStats, BatchSender
from instraug.llm.batch_files import BatchExport, BatchExported, ImportedAnswers, read_imported
from instraug.llm.batch_ledger import BatchLedger, ledger_path
from instraug.llm.cache import ResponseCache
from instraug.llm.local import sigterm_unwinds  # importing it registers the local backend

if TYPE_CHECKING:
    from tqdm import tqdm

    from instraug.config import LLMConfig

_DONE = object()
#: How the openai backend words a request whose every attempt failed to connect (its cause comes first).
UNREACHABLE_PREFIX = "connection after "


@dataclass(frozen=True)
class _Note:
    """What batch mode says while a round waits: a line of its own, or the progress bar's status."""

    text: str
    line: bool


class _LoopThread:
    """An asyncio event loop in a daemon thread, so synchronous callers can stream async results."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="instraug-llm", daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        """Run `coro` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro: Coroutine[Any, Any, None], on_done: Callable[[], None]) -> Callable[[], None]:
        """Start `coro` as a task; `on_done` runs once it has ended, however. Returns a cancel function."""
        tasks: list[asyncio.Task[None]] = []

        def create() -> None:
            task = self.loop.create_task(coro)
            task.add_done_callback(lambda _: on_done())
            tasks.append(task)

        def cancel() -> None:
            # Callbacks run in order, so the task exists by the time a cancel arrives.
            self.loop.call_soon_threadsafe(lambda: tasks[0].cancel())

        self.loop.call_soon_threadsafe(create)
        return cancel

    def close(self) -> None:
        """Stop the loop and wait for the thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class LLMSession:
    """Answers batches of chat requests: cache hits at once, the rest from the backend as they finish."""

    def __init__(
        self,
        backend: Backend,
        cache: ResponseCache | None,
        *,
        offline: bool = False,
        quiet: bool = False,
        sender: BatchSender | None = None,
        export: BatchExport | None = None,
        imported: ImportedAnswers | None = None,
    ) -> None:
        self.backend = backend
        self.sender = sender  # batch mode: where uncached requests go instead of the backend
        self.export = export  # --export-batch: the first round with uncached requests is written here
        self.imported = imported  # --import-batch: answers cached as the run asks for them
        self.rounds = 0
        self.model = backend.model
        self.stats: RunStats = backend.stats
        self.cache = cache
        self.offline = offline
        self.quiet = quiet
        self.first_failure: str | None = None  # the error of the first request that failed
        self.unreachable = 0  # requests that failed because the server could not be reached
        self.unreachable_example: str | None = None
        self._loop: _LoopThread | None = None

    def run(self, requests: Iterable[ChatRequest]) -> Iterator[Completion]:
        """Yield one Completion per request, in completion order; cached requests are never sent."""
        batch = list(requests)
        self.stats.requests += len(batch)
        self.rounds += 1
        progress = self._progress(len(batch))
        try:
            keys = [self.backend.key_for(request) for request in batch]
            hits = self.cache.get_many(keys) if self.cache is not None else {}
            pending: dict[str, list[ChatRequest]] = {}
            for request, key in zip(batch, keys, strict=True):
                hit = hits.get(key)
                if hit is not None:
                    self.stats.cache_hits += 1
                    yield self._counted(self._stored(request, key, hit), progress)
                elif (answer := self._imported(request, key)) is not None:
                    yield self._counted(answer, progress)
                elif self.offline and self.export is None:
                    raise CacheMissError(_miss_message(request, self.model, self.cache))
                else:
                    pending.setdefault(key, []).append(request)
            if pending and self.export is not None:
                count = self.export.write(self.backend, [askers[0] for askers in pending.values()])
                raise BatchExported(self.export.path, count, self.rounds)
            if pending:
                yield from self._send(pending, progress)
        finally:
            progress.close()

    def _imported(self, request: ChatRequest, key: str) -> Completion | None:
        """The answer --import-batch brought for this request, now stored in the cache."""
        if self.imported is None:
            return None
        self.imported.asked.add(key)
        answer = self.imported.answers.get(key)
        if answer is None:
            return None
        if self.cache is not None:
            fields = self.backend.keyed_fields(request)
            tokens = (answer.prompt_tokens, answer.completion_tokens)
            self.cache.put(key, fields, answer.text, answer.finish_reason, *tokens)
        self.imported.stored += 1
        self.stats.cache_hits += 1
        return self._stored(request, key, answer)

    def _stored(self, request: ChatRequest, key: str, answer: Any) -> Completion:
        """The Completion of an answer already stored (a cache hit, an imported batch result)."""
        return Completion(
            request=request,
            key=key,
            model=self.model,
            text=answer.text,
            finish_reason=answer.finish_reason,
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.completion_tokens,
            cached=True,
        )

    def _send(self, pending: dict[str, list[ChatRequest]], progress: tqdm[Any]) -> Iterator[Completion]:
        """Send one request per distinct key; every asker of that key gets the answer."""
        unique = [askers[0] for askers in pending.values()]
        self.stats.requests_sent += len(unique)
        results: queue.SimpleQueue[Any] = queue.SimpleQueue()
        if self._loop is None:
            self._loop = _LoopThread()
        if self.sender is not None:
            self.sender.notify = lambda text, line: results.put(_Note(text, line))
        cancel = self._loop.spawn(self._pump(unique, results), lambda: results.put(_DONE))
        finished = False
        try:
            while (item := results.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, _Note):
                    self._note(item, progress)
                    continue
                for i, request in enumerate(pending[item.key]):
                    yield self._counted(item if i == 0 else replace(item, request=request), progress)
            finished = True
        finally:
            if not finished:
                # Stop what is in flight; answers that already arrived are in the cache.
                cancel()
                while results.get() is not _DONE:
                    pass

    async def _pump(self, requests: list[ChatRequest], results: queue.SimpleQueue[Any]) -> None:
        """On the loop: commit each answer to the cache as it arrives, then hand it over."""
        source = self.sender or self.backend
        try:
            async for completion in source.complete(requests):
                if completion.error is None and completion.text is not None and self.cache is not None:
                    self.cache.put(
                        completion.key,
                        self.backend.keyed_fields(completion.request),
                        completion.text,
                        completion.finish_reason,
                        completion.prompt_tokens,
                        completion.completion_tokens,
                    )
                results.put(completion)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            results.put(exc)

    def _note(self, note: _Note, progress: tqdm[Any]) -> None:
        if note.line:
            if not self.quiet:
                progress.write(note.text, file=sys.stderr)
        else:
            progress.set_postfix_str(note.text)

    def _counted(self, completion: Completion, progress: tqdm[Any]) -> Completion:
        if completion.error is not None:
            self.stats.failures += 1
            self.first_failure = self.first_failure or completion.error
            if completion.error.startswith(UNREACHABLE_PREFIX):
                self.unreachable += 1
                self.unreachable_example = self.unreachable_example or completion.error
        elif completion.finish_reason == "length":
            self.stats.truncated += 1
        progress.update()
        if progress.n % 64 == 0:
            progress.set_postfix_str(
                f"tokens in/out {self.stats.prompt_tokens}/{self.stats.completion_tokens}", refresh=False
            )
        return completion

    def unreachable_error(self) -> LLMError | None:
        """An LLMError (exit 3) when a request failed because the server could not be reached."""
        if not self.unreachable:
            return None
        where = getattr(self.backend, "base_url", None) or "the LLM server"
        return LLMError(
            f"cannot reach {where}: {self.unreachable} of {self.stats.requests} requests failed to connect "
            f"({self.unreachable_example}); start the server or check llm.base_url, then run again "
            "(answers so far are cached)"
        )

    def _progress(self, total: int) -> tqdm[Any]:
        from tqdm import tqdm

        return tqdm(
            total=total,
            desc=f"LLM {self.model}",
            unit="req",
            file=sys.stderr,
            disable=self.quiet or total == 0,
            mininterval=0.5,
            dynamic_ncols=True,
        )

    def _close(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.call(self.backend.aclose(), timeout=10)
            if self.sender is not None:
                with contextlib.suppress(Exception):
                    self._loop.call(self.sender.aclose(), timeout=10)
            self._loop.close()
            self._loop = None


@contextlib.contextmanager
def open_llm(
    llm_config: LLMConfig,
    *,
    cache_path: Path | str | None,
    offline: bool = False,
    quiet: bool = False,
    export_batch: Path | str | None = None,
    import_batch: Path | str | None = None,
) -> Iterator[LLMSession]:
    """A session on the configured backend; on leaving, everything it started is stopped.

    `export_batch` writes the first round with uncached requests as a batch input file instead of
    sending it (BatchExported ends the run); `import_batch` answers requests from a batch output file.
    """
    batch_mode = llm_config.mode == "batch" and not offline and export_batch is None
    price_in, price_out = llm_config.price_per_1k_input, llm_config.price_per_1k_output
    stats = RunStats(price_per_1k_input=price_in, price_per_1k_output=price_out)
    if batch_mode:  # batch answers cost llm.batch_discount of the online price
        discount = llm_config.batch_discount
        stats = BatchRunStats(
            price_per_1k_input=price_in, price_per_1k_output=price_out, batch_discount=discount
        )
    backend = get_backend(llm_config.backend)(llm_config, stats, quiet=quiet)
    if offline and cache_path is None:
        raise CacheMissError("offline mode answers from the cache only, but no cache path is set")
    imported = read_imported(import_batch) if import_batch is not None else None
    # An offline session only reads (unless it imports); any other holds the cache's writer lock.
    writer = not offline or imported is not None
    cache = ResponseCache(cache_path, writer=writer) if cache_path is not None else None
    session = LLMSession(
        backend,
        cache,
        offline=offline,
        quiet=quiet,
        export=BatchExport(export_batch) if export_batch is not None else None,
        imported=imported,
    )
    try:
        with sigterm_unwinds():
            try:
                if batch_mode:  # after the cache lock: one run at a time reads and writes the ledger
                    ledger = BatchLedger(ledger_path(cache_path) if cache_path is not None else None)
                    session.sender = BatchSender(backend, ledger)
                if not offline and export_batch is None:
                    backend.start()
                yield session
            finally:
                session._close()
                backend.stop()
    finally:
        if cache is not None:
            cache.close()
        if not quiet and stats.requests:
            print(stats.summary(), file=sys.stderr)
        if not quiet and imported is not None:
            print(imported.summary(), file=sys.stderr)


def _miss_message(request: ChatRequest, model: str, cache: ResponseCache | None) -> str:
    last = request.messages[-1][1] if request.messages else ""
    snippet = " ".join(last.split())[:80]
    where = cache.path if cache is not None else "the cache"
    return (
        f"offline: a request is not in {where} (model {model}, sample {request.sample_index}, "
        f"message {snippet!r}); run without --offline to send it"
    )


def count_cached(cache_path: Path, config: LLMConfig, requests: list[ChatRequest]) -> int:
    """How many distinct `requests` the cache at `cache_path` answers for this config, sending nothing.

    The keys are the ones a session on `config` would look up: the model as the backend resolves it
    (no server started), each sample's seed derived from `llm.seed`.
    """
    if not Path(cache_path).is_file():
        return 0
    model = get_backend(config.backend).resolve_model(config)
    keys = [request_key(model, r, derive_seed(config.seed, r.sample_index)) for r in requests]
    with ResponseCache(cache_path) as cache:
        return len(cache.get_many(keys))

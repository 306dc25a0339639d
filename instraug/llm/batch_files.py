"""OpenAI's batch file format, read and written: no network here.

An input line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}` with the
request's cache key as custom_id and the body the online path sends; an output line (OpenAI's
output and error files, `vllm run-batch`'s output) is `{"id", "custom_id", "response":
{"status_code", "request_id", "body"}, "error"}`. `--export-batch` writes input files,
`--import-batch` reads output files into the response cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from instraug.errors import InputError
from instraug.llm.responses import RetryableError, parse_choices, token_count

if TYPE_CHECKING:
    from instraug.llm.base import Backend, ChatRequest

#: The endpoint every line asks for.
CHAT_URL = "/v1/chat/completions"
#: Statuses worth asking again (as online: rate limits, timeouts, conflicts, server errors).
_RETRY_STATUS = frozenset({408, 409, 429})


def chat_body(model: str, seed: int, request: ChatRequest) -> dict[str, Any]:
    """The chat completion body of one request, as the online path sends it (one sample)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": role, "content": content} for role, content in request.messages],
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_tokens": request.max_tokens,
        "seed": seed,
    }
    if request.stop:
        body["stop"] = list(request.stop)
    constraint = getattr(request, "constraint", None)  # decoding restricted by the server
    if constraint is not None:
        body.update(constraint.body())
    return body


def input_line(backend: Backend, request: ChatRequest) -> bytes:
    """One line of a batch input file, newline included; its custom_id is the request's cache key."""
    line = {
        "custom_id": backend.key_for(request),
        "method": "POST",
        "url": CHAT_URL,
        "body": chat_body(backend.model, backend.seed_for(request), request),
    }
    return orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)


@dataclass(frozen=True)
class Answer:
    """A request's answer from a batch: what the cache stores for it."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ItemFailure:
    """A batch item without an answer: `retryable` when asking again may help (expired, 429, 5xx)."""

    cause: str
    message: str
    retryable: bool


def read_result(row: dict[str, Any]) -> tuple[str, Answer | ItemFailure]:
    """The custom_id of one output line and what it says; ValueError names what is wrong with it."""
    custom_id = row.get("custom_id")
    if not isinstance(custom_id, str):
        raise ValueError("'custom_id' must be a string")
    response, error = row.get("response"), row.get("error")
    if response is not None and not isinstance(response, dict):
        raise ValueError("'response' must be an object or null")
    status = response.get("status_code") if response is not None else None
    if response is not None and (not isinstance(status, int) or isinstance(status, bool)):
        raise ValueError("'response.status_code' must be an integer")
    if response is None or status != 200 or error is not None:
        return custom_id, _failure(status, error, response)
    body = response.get("body")
    if not isinstance(body, dict):
        return custom_id, ItemFailure("malformed", "the response has no JSON body", True)
    try:
        data = parse_choices(orjson.dumps(body))
    except RetryableError as exc:
        return custom_id, ItemFailure(exc.cause, str(exc), True)
    usage = data.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    text, finish_reason = data["choices"][0]
    tokens = token_count(usage.get("prompt_tokens")), token_count(usage.get("completion_tokens"))
    return custom_id, Answer(text, finish_reason, *tokens)


def _failure(status: int | None, error: Any, response: dict[str, Any] | None) -> ItemFailure:
    """What an item that has no answer says, and whether it is worth asking again."""
    body = response.get("body") if response is not None else None
    said = error
    if said is None and isinstance(body, dict):
        said = body.get("error", body)
    if isinstance(said, dict):
        code = said.get("code")
        message = str(said.get("message") or code or said)[:300]
    else:
        code, message = None, str(said or "no answer")[:300]
    if status is None:  # never run: the batch expired, was cancelled, or the server gave up on it
        return ItemFailure("batch_expired" if code == "batch_expired" else "batch_not_run", message, True)
    cause = "rate_limit" if status == 429 else "server_error" if status >= 500 else f"http_{status}"
    return ItemFailure(cause, f"HTTP {status}: {message}", status in _RETRY_STATUS or status >= 500)


def read_results(content: bytes) -> Iterator[tuple[str, Answer | ItemFailure]]:
    """The items of an output or error file downloaded from the server (a line it garbled is skipped:
    its request has no answer, so it is asked again)."""
    for raw in content.splitlines():
        if raw.strip():
            try:
                row = orjson.loads(raw)
                yield read_result(row if isinstance(row, dict) else {})
            except (orjson.JSONDecodeError, ValueError):
                continue


# --------------------------------------------------------------------------------------------
# --export-batch and --import-batch


class BatchExported(Exception):  # noqa: N818 - not an error: the way an export run stops
    """Raised by a session that exported a round of requests instead of sending them."""

    def __init__(self, path: str, count: int, round_number: int) -> None:
        super().__init__(f"{count} requests written to {path}")
        self.path, self.count, self.round = path, count, round_number


class BatchExport:
    """Where `--export-batch` writes the uncached requests of the first round that has any."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.written = False

    def write(self, backend: Backend, requests: Iterable[ChatRequest]) -> int:
        """Write the input file (replacing any older one); return how many lines it has."""
        from instraug.jsonl import atomic_binary

        count = 0
        with atomic_binary(self.path) as fp:
            for request in requests:
                fp.write(input_line(backend, request))
                count += 1
        self.written = True
        return count


@dataclass
class ImportedAnswers:
    """The answers of a batch output file, stored in the cache as the run asks for them (a cache row
    needs the request, which the file does not hold)."""

    path: str
    answers: dict[str, Answer] = field(default_factory=dict)
    failed: int = 0  # items without an answer: not stored, so the next export writes them again
    stored: int = 0
    asked: set[str] = field(default_factory=set)

    def summary(self) -> str:
        """One line for people: what the file held and what this run did with it."""
        unknown = len(self.answers.keys() - self.asked)
        parts = [f"{len(self.answers)} answers", f"{self.stored} stored in the cache"]
        if unknown:
            parts.append(f"{unknown} custom_ids not asked for by this run (unknown, or already answered)")
        if self.failed:
            parts.append(f"{self.failed} failed items not imported (a later export writes them again)")
        return f"Imported {self.path}: " + ", ".join(parts)


def read_imported(path: str | Path) -> ImportedAnswers:
    """Read a batch output file; a line that is not one is `path:line: what is wrong` (exit 2)."""
    from instraug.jsonl import read_jsonl

    imported = ImportedAnswers(str(path))
    first_line: dict[str, int] = {}
    for line, row in read_jsonl(path):
        try:
            custom_id, outcome = read_result(row)
        except ValueError as exc:
            raise InputError(f"not a batch output line: {exc}", path, line) from None
        if custom_id in first_line:
            raise InputError(
                f"custom_id {custom_id} repeated (first at line {first_line[custom_id]})", path, line
            )
        first_line[custom_id] = line
        if isinstance(outcome, Answer):
            imported.answers[custom_id] = outcome
        else:
            imported.failed += 1
    return imported

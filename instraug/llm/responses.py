"""Reading an OpenAI-compatible server's answers: the choices, failures worth a retry, Retry-After."""

from __future__ import annotations

import email.utils
import math
import time
from typing import TYPE_CHECKING, Any

import orjson
from tenacity import RetryCallState
from tenacity.wait import wait_base, wait_random_exponential

if TYPE_CHECKING:
    from openai import APIStatusError

#: Longest server-requested pause (Retry-After) we honor before retrying.
MAX_RETRY_AFTER = 300.0


class RetryableError(Exception):
    """A failed attempt worth repeating; `cause` names it in the retry statistics.

    `elsewhere` is set when the endpoint it failed on was set aside and another one is in use, so
    the retry can go there without waiting.
    """

    def __init__(self, cause: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.cause = cause
        self.retry_after = retry_after
        self.elsewhere = False


class RejectedRequest(Exception):
    """The server refused this one request (its prompt is too long): a failure row, no retry."""


class WaitRetryAfterOrBackoff(wait_base):
    """No wait when the retry goes to another endpoint; else what the server asked for (Retry-After),
    else exponential backoff with full jitter."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.backoff = wait_random_exponential(multiplier=initial, max=maximum)

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, RetryableError) and exc.elsewhere:
            return 0.0
        if isinstance(exc, RetryableError) and exc.retry_after is not None:
            return min(exc.retry_after, MAX_RETRY_AFTER)
        return float(self.backoff(retry_state))


def parse_choices(content: bytes) -> dict[str, Any]:
    """The response JSON with `choices` reduced to (text, finish_reason) in index order."""
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        raise RetryableError("malformed", f"the response is not JSON: {content[:80]!r}") from None
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise RetryableError("malformed", "the response has no 'choices' list")
    if not data["choices"]:
        raise RetryableError("empty", "the response has no choices")
    choices: list[tuple[int, str, str | None]] = []
    for position, choice in enumerate(data["choices"]):
        message = choice.get("message") if isinstance(choice, dict) else None
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str):
            raise RetryableError("malformed", "a choice has no message content")
        index = choice.get("index")
        finish_reason = choice.get("finish_reason")
        choices.append(
            (
                index if isinstance(index, int) else position,
                text,
                finish_reason if isinstance(finish_reason, str) else None,
            )
        )
    choices.sort(key=lambda c: c[0])
    data["choices"] = [(text, finish_reason) for _, text, finish_reason in choices]
    return data


def server_message(exc: APIStatusError) -> str:
    """What the server said about an error status, at most 300 characters."""
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        message = error.get("message") if isinstance(error, dict) else error
        if message:
            return str(message)[:300]
    text = exc.response.text if exc.response is not None else ""
    return (text or exc.message)[:300].strip()


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms` or `retry-after` (seconds or an HTTP date)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            try:
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError, OverflowError):
                continue
        if math.isfinite(seconds):
            return max(seconds, 0.0)
    return None


def is_context_overflow(message: str) -> bool:
    """True when an HTTP 400 message says the prompt does not fit the model's context."""
    lowered = message.lower()
    return "context" in lowered and ("length" in lowered or "window" in lowered or "exceed" in lowered)


def token_count(value: Any) -> int:
    """A usage count as reported, or 0 when the server sent something else."""
    return value if isinstance(value, int) and value >= 0 else 0

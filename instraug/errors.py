"""Errors a user can act on; the CLI prints their message and exits with their code."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pydantic is not imported here: every command imports this module
    from pydantic import ValidationError
    from pydantic_core import ErrorDetails

#: Exit code of a run that finished with failure rows (requests that exhausted their retries).
EXIT_COMPLETED_WITH_FAILURES = 4
#: Exit code of a run stopped by budget.max_requests / budget.max_usd (resumable).
EXIT_BUDGET_REACHED = 5


class InstraugError(Exception):
    """Base class: a problem the user can fix; its message says what and where."""

    exit_code = 2


class InputError(InstraugError):
    """Bad input data: a file, a line, a field."""

    def __init__(self, reason: str, path: str | Path | None = None, line: int | None = None):
        self.reason = reason
        self.path = str(path) if path is not None else None
        self.line = line
        super().__init__(self._format())

    def _format(self) -> str:
        where = self.path or ""
        if where and self.line is not None:
            where = f"{where}:{self.line}"
        return f"{where}: {self.reason}" if where else self.reason


class ConfigError(InputError):
    """The YAML config is invalid."""


class TemplateError(InputError):
    """A template or an upstream template expression that cannot be used."""


class LLMError(InstraugError):
    """The LLM backend cannot be used (server down, bad key, unknown model)."""

    exit_code = 3


class CacheMissError(InstraugError):
    """--offline was given and a request is not in the cache."""

    exit_code = 3


def validation_key(error: ErrorDetails) -> str:
    """Where pydantic found a problem, as a key path: `strategies.0.id`."""
    return ".".join(str(part) for part in error["loc"])


def validation_message(error: ErrorDetails) -> str:
    """Pydantic's message, worded as instraug words its own: `must be a valid string`."""
    return str(error["msg"]).replace("Input should be", "must be").replace("Value error, ", "")


def validation_reason(exc: ValidationError, missing: str | None = None) -> str:
    """`key.path: reason` for the first problem pydantic found; `missing` words a missing key."""
    error = exc.errors()[0]
    reason = missing if missing is not None and error["type"] == "missing" else validation_message(error)
    key = validation_key(error)
    return f"{key}: {reason}" if key else reason

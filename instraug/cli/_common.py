"""What every command shares: option types, error reporting, printing to stderr."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from instraug.errors import InstraugError

F = TypeVar("F", bound=Callable[..., Any])

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="YAML config (see configs/default.yaml); default: built-in defaults."
    ),
]
OutputOption = Annotated[str, typer.Option("--output", "-o", help="Output JSONL file, or - for stdout.")]
InstancesOption = Annotated[
    str, typer.Option("--instances", "-i", help="Instance JSONL, a MultiInstruct directory, or -.")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]


def reports_errors(func: F) -> F:
    """Turn an InstraugError into `Error: ...` on stderr and its exit code (INSTRAUG_DEBUG=1 re-raises)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except InstraugError as exc:
            if os.environ.get("INSTRAUG_DEBUG"):
                raise
            typer.echo(f"Error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def info(message: str, quiet: bool = False) -> None:
    """A status line on stderr (stdout may carry data)."""
    if not quiet:
        print(message, file=sys.stderr)


OfflineOption = Annotated[
    bool, typer.Option("--offline", help="Answer from the response cache only; a miss is an error.")
]
CacheOption = Annotated[
    Path | None,
    typer.Option("--cache", help="Response cache (SQLite) [config: llm.cache_path]."),
]

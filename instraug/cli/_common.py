"""What every command shares: option types, error reporting, printing to stderr."""

from __future__ import annotations

import functools
import os
import select
import stat
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from instraug.errors import InputError, InstraugError

F = TypeVar("F", bound=Callable[..., Any])

#: `-` as a path: stdin or stdout.
STDIO = "-"

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
    """Turn an InstraugError into `Error: ...` on stderr and its exit code (INSTRAUG_DEBUG=1 re-raises).

    A reader that closed stdout (`| head`) ends the command quietly with exit 0, as Unix tools do.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except InstraugError as exc:
            if os.environ.get("INSTRAUG_DEBUG"):
                raise
            typer.echo(f"Error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except BrokenPipeError:
            if not _stdout_reader_gone():
                raise
            # Python flushes stdout once more at exit: point it at /dev/null so that flush succeeds
            # instead of printing "Exception ignored ... BrokenPipeError".
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(0) from None

    return wrapper  # type: ignore[return-value]


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (not some other broken pipe, e.g. a socket)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _fd, events in poller.poll(0))


def refuse_output_over_inputs(
    output: str | Path | None, inputs: Iterable[str | Path | None], option: str = "-o"
) -> None:
    """Refuse, before anything is written, an output that is one of the command's inputs.

    The same file under another name (a symlink, a hard link) is the same input: files are compared
    by device and inode; an output that does not exist yet by its resolved path (an input the
    command creates, such as a cache). `-` and outputs that are not regular files (a FIFO,
    /dev/null: written straight through, nothing replaced) never clash.
    """
    for source in inputs:
        if _same_file(output, source):
            reason = f"the output is an input of this command ({source}); choose another {option}"
            raise InputError(reason, output)


def refuse_one_file_twice(first: tuple[str, str | None], second: tuple[str, str | None]) -> None:
    """Refuse two outputs of one command that name the same file: one would replace the other."""
    (first_name, first_path), (second_name, second_path) = first, second
    if _same_file(second_path, first_path):
        reason = f"{first_name} and {second_name} are the same file; choose another {second_name}"
        raise InputError(reason, second_path)


def _same_file(output: str | Path | None, other: str | Path | None) -> bool:
    """Whether writing `output` would replace the file `other`."""
    if output is None or other is None or STDIO in (str(output), str(other)):
        return False
    try:
        out_stat = os.stat(output)
    except OSError:
        return os.path.realpath(output) == os.path.realpath(other)
    if not stat.S_ISREG(out_stat.st_mode):
        return False
    try:
        return os.path.samestat(out_stat, os.stat(other))
    except OSError:
        return False


def instance_inputs(instances: str | Path | None, split: str = "train") -> list[str | Path]:
    """The files an `--instances` value stands for (each instance file of a MultiInstruct directory)."""
    if instances is None or str(instances) == STDIO:
        return []
    from instraug.instances import instance_files

    try:
        return list(instance_files(instances, split))
    except InstraugError:
        return [instances]  # the command reports a missing path itself, if it reads it at all


def only_one_stdin(*inputs: tuple[str, str | Path | None]) -> None:
    """Refuse two inputs that are both `-`: stdin can be read once."""
    from_stdin = [name for name, value in inputs if value is not None and str(value) == STDIO]
    if len(from_stdin) > 1:
        names = f"{', '.join(from_stdin[:-1])} and {from_stdin[-1]}"
        every = "both" if len(from_stdin) == 2 else "all"
        raise InputError(f"{names} are {every} stdin (-): only one input can be read from stdin")


def info(message: str, quiet: bool = False) -> None:
    """A status line on stderr (stdout may carry data)."""
    if not quiet:
        print(message, file=sys.stderr)


OfflineOption = Annotated[
    bool, typer.Option("--offline", help="Answer from the response cache only; a miss is an error.")
]
CacheOption = Annotated[
    Path | None,
    typer.Option(
        "--cache",
        help="Response cache: an SQLite file, or a run directory (its cache.sqlite) [config: llm.cache_path; "
        "default: RUN_DIR/cache.sqlite for expand and in a run directory, else .instraug/llm-cache.sqlite].",
    ),
]

"""instraug cache stats|export|import"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from instraug.cli._common import (
    CacheOption,
    ConfigOption,
    QuietOption,
    info,
    refuse_output_over_inputs,
    reports_errors,
)

app = typer.Typer(help="Inspect, export and import the LLM response cache.", no_args_is_help=True)


def _cache_path(cache: Path | None, config: Path | None, must_exist: bool) -> Path:
    from instraug.config import load_config
    from instraug.errors import InputError
    from instraug.rundir import cache_path

    path = cache_path(cache, load_config(config).llm.cache_path if cache is None else None)
    if must_exist and not path.is_file():
        raise InputError("no LLM cache here (give --cache FILE or RUN_DIR, or set llm.cache_path)", path)
    return path


@app.command("stats")
@reports_errors
def stats(
    cache: CacheOption = None,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the numbers as JSON.")] = False,
) -> None:
    """How many responses the cache holds, per model, with their tokens."""
    from instraug.llm.cache import ResponseCache

    with ResponseCache(_cache_path(cache, config, must_exist=True)) as store:
        numbers = store.stats()
    if as_json:
        typer.echo(json.dumps(numbers, indent=2, sort_keys=True))
        return
    typer.echo(f"{numbers['path']}: {numbers['entries']} responses")
    for model, row in numbers["models"].items():
        typer.echo(
            f"  {model}: {row['entries']} responses, "
            f"tokens in/out {row['prompt_tokens']}/{row['completion_tokens']}"
        )


@app.command("export")
@reports_errors
def export(
    output: Annotated[str, typer.Argument(help="JSONL file to write, or - for stdout.")],
    cache: CacheOption = None,
    config: ConfigOption = None,
    quiet: QuietOption = False,
) -> None:
    """Write every cached response as JSONL, sorted by key (the same cache gives the same file)."""
    from instraug.jsonl import write_jsonl
    from instraug.llm.cache import ResponseCache

    path = _cache_path(cache, config, must_exist=True)
    refuse_output_over_inputs(output, [path, config], "OUTPUT")
    with ResponseCache(path) as store:
        count = write_jsonl(output, store.export_rows())
    info(f"{count} responses -> {output}", quiet)


@app.command("import")
@reports_errors
def import_(
    source: Annotated[str, typer.Argument(help="JSONL written by `instraug cache export`, or -.")],
    cache: CacheOption = None,
    config: ConfigOption = None,
    quiet: QuietOption = False,
) -> None:
    """Add exported responses to the cache; entries already there are kept (importing twice is a no-op)."""
    from instraug.jsonl import read_jsonl
    from instraug.llm.cache import ResponseCache

    path = _cache_path(cache, config, must_exist=False)
    refuse_output_over_inputs(path, [source, config], "--cache")
    with ResponseCache(path, writer=True) as store:  # one writer at a time, like a run
        added, present = store.import_rows(read_jsonl(source), source)
    info(f"{added} responses added to {path}, {present} already there", quiet)

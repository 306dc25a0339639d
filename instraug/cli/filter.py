"""instraug filter"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from instraug.llm import LLMSession

from instraug.cli._common import (
    CacheOption,
    ConfigOption,
    OfflineOption,
    OutputOption,
    QuietOption,
    info,
    instance_inputs,
    only_one_stdin,
    refuse_one_file_twice,
    refuse_output_over_inputs,
    reports_errors,
)


@reports_errors
def filter_command(
    generations: Annotated[str, typer.Argument(help="Generations JSONL (instraug generate), or -.")],
    templates: Annotated[
        Path,
        typer.Option("--templates", "-t", help="Template pool JSONL (import-templates): the originals."),
    ],
    instances: Annotated[
        str | None,
        typer.Option(
            "--instances",
            "-i",
            help="Instance JSONL or MultiInstruct directory: each rewrite must render on an instance "
            "of its task (config: filters.check_render).",
        ),
    ] = None,
    rejected: Annotated[
        str | None,
        typer.Option("--rejected", help="Also write the rejected rows, each with its reasons, here."),
    ] = None,
    config: ConfigOption = None,
    output: OutputOption = "-",
    cache: CacheOption = None,
    offline: OfflineOption = False,
    quiet: QuietOption = False,
) -> None:
    """Stage 3: clean and judge LLM rewrites; write the originals and the kept rewrites as a pool."""
    import contextlib

    from instraug.config import load_config
    from instraug.errors import InputError
    from instraug.rundir import cache_path
    from instraug.stages.s1_meta_prompts import example_texts
    from instraug.stages.s3_filter import filter_to_pool, sample_instances
    from instraug.stages.s3_judge import open_judge

    only_one_stdin(("GENERATIONS", generations), ("--templates", templates), ("--instances", instances))
    if output == "-" and rejected == "-":
        raise InputError("--output and --rejected cannot both be stdout (-)")
    settings = load_config(config)
    path = cache_path(cache, settings.llm.cache_path)
    inputs = [generations, templates, config, *instance_inputs(instances, settings.assembly.split)]
    if settings.filters.judge.enabled:
        inputs.append(path)
    refuse_output_over_inputs(output, inputs)
    refuse_output_over_inputs(rejected, inputs, "--rejected")
    refuse_one_file_twice(("--output", output), ("--rejected", rejected))
    filters = settings.filters
    samples = None
    if instances is not None and filters.check_render:
        samples = sample_instances(instances, settings.assembly.split, per_task=filters.render_samples)
    with contextlib.ExitStack() as stack:

        def llm() -> LLMSession:
            from instraug.llm import open_llm

            return stack.enter_context(open_llm(settings.llm, cache_path=path, offline=offline, quiet=quiet))

        judge = open_judge(stack, filters, settings.llm, llm, path, offline=offline, quiet=quiet)
        shown = example_texts(settings.meta_prompts.directory)
        written = filter_to_pool(generations, templates, output, rejected, filters, samples, judge, shown)
    summary = written.funnel
    info(f"filter: {written.originals} originals + {summary.kept} kept rewrites -> {output}", quiet)
    for line in summary.funnel():
        info(f"  {line}", quiet)
    if filters.check_render and samples is None:
        info("  render check skipped: no --instances given", quiet)
    elif summary.render_skipped:
        info(f"  render check skipped for {summary.render_skipped} rows: no instance of their task", quiet)

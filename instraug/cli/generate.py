"""instraug generate"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

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

if TYPE_CHECKING:
    from instraug.records import MetaPrompt


@reports_errors
def generate(
    templates: Annotated[Path, typer.Option("--templates", "-t", help="Templates JSONL (import-templates).")],
    meta_prompts: Annotated[
        Path, typer.Option("--meta-prompts", "-m", help="Meta-prompts JSONL (instraug meta-prompts).")
    ],
    instances: Annotated[
        str | None,
        typer.Option("--instances", "-i", help="Instances to check that kept templates render on."),
    ] = None,
    config: ConfigOption = None,
    output: OutputOption = "-",
    cache: CacheOption = None,
    offline: OfflineOption = False,
    export_batch: Annotated[
        Path | None,
        typer.Option(
            "--export-batch",
            help="Write the uncached requests of the first round that has any as an OpenAI batch input "
            "file (for vllm run-batch or the Batch API), send nothing, and stop.",
        ),
    ] = None,
    import_batch: Annotated[
        Path | None,
        typer.Option(
            "--import-batch",
            help="Answer requests from a batch output file (OpenAI's, or vllm run-batch's) and keep the "
            "answers in the cache, then run.",
        ),
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Stage 2: rephrase every augmentable template, placeholders masked, until the factor is met."""
    from instraug.config import load_config
    from instraug.jsonl import read_jsonl, write_jsonl
    from instraug.llm import EXIT_COMPLETED_WITH_FAILURES, BatchExported, open_llm
    from instraug.rundir import cache_path
    from instraug.stages.s1_meta_prompts import example_texts, load_seeds
    from instraug.stages.s2_generate import GenerationSummary
    from instraug.stages.s2_generate import generate as generate_rows
    from instraug.stages.s3_filter import RuleChain, sample_instances

    only_one_stdin(("--templates", templates), ("--meta-prompts", meta_prompts), ("--instances", instances))
    settings = load_config(config)
    examples_dir = settings.meta_prompts.directory
    path = cache_path(cache, settings.llm.cache_path)
    inputs = [templates, meta_prompts, config, path, *instance_inputs(instances, settings.assembly.split)]
    refuse_output_over_inputs(output, [*inputs, import_batch])
    if export_batch is not None:
        refuse_output_over_inputs(export_batch, [*inputs, import_batch], "--export-batch")
        refuse_one_file_twice(("-o", output), ("--export-batch", str(export_batch)))
    rows = [row for _line, row in read_jsonl(templates)]
    metas = read_meta_prompts(meta_prompts)
    samples = (
        sample_instances(
            instances, settings.assembly.split, {r["task"] for r in rows}, settings.filters.render_samples
        )
        if instances
        else None
    )
    summary = GenerationSummary()
    batch_files = {"export_batch": export_batch, "import_batch": import_batch}
    try:
        with (
            RuleChain(
                settings.filters, samples, originals=rows, examples=example_texts(examples_dir)
            ) as chain,
            open_llm(settings.llm, cache_path=path, offline=offline, quiet=quiet, **batch_files) as llm,
        ):
            seeds = load_seeds(settings.meta_prompts.directory)
            generations = generate_rows(
                rows, metas, seeds, settings, llm, chain.judge, summary, settings.budget, chain.prefetch
            )
            if export_batch is not None:  # nothing reaches -o unless every request is answered
                generations = iter(list(generations))
            count = write_jsonl(output, generations)
            failures = llm.stats.failures
            if llm.export is not None and not llm.export.written:
                llm.export.write(llm.backend, [])
    except BatchExported as done:
        info(
            f"{done.count} requests of round {done.round} written to {done.path}, nothing sent: run them "
            "(vllm run-batch, the Batch API), then run again with --import-batch RESULTS",
            quiet,
        )
        return
    if export_batch is not None:
        info(f"0 requests written to {export_batch}: every request is answered", quiet)
    kept = sum(summary.kept.values())
    info(f"{count} generations, {kept} kept, {len(summary.roots)} templates -> {output}", quiet)
    for task, entry in summary.achieved_factor().items():
        short = " (short of the factor)" if entry["factor"] < settings.expansion.factor else ""
        info(
            f"  {task}: {entry['kept']} kept for {entry['templates']} templates = {entry['factor']}{short}",
            quiet,
        )
    unreachable = llm.unreachable_error()
    if unreachable is not None:  # exit 3: the server is down, not this or that request
        raise unreachable
    if failures:
        info(f"{failures} requests failed after retries", quiet)
        raise typer.Exit(EXIT_COMPLETED_WITH_FAILURES)


def read_meta_prompts(path: Path) -> list[MetaPrompt]:
    """The rows of a meta-prompts file (instraug meta-prompts); at least one."""
    from pydantic import ValidationError

    from instraug.errors import InputError, validation_reason
    from instraug.jsonl import STDIO, read_jsonl
    from instraug.records import MetaPrompt

    name = "<stdin>" if str(path) == STDIO else str(path)
    metas = []
    for line, row in read_jsonl(path):
        try:
            metas.append(MetaPrompt.model_validate(row))
        except ValidationError as exc:
            reason = validation_reason(exc, missing="missing (a meta-prompt row needs id, text, origin)")
            raise InputError(reason, name, line) from None
    if not metas:
        raise InputError("no meta-prompts: the file is empty; write it with `instraug meta-prompts`", name)
    return metas

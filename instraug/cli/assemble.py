"""instraug assemble"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from instraug.cli._common import (
    ConfigOption,
    OutputOption,
    QuietOption,
    info,
    instance_inputs,
    only_one_stdin,
    refuse_output_over_inputs,
    reports_errors,
)


@reports_errors
def assemble(
    pool: Annotated[Path, typer.Option("--pool", "-p", help="Instruction pool JSONL.")],
    instances: Annotated[
        str,
        typer.Option("--instances", "-i", help="Instance JSONL, a MultiInstruct directory, or -."),
    ],
    output: OutputOption = "-",
    epsilon: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Chance of an original instruction [config: assembly.epsilon]."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed [config: assembly.seed].")] = None,
    include_held_out: Annotated[
        bool,
        typer.Option("--include-held-out", help="Also assemble the held-out evaluation tasks."),
    ] = False,
    config: ConfigOption = None,
    quiet: QuietOption = False,
) -> None:
    """Rebuild a training set: each instance gets an instruction drawn from the pool (stage 4)."""
    from instraug.config import load_config
    from instraug.instances import read_instances
    from instraug.jsonl import write_jsonl
    from instraug.pool import InstructionPool
    from instraug.stages.s4_assemble import AssemblySummary
    from instraug.stages.s4_assemble import assemble as assemble_rows

    only_one_stdin(("--pool", pool), ("--instances", instances))
    settings = load_config(config).assembly
    refuse_output_over_inputs(output, [pool, config, *instance_inputs(instances, settings.split)])
    summary = AssemblySummary()
    rows = assemble_rows(
        InstructionPool.load(pool),
        read_instances(instances, settings.split),
        epsilon=settings.epsilon if epsilon is None else epsilon,
        seed=settings.seed if seed is None else seed,
        held_out=() if include_held_out else settings.held_out_tasks,
        shuffle_options=settings.shuffle_options,
        summary=summary,
    )
    write_jsonl(output, rows)
    origins = ", ".join(f"{n} {k}" for k, n in sorted(summary.by_origin.items())) or "none"
    info(
        f"{summary.written} instances of {len(summary.by_task)} tasks -> {output} ({origins})",
        quiet,
    )
    if summary.held_out:
        skipped = ", ".join(f"{task} ({n})" for task, n in sorted(summary.held_out.items()))
        info(f"held-out tasks skipped: {skipped}", quiet)
    if summary.skipped:
        skipped = ", ".join(f"{task} ({n})" for task, n in sorted(summary.skipped.items()))
        info(f"tasks upstream's build skips (image-code outputs, missing tasks): {skipped}", quiet)

"""instraug render"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from instraug.cli._common import (
    OutputOption,
    QuietOption,
    info,
    instance_inputs,
    only_one_stdin,
    refuse_output_over_inputs,
    reports_errors,
)


@reports_errors
def render(
    templates: Annotated[Path, typer.Option("--templates", "-t", help="Template or pool JSONL.")],
    instances: Annotated[
        str,
        typer.Option("--instances", "-i", help="Instance JSONL, a MultiInstruct directory, or -."),
    ],
    output: OutputOption = "-",
    seed: Annotated[int, typer.Option(help="Seed for task-specific random choices.")] = 0,
    quiet: QuietOption = False,
) -> None:
    """Render every template of each instance's task on that instance."""
    from instraug.instances import read_instances
    from instraug.jsonl import write_jsonl
    from instraug.pool import InstructionPool
    from instraug.stages.s4_assemble import render_all

    only_one_stdin(("--templates", templates), ("--instances", instances))
    refuse_output_over_inputs(output, [templates, *instance_inputs(instances)])
    pool = InstructionPool.load(templates)
    count = write_jsonl(output, render_all(pool, read_instances(instances), seed=seed))
    info(f"{count} prompts -> {output}", quiet)

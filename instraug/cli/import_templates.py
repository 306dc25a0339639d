"""instraug import-templates"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from instraug.cli._common import OutputOption, QuietOption, info, refuse_output_over_inputs, reports_errors


@reports_errors
def import_templates(
    source: Annotated[
        Path,
        typer.Argument(
            help="MultiInstruct's instruction_templates.py (read as a syntax tree, never run), "
            "or a templates.json of {task, variant, templates} sets; - reads either from stdin."
        ),
    ],
    output: OutputOption = "-",
    quiet: QuietOption = False,
) -> None:
    """Convert upstream instruction templates into an instraug template pool (JSONL)."""
    from instraug.jsonl import write_jsonl
    from instraug.multiinstruct import import_templates as read_templates

    refuse_output_over_inputs(output, [source])
    rows = read_templates(source)
    write_jsonl(output, (row.as_row() for row in rows))
    tasks = len({row.task for row in rows})
    info(f"{len(rows)} templates of {tasks} tasks -> {output}", quiet)

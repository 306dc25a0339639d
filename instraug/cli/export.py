"""instraug export"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from instraug.cli._common import QuietOption, info, refuse_output_over_inputs, reports_errors


class ExportFormat(str, Enum):
    """The formats of instraug.export.DEFAULT_OUTPUT (named here so --help imports nothing heavy)."""

    llava = "llava"
    hf = "hf"
    parquet = "parquet"


@reports_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (instraug expand -o) with train.jsonl.")],
    fmt: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            "-f",
            help="llava: LLaVA conversation JSON; hf: a datasets save_to_disk folder; parquet: one file "
            "(hf and parquet need instraug[hf]).",
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Where to write [default: RUN_DIR/train_llava.json, RUN_DIR/train_hf or "
            "RUN_DIR/train.parquet].",
        ),
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Export the training set (train.jsonl) for LLaVA, Hugging Face datasets or parquet readers."""
    from instraug.export import TRAIN
    from instraug.export import export as run_export

    refuse_output_over_inputs(output, [run_dir / TRAIN])
    path, rows = run_export(run_dir, fmt.value, output, progress=not quiet)
    info(f"{rows} training rows -> {path}", quiet)

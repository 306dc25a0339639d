"""instraug report"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from instraug.cli._common import QuietOption, info, reports_errors


@reports_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (instraug expand -o).")],
    plots: Annotated[
        bool, typer.Option("--plots/--no-plots", help="Draw PNG plots (needs instraug[report]).")
    ] = True,
    quiet: QuietOption = False,
) -> None:
    """Write RUN_DIR/report.md: filter funnel, expansion factors, lengths, diversity, LLM use."""
    import importlib.util

    from instraug.report import PLOTS_DIR, PLOTS_EXTRA, write_report

    path = write_report(run_dir, plots=plots)
    info(f"report: {path}", quiet)
    if plots and importlib.util.find_spec("matplotlib") is None:
        info(f"  plots skipped: matplotlib is not installed ({PLOTS_EXTRA})", quiet)
    elif plots:
        info(f"  plots: {run_dir / PLOTS_DIR}", quiet)

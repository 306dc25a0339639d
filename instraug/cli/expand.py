"""instraug expand"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from instraug.cli._common import (
    CacheOption,
    ConfigOption,
    OfflineOption,
    QuietOption,
    info,
    reports_errors,
)


@reports_errors
def expand(
    directory: Annotated[
        Path, typer.Argument(help="MultiInstruct directory (instruction_templates.py + data).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory.")] = Path("runs/expand"),
    config: ConfigOption = None,
    cache: CacheOption = None,
    offline: OfflineOption = False,
    estimate: Annotated[
        bool, typer.Option("--estimate", help="Print the planned requests, tokens and cost; send nothing.")
    ] = False,
    quiet: QuietOption = False,
) -> None:
    """Run every stage (meta-prompts, generation, filters, assembly); redo only what changed."""
    from instraug.config import load_config
    from instraug.funnel import REASONS
    from instraug.pipeline import run_pipeline

    settings = load_config(config)
    if estimate:
        from instraug.pipeline import estimate_run

        plan = estimate_run(directory, output, settings, cache)
        for key, value in plan.items():
            typer.echo(f"{key}: {value}")
        return
    result = run_pipeline(
        directory,
        output,
        settings,
        offline=offline,
        quiet=quiet,
        cache_path=cache,
        log=lambda msg: info(msg, quiet),
    )
    report = result.report
    funnel = report["funnel"]
    info(f"generated {funnel['generated']}, kept {funnel['kept']}", quiet)
    removed, flagged = funnel["removed"], funnel["flagged"]
    for reason in (r for r in REASONS if r in flagged):  # funnel order: removed at the first rule failed
        info(f"  removed by {reason}: {removed.get(reason, 0)} (flagged {flagged[reason]})", quiet)
    for task, entry in report["achieved_factor"].items():
        flag = "  (short)" if entry["short"] else ""
        info(f"  {task}: factor {entry['achieved_factor']} of {entry['target_factor']}{flag}", quiet)
    skipped = report["assembly"].get("skipped") or {}
    if skipped:
        tasks = ", ".join(f"{task} ({n})" for task, n in skipped.items())
        info(f"  rows of tasks upstream's build skips (image-code outputs, missing tasks): {tasks}", quiet)
    written = report["assembly"].get("written")
    info(f"{written} training instances -> {output / 'train.jsonl'}; report: {output / 'report.md'}", quiet)
    outcome = report["outcome"]
    if outcome["message"]:
        # failure rows (exit 4) and a budget stop (exit 5) are said even with --quiet
        info(outcome["message"], quiet and not outcome["exit_code"])
    if outcome["exit_code"]:  # errors (exit 2 and 3) are raised, with their report written
        raise typer.Exit(outcome["exit_code"])

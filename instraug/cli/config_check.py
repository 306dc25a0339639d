"""instraug config check CONFIG"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from instraug.cli._common import reports_errors

app = typer.Typer(help="Inspect configs.", no_args_is_help=True)


@app.command("check")
@reports_errors
def check(
    config: Annotated[Path, typer.Argument(help="YAML config to validate.")],
) -> None:
    """Validate CONFIG and print it resolved, with every default filled in."""
    from instraug.config import dump_config, load_config

    typer.echo(dump_config(load_config(config)), nl=False)

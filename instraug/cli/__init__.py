"""The Typer command line: one module per command, mounted here."""

from __future__ import annotations

import typer

from instraug import __version__
from instraug.cli import (
    assemble,
    cache,
    config_check,
    expand,
    export,
    generate,
    import_templates,
    meta_prompts,
    render,
    report,
    serve,
)
from instraug.cli import filter as filter_cli

app = typer.Typer(
    name="instraug",
    help="Expand multimodal instruction-tuning data with rephrased, placeholder-safe instructions.",
    no_args_is_help=True,
    rich_markup_mode=None,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"instraug {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version."
    ),
) -> None:
    """instraug: the InstrAug pipeline (meta-prompts -> generation -> filters -> assembly)."""


app.command("expand")(expand.expand)
app.command("meta-prompts")(meta_prompts.meta_prompts)
app.command("generate")(generate.generate)
app.command("filter")(filter_cli.filter_command)
app.command("assemble")(assemble.assemble)
app.command("import-templates")(import_templates.import_templates)
app.command("render")(render.render)
app.add_typer(config_check.app, name="config")
app.command("serve")(serve.serve)
app.add_typer(cache.app, name="cache")
app.command("report")(report.report)
app.command("export")(export.export)


def main() -> None:
    app()

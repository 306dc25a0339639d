"""instraug serve"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from instraug.cli._common import ConfigOption, QuietOption, info, reports_errors


@reports_errors
def serve(
    config: ConfigOption = None,
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on; 0 picks a free one.")] = 0,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    quiet: QuietOption = False,
) -> None:
    """Run the embedded llama.cpp server in the foreground and print its base URL (Ctrl-C stops it)."""
    from instraug.config import load_config
    from instraug.errors import LLMError
    from instraug.llm.local import LocalBackend, LocalServer, exit_status, sigterm_unwinds

    settings = load_config(config).llm
    server = LocalServer(settings, host=host, port=port or None, log=None if quiet else sys.stderr)
    with sigterm_unwinds():
        try:
            server.start()
            typer.echo(server.base_url)
            info(
                f"serving {LocalBackend.resolve_model(settings)}; point a config at it with\n"
                f"  llm: {{backend: openai, base_url: {server.base_url}, "
                f"model: {LocalBackend.resolve_model(settings)}}}\nCtrl-C stops it.",
                quiet,
            )
            code = server.wait()
            raise LLMError(f"the llama.cpp server {exit_status(code)}")
        except KeyboardInterrupt:
            info("stopped", quiet)
        finally:
            server.stop()

"""instraug serve"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from instraug.cli._common import ConfigOption, QuietOption, info, reports_errors


@contextlib.contextmanager
def stop_signals(quiet: bool) -> Iterator[None]:
    """SIGTERM, and SIGINT (Ctrl-C) unless the caller ignores it, stop the server (KeyboardInterrupt).

    SIGTERM is always ours, even when inherited as ignored: a server must stop when asked to. An
    ignored SIGINT is left ignored: a shell ignores it in the jobs a script starts in the background,
    so that Ctrl-C meant for the script does not reach them, and a server should keep that promise.
    """

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, stop)
    if previous[signal.SIGINT] is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
    from instraug.llm.local import LocalBackend, LocalServer, exit_status

    settings = load_config(config).llm
    server = LocalServer(settings, host=host, port=port or None, log=None if quiet else sys.stderr)
    with stop_signals(quiet):
        try:
            server.start()
            typer.echo(server.base_url)
            info(
                f"serving {LocalBackend.resolve_model(settings)}; point a config at it with\n"
                f"  llm: {{backend: openai, base_url: {server.base_url}, "
                f"model: {LocalBackend.resolve_model(settings)}}}\nCtrl-C or SIGTERM stops it.",
                quiet,
            )
            if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # said once the server is up
                info(
                    f"SIGINT is ignored here (as in a background job): stop it with `kill {os.getpid()}`",
                    quiet,
                )
            code = server.wait()
            raise LLMError(f"the llama.cpp server {exit_status(code)}")
        except KeyboardInterrupt:
            info("stopped", quiet)
        finally:
            server.stop()

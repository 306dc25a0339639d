"""A scripted OpenAI-compatible chat server on 127.0.0.1 for tests (also runnable as a process)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Reply:
    """One scripted HTTP answer."""

    status: int = 200
    body: bytes | dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


def echo_text(body: dict[str, Any], choice: int = 0) -> str:
    """The deterministic answer of the default responder: last message, seed and choice index."""
    last = body["messages"][-1]["content"]
    return f"echo: {last} [seed {body.get('seed')} choice {choice}]"


def chat_body(
    texts: list[str], *, finish_reason: str = "stop", prompt_tokens: int = 7, model: str = "fake"
) -> dict[str, Any]:
    """A chat.completion JSON object with one choice per text."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
            }
            for i, text in enumerate(texts)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": sum(len(t.split()) for t in texts),
            "total_tokens": prompt_tokens + sum(len(t.split()) for t in texts),
        },
    }


class _QuietHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up (timeouts, a killed process) are part of the tests, not errors."""


class ScriptedOpenAIServer:
    """Answers /v1/chat/completions from a FIFO script, else with `responder` (default: echo)."""

    def __init__(self, *, max_n: int | None = None, delay: float = 0.0, log: Path | None = None) -> None:
        self.max_n = max_n
        self.delay = delay
        self.script: deque[Reply] = deque()
        self.responder: Callable[[dict[str, Any]], Reply] = self.echo
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.times: list[float] = []
        #: What GET /v1/models answers instead of the model list (a health check that fails), if set.
        self.models_reply: Reply | None = None
        self.models_checks: list[float] = []  # when /v1/models was asked
        self._log = open(log, "a", encoding="utf-8") if log else None  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self._httpd = _QuietHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        """The base URL, ending in /v1."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> ScriptedOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving."""
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._log:
            self._log.close()

    def push(self, *replies: Reply) -> None:
        """Answer the next requests with these replies, in order."""
        self.script.extend(replies)

    def echo(self, body: dict[str, Any]) -> Reply:
        """The default answer: one echo per requested choice (at most max_n)."""
        n = int(body.get("n") or 1)
        if self.max_n is not None:
            n = min(n, self.max_n)
        return Reply(body=chat_body([echo_text(body, i) for i in range(n)]), delay=self.delay)

    def _answer(self, body: dict[str, Any], headers: dict[str, str]) -> Reply:
        with self._lock:
            self.requests.append(body)
            self.headers.append(headers)
            self.times.append(time.monotonic())
            if self._log:
                self._log.write(json.dumps(body) + "\n")
                self._log.flush()
            reply = self.script.popleft() if self.script else None
        return reply or self.responder(body)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    server.models_checks.append(time.monotonic())
                    models = Reply(body={"object": "list", "data": [{"id": "fake", "object": "model"}]})
                    self._send(server.models_reply or models)
                else:
                    self._send(Reply(status=404, body={"error": {"message": "no such route"}}))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length))
                    body["messages"][-1]["content"]
                except (ValueError, KeyError, IndexError, TypeError):
                    self._send(Reply(status=400, body={"error": {"message": "bad request body"}}))
                    return
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(Reply(status=404, body={"error": {"message": "no such route"}}))
                    return
                self._send(server._answer(body, dict(self.headers.items())))

            def _send(self, reply: Reply) -> None:
                if reply.delay:
                    time.sleep(reply.delay)
                payload = reply.body
                data = payload if isinstance(payload, bytes) else json.dumps(payload or {}).encode()
                with contextlib.suppress(OSError):  # the client may have given up (timeouts)
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)

        return Handler


def main() -> None:
    """Serve until killed; write the port to --port-file and every request body to --log."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    with ScriptedOpenAIServer(delay=args.delay, log=args.log) as server:
        tmp = args.port_file.with_suffix(".tmp")
        tmp.write_text(server.url)
        tmp.rename(args.port_file)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            sys.exit(0)


if __name__ == "__main__":
    main()

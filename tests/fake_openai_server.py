"""A scripted OpenAI-compatible chat server on 127.0.0.1 for tests (also runnable as a process).

Besides /v1/chat/completions it serves the Files and Batches APIs the way OpenAI does (see
`FakeBatches`): uploads, batches that go validating -> in_progress -> completed as they are polled,
output and error files, expiry and validation failures on demand.
"""

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
from email import policy
from email.parser import BytesParser
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
        self.batches = FakeBatches(self._scripted)
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

    def _scripted(self, body: dict[str, Any]) -> Reply:
        """The answer to a batch item: the same script and responder as online requests."""
        with self._lock:
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
                    self._send(server.batches.get(_route(self.path)))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                route = _route(self.path)
                if route.startswith(("/files", "/batches")):
                    data = self.rfile.read(length)
                    self._send(server.batches.post(route, self.headers.get("Content-Type", ""), data))
                    return
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
                content_type = reply.headers.pop("Content-Type", "application/json")
                with contextlib.suppress(OSError):  # the client may have given up (timeouts)
                    self.send_response(reply.status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)

        return Handler


def _route(path: str) -> str:
    """The API route of a request path: `/v1/batches/b1?x=y` -> `/batches/b1`."""
    route = path.split("?", 1)[0].rstrip("/")
    return route[3:] if route.startswith("/v1/") else route


def _error(status: int, message: str) -> Reply:
    return Reply(status=status, body={"error": {"message": message, "type": "invalid_request_error"}})


#: The message OpenAI writes for each request a batch did not run before its window closed.
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
#: What OpenAI accepts per batch.
MAX_BATCH_REQUESTS = 50_000


@dataclass
class FakeBatch:
    """One submitted batch and what the server has done with it."""

    id: str
    input_file_id: str
    endpoint: str
    metadata: dict[str, str] | None
    created_at: int
    status: str = "validating"
    polls: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0
    completed: int = 0
    failed: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.created_at + 86400,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata,
        }


class FakeBatches:
    """The Files and Batches APIs: a batch is validated at its first poll, stays in_progress for
    `in_progress_polls` polls (or while `hold` is cleared), then runs every line through the server's
    script and responder and completes, writing an output file (status 200) and an error file (other
    statuses). `expire_next` makes the next batches expire after answering only their first lines."""

    def __init__(self, answer: Callable[[dict[str, Any]], Reply]) -> None:
        self._answer = answer
        self._lock = threading.Lock()
        self.files: dict[str, tuple[str, str, bytes]] = {}  # id -> (filename, purpose, content)
        self.batches: dict[str, FakeBatch] = {}
        self.events: list[tuple[str, str]] = []  # (API call, object id), in arrival order
        self.answered: list[dict[str, Any]] = []  # every batch line run, as sent
        self.in_progress_polls = 1
        self.hold = threading.Event()  # cleared: batches stay in_progress
        self.hold.set()
        self._expire: deque[int] = deque()
        self._refuse: deque[str] = deque()

    def expire_next(self, *, batches: int = 1, answered: int = 0) -> None:
        """The next `batches` batches expire with only their first `answered` lines run."""
        self._expire.extend([answered] * batches)

    def refuse_next(self, message: str) -> None:
        """The next batch fails validation with this message on its line 1 (as for a model that
        cannot be used in batches)."""
        self._refuse.append(message)

    def count(self, event: str) -> int:
        """How many calls of one kind arrived (`batches.create`, `files.create`, ...)."""
        return sum(1 for name, _id in self.events if name == event)

    def submitted_ids(self) -> list[list[str]]:
        """The custom_ids of each created batch, in creation order."""
        out = []
        for batch in self.batches.values():
            content = self.files[batch.input_file_id][2]
            out.append([json.loads(line)["custom_id"] for line in content.splitlines() if line.strip()])
        return out

    # -- routes -----------------------------------------------------------------------------

    def get(self, route: str) -> Reply:
        parts = route.strip("/").split("/")
        with self._lock:
            if parts == ["batches"]:
                self.events.append(("batches.list", ""))
                data = [b.as_json() for b in reversed(self.batches.values())]
                return Reply(body={"object": "list", "data": data, "has_more": False})
            if len(parts) == 2 and parts[0] == "batches" and parts[1] in self.batches:
                self.events.append(("batches.retrieve", parts[1]))
                batch = self.batches[parts[1]]
                self._advance(batch)
                return Reply(body=batch.as_json())
            if len(parts) == 3 and parts[0] == "files" and parts[2] == "content" and parts[1] in self.files:
                self.events.append(("files.content", parts[1]))
                content = self.files[parts[1]][2]
                return Reply(body=content, headers={"Content-Type": "application/octet-stream"})
            if len(parts) == 2 and parts[0] == "files" and parts[1] in self.files:
                return Reply(body=self._file_json(parts[1]))
        return _error(404, f"no such object: {route}")

    def post(self, route: str, content_type: str, data: bytes) -> Reply:
        if route == "/files":
            return self._upload(content_type, data)
        try:
            body = json.loads(data or b"{}")
        except ValueError:
            return _error(400, "bad request body")
        with self._lock:
            if route == "/batches":
                return self._create(body)
            parts = route.strip("/").split("/")
            if len(parts) == 3 and parts[2] == "cancel" and parts[1] in self.batches:
                self.events.append(("batches.cancel", parts[1]))
                batch = self.batches[parts[1]]
                batch.status = "cancelled"
                return Reply(body=batch.as_json())
        return _error(404, f"no such route: {route}")

    # -- the work ---------------------------------------------------------------------------

    def _file_json(self, file_id: str) -> dict[str, Any]:
        filename, purpose, content = self.files[file_id]
        return {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
        }

    def _add_file(self, filename: str, purpose: str, content: bytes) -> str:
        file_id = f"file-{len(self.files) + 1}"
        self.files[file_id] = (filename, purpose, content)
        return file_id

    def _upload(self, content_type: str, data: bytes) -> Reply:
        if not content_type.startswith("multipart/form-data"):
            return _error(400, "files must be uploaded as multipart/form-data")
        message = BytesParser(policy=policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + data
        )
        fields: dict[str, Any] = {}
        filename = ""
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if part.get_filename():
                filename = part.get_filename() or ""
            fields[str(name)] = part.get_payload(decode=True)
        purpose = (fields.get("purpose") or b"").decode()
        if "file" not in fields or purpose != "batch":
            return _error(400, "a file and purpose=batch are required")
        with self._lock:
            file_id = self._add_file(filename, purpose, fields["file"])
            self.events.append(("files.create", file_id))
            return Reply(body=self._file_json(file_id))

    def _create(self, body: dict[str, Any]) -> Reply:
        input_file_id = body.get("input_file_id")
        if input_file_id not in self.files or self.files[input_file_id][1] != "batch":
            return _error(400, f"no batch input file {input_file_id!r}")
        if body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h":
            return _error(400, "endpoint must be /v1/chat/completions and completion_window 24h")
        batch = FakeBatch(
            id=f"batch_{len(self.batches) + 1}",
            input_file_id=input_file_id,
            endpoint=body["endpoint"],
            metadata=body.get("metadata"),
            created_at=int(time.time()),
        )
        self.batches[batch.id] = batch
        self.events.append(("batches.create", batch.id))
        return Reply(body=batch.as_json())

    def _advance(self, batch: FakeBatch) -> None:
        """One poll: validating -> in_progress -> (after in_progress_polls polls) completed."""
        batch.polls += 1
        if batch.status == "validating":
            lines, errors = self._validate(batch)
            if self._refuse:
                errors.append({"code": "invalid_request", "line": 1, "message": self._refuse.popleft()})
            batch.total = len(lines)
            if errors:
                batch.status, batch.errors = "failed", errors
            else:
                batch.status = "in_progress"
        elif batch.status == "in_progress" and self.hold.is_set() and batch.polls > self.in_progress_polls:
            self._run(batch)

    def _validate(self, batch: FakeBatch) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The input file's lines, and what OpenAI would refuse in them."""
        lines: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        models: set[str] = set()
        content = self.files[batch.input_file_id][2]
        for number, raw in enumerate(content.decode("utf-8").splitlines(), 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
                custom_id, body = line["custom_id"], line["body"]
                ok = (
                    isinstance(custom_id, str)
                    and line["method"] == "POST"
                    and line["url"] == batch.endpoint
                    and isinstance(body.get("messages"), list)
                    and isinstance(body.get("model"), str)
                )
            except (ValueError, KeyError, TypeError, AttributeError):
                ok = False
            if not ok:
                errors.append({"code": "invalid_request", "line": number, "message": "not a request line"})
                continue
            if custom_id in seen:
                errors.append({"code": "duplicate_custom_id", "line": number, "message": "repeated"})
            seen.add(custom_id)
            models.add(body["model"])
            lines.append(line)
        if len(lines) > MAX_BATCH_REQUESTS:
            errors.append({"code": "too_many_requests", "line": None, "message": "over 50,000 requests"})
        if len(models) > 1:
            errors.append({"code": "mixed_models", "line": None, "message": "one model per batch"})
        return lines, errors

    def _run(self, batch: FakeBatch) -> None:
        """Answer the lines (all, or the first few of a batch that expires) and finish the batch."""
        content = self.files[batch.input_file_id][2]
        lines = [json.loads(raw) for raw in content.decode("utf-8").splitlines() if raw.strip()]
        run = self._expire.popleft() if self._expire else len(lines)
        outputs: list[bytes] = []
        errors: list[bytes] = []
        for number, line in enumerate(lines, 1):
            result: dict[str, Any] = {"id": f"batch_req_{batch.id}_{number}", "custom_id": line["custom_id"]}
            if number > run:
                result.update(response=None, error={"code": "batch_expired", "message": EXPIRED_MESSAGE})
                errors.append(json.dumps(result).encode())
                continue
            self.answered.append(line["body"])
            reply = self._answer(line["body"])
            payload = reply.body
            if isinstance(payload, bytes):
                try:
                    payload = json.loads(payload)
                except ValueError:
                    payload = payload.decode("utf-8", "replace")
            response = {"status_code": reply.status, "request_id": f"req_{number}", "body": payload}
            result.update(response=response, error=None)
            (outputs if reply.status == 200 else errors).append(json.dumps(result).encode())
        batch.completed = len(outputs)
        batch.failed = len(errors)
        if outputs:
            batch.output_file_id = self._add_file("output.jsonl", "batch_output", b"\n".join(outputs) + b"\n")
        if errors:
            batch.error_file_id = self._add_file("errors.jsonl", "batch_output", b"\n".join(errors) + b"\n")
        batch.status = "expired" if run < len(lines) else "completed"


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

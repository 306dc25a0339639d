"""Shared fixtures: the MultiInstruct reference data, the fixture checkout, a CLI runner."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import settings
from typer.testing import CliRunner, Result

from instraug.cli import app

# No per-example deadline: a busy machine must not turn a slow example into a failure.
settings.register_profile("instraug", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "instraug"))

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def shared_dir() -> Path:
    """The MultiInstruct reference data: $INSTRAUG_SHARED, else ../shared/multiinstruct."""
    override = os.environ.get("INSTRAUG_SHARED")
    return Path(override) if override else REPO_ROOT.parent / "shared" / "multiinstruct"


@pytest.fixture(scope="session")
def shared() -> Path:
    """The reference data folder; tests using it skip when it is absent (it is read in place)."""
    folder = shared_dir()
    missing = [n for n in ("templates.json", "train.jsonl") if not (folder / n).is_file()]
    if missing:
        pytest.skip(
            f"MultiInstruct reference data not found: {folder} lacks {', '.join(missing)} "
            "(set INSTRAUG_SHARED to the folder holding templates.json and train.jsonl)"
        )
    return folder


@pytest.fixture(scope="session")
def shared_train(shared: Path) -> list[dict[str, Any]]:
    """The 59 built training lines of the reference data, in file order."""
    with open(shared / "train.jsonl", "rb") as fp:
        return [orjson.loads(line) for line in fp if line.strip()]


@pytest.fixture
def mini_templates() -> Path:
    """An instruction_templates.py in the upstream structure, with its tricky cases."""
    return FIXTURES / "multiinstruct_mini" / "instruction_templates.py"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def cli(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    """Invoke `instraug ARGS...`; stdout and stderr are kept apart (result.stdout / .stderr)."""
    monkeypatch.delenv("INSTRAUG_DEBUG", raising=False)

    def invoke(*args: str | Path, input: str | bytes | None = None) -> Result:
        return runner.invoke(app, [str(a) for a in args], input=input)

    return invoke

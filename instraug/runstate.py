"""Stage fingerprints of a run directory, so a re-run redoes only what its inputs changed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import orjson

from instraug import __version__

STATE_FILE = ".instraug-state.json"


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fp:
        for block in iter(lambda: fp.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(*parts: Any) -> str:
    """sha256 of the canonical JSON of what determines a stage's output."""
    blob = orjson.dumps([__version__, *parts], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(blob).hexdigest()


class RunState:
    """Which stage outputs of a run directory are up to date."""

    def __init__(self, directory: Path):
        self.path = directory / STATE_FILE
        try:
            self.stages: dict[str, dict[str, Any]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.stages = {}

    def fresh(self, stage: str, output: Path, print_: str) -> bool:
        """True when `output` exists, was made from inputs with this fingerprint, and is unchanged."""
        entry = self.stages.get(stage)
        return bool(
            entry
            and entry.get("inputs") == print_
            and output.is_file()
            and entry.get("output") == file_digest(output)
        )

    def summary(self, stage: str) -> dict[str, Any]:
        """What the stage reported when it last ran."""
        return dict(self.stages.get(stage, {}).get("summary") or {})

    def forget(self, stage: str) -> None:
        """Mark a stage as not up to date."""
        if self.stages.pop(stage, None) is not None:
            self._save()

    def record(self, stage: str, output: Path, print_: str, summary: dict[str, Any] | None = None) -> None:
        self.stages[stage] = {"inputs": print_, "output": file_digest(output), "summary": summary or {}}
        self._save()

    def _save(self) -> None:
        # A temporary name of its own: a fixed one would be shared by anything else writing here.
        fd, name = tempfile.mkstemp(prefix=f".{STATE_FILE}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fp:
                fp.write(json.dumps(self.stages, indent=1, sort_keys=True))
            os.replace(name, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name)
            raise

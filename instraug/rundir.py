"""A run directory: its file names, the stage fingerprints that let a re-run redo only what changed,
its lock, and the one rule that says which response cache a command uses."""

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
from instraug.locks import run_dir_lock  # noqa: F401  (one writer per run directory)

# The files of a run directory (`instraug expand -o RUN_DIR`).
TEMPLATES = "templates.jsonl"
META_PROMPTS = "meta_prompts.jsonl"
GENERATIONS = "generations.jsonl"
INSTRUCTIONS = "instructions.jsonl"
REJECTED = "rejected.jsonl"
TRAIN = "train.jsonl"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOTS = "report"
CACHE = "cache.sqlite"
STATE_FILE = ".instraug-state.json"

#: The response cache of a command run outside any run directory.
DEFAULT_CACHE_PATH = Path(".instraug") / "llm-cache.sqlite"


def is_run_dir(path: Path) -> bool:
    """True when `path` is a directory `instraug expand` wrote."""
    return (path / STATE_FILE).is_file()


def cache_path(
    override: str | Path | None = None, configured: str | None = None, run_dir: Path | None = None
) -> Path:
    """The response cache a command uses; every command asks here.

    `--cache` (a file, or a run directory: its cache), else `llm.cache_path`, else the run
    directory's cache (`expand`; other commands: the current directory when it is a run
    directory), else `.instraug/llm-cache.sqlite`.
    """
    if override is not None:
        path = Path(override)
        return path / CACHE if path.is_dir() else path
    if configured:
        return Path(configured)
    if run_dir is None and is_run_dir(Path.cwd()):
        return Path(CACHE)
    return run_dir / CACHE if run_dir is not None else DEFAULT_CACHE_PATH


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

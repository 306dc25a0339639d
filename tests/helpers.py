"""Small helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, "rb") as fp:
        return [orjson.loads(line) for line in fp if line.strip()]


def pool_row(task: str, index: int | str, template: str, origin: str = "original", **extra: Any) -> dict:
    """One instruction-pool row; generated rows point back to an original root."""
    instruction_id = f"{task}/{index}" if origin == "original" else f"{task}/g{index}"
    return {
        "task": task,
        "variant": extra.pop("variant", None),
        "instruction_id": instruction_id,
        "template": template,
        "origin": origin,
        "parent_id": None if origin == "original" else f"{task}/0",
        "root_id": instruction_id if origin == "original" else f"{task}/0",
        **extra,
    }

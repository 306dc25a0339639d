"""Small helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import random
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


#: Tasks whose options upstream replaces by `next` and `previous` in an order it does not store.
STEP_ORDER_TASKS = {"wikihow_text_image_step_order", "wikihow_image_text_step_order"}


class FixedOrder(random.Random):
    """An rng whose shuffle puts a list in a given order (the order upstream happened to draw)."""

    def __init__(self, order: tuple[str, ...]):
        super().__init__(0)
        self.order = order

    def shuffle(self, x: Any) -> None:  # type: ignore[override]
        assert sorted(x) == sorted(self.order)
        x[:] = self.order

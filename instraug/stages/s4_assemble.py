"""Stage 4: instances x instruction pool -> MIns+ training rows (seeded epsilon mix, streaming)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from instraug.errors import InputError
from instraug.multiinstruct import render_fields
from instraug.placeholders import RenderError
from instraug.pool import InstructionPool, PoolEntry

InstanceRow = tuple[str, int, str, dict[str, Any]]


@dataclass
class AssemblySummary:
    written: int = 0
    by_origin: Counter[str] = field(default_factory=Counter)
    by_task: Counter[str] = field(default_factory=Counter)
    held_out: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "written": self.written,
            "by_origin": dict(sorted(self.by_origin.items())),
            "tasks": len(self.by_task),
            "held_out": dict(sorted(self.held_out.items())),
        }


def assemble(
    pool: InstructionPool,
    instances: Iterable[InstanceRow],
    *,
    epsilon: float,
    seed: int,
    held_out: Iterable[str] = (),
    shuffle_options: bool = False,
    summary: AssemblySummary | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield one training row per instance of a kept task, its instruction drawn from the pool."""
    rng = random.Random(seed)
    skip = frozenset(held_out)
    summary = summary if summary is not None else AssemblySummary()
    by_origin, by_task = summary.by_origin, summary.by_task
    for name, line, task, instance in instances:
        if task in skip:
            summary.held_out[task] += 1
            continue
        # the instance dict is this row's own (read fresh from its line), so it becomes the output row
        if shuffle_options and isinstance(instance.get("options"), list):
            options = list(instance["options"])
            rng.shuffle(options)
            instance["options"] = options
        try:
            fields = render_fields(task, instance, rng, pool.needs.get(task))
            entry = _draw(pool, task, fields, rng, epsilon)
            if entry is None:
                raise InputError(f"task {task!r} has no templates in the pool", name, line)
            instance["prompt"] = entry.compiled.render(fields)
        except RenderError as exc:
            raise InputError(f"task {task}: {exc}", name, line) from None
        if "target" not in instance:
            if "target_txt" not in instance:
                raise InputError("missing field 'target_txt' (the training target)", name, line)
            instance["target"] = instance["target_txt"]
        origin = entry.row.origin
        instance["instruction_id"] = entry.row.instruction_id
        instance["instruction_origin"] = origin
        summary.written += 1
        by_origin[origin] += 1
        by_task[task] += 1
        yield instance


def _draw(
    pool: InstructionPool, task: str, fields: dict[str, Any], rng: random.Random, epsilon: float
) -> PoolEntry | None:
    template_set = pool.sets_for(task, fields)
    if template_set is None:
        return None
    original, generated = template_set.original, template_set.generated
    use_original = rng.random() < epsilon
    choices = original if (use_original and original) or not generated else generated
    # int(random() * n) rather than randrange(n): same uniform draw for small n, 3x cheaper
    return choices[int(rng.random() * len(choices))] if choices else None


def render_all(
    pool: InstructionPool, instances: Iterable[InstanceRow], *, seed: int = 0
) -> Iterator[dict[str, Any]]:
    """Every template of each instance's task (and variant), rendered on that instance."""
    rng = random.Random(seed)
    for name, line, task, instance in instances:
        try:
            fields = render_fields(task, instance, rng)
            template_set = pool.sets_for(task, fields)
            if template_set is None:
                raise InputError(f"task {task!r} has no templates in the pool", name, line)
            for entry in template_set.all:
                yield {
                    "unique_id": instance.get("unique_id"),
                    "task": task,
                    "template_id": entry.row.instruction_id,
                    "prompt": entry.compiled.render(fields),
                }
        except RenderError as exc:
            raise InputError(f"task {task}: {exc}", name, line) from None

"""Stage 4: instances x instruction pool -> MIns+ training rows (seeded epsilon mix, streaming)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from instraug.derived import derived_names, render_fields
from instraug.errors import InputError
from instraug.placeholders import RenderError
from instraug.pool import InstructionPool

#: (file, line, task, built instance or None for a task upstream's build skips)
InstanceRow = tuple[str, int, str, "dict[str, Any] | None"]


@dataclass
class AssemblySummary:
    written: int = 0
    by_origin: Counter[str] = field(default_factory=Counter)
    by_task: Counter[str] = field(default_factory=Counter)
    held_out: Counter[str] = field(default_factory=Counter)
    #: rows of tasks upstream's build skips (image-code outputs, missing tasks), per task
    skipped: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "written": self.written,
            "by_origin": dict(sorted(self.by_origin.items())),
            "tasks": len(self.by_task),
            "held_out": dict(sorted(self.held_out.items())),
            "skipped": dict(sorted(self.skipped.items())),
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
    random_ = rng.random
    skip = frozenset(held_out)
    summary = summary if summary is not None else AssemblySummary()
    plans: dict[str, _TaskPlan] = {}
    counts: dict[tuple[str, str], int] = {}  # (task, origin) -> rows
    try:
        for name, line, task, instance in instances:
            if instance is None:
                summary.skipped[task] += 1
                continue
            plan = plans.get(task)
            if plan is None:
                plan = plans[task] = _TaskPlan(pool, task, task in skip)
            if plan.held_out:
                summary.held_out[task] += 1
                continue
            # the instance dict is this row's own (read fresh from its line): it becomes the output row
            if shuffle_options and isinstance(instance.get("options"), list):
                options = list(instance["options"])
                rng.shuffle(options)
                instance["options"] = options
            try:
                fields = render_fields(task, instance, rng, plan.needs) if plan.derives else instance
                template_set = plan.template_set or pool.sets_for(task, fields)
                if template_set is None:
                    raise InputError(f"task {task!r} has no templates in the pool", name, line)
                original, generated = template_set.original, template_set.generated
                # int(random() * n) rather than randrange(n): the same uniform draw, far cheaper
                choices = original if (random_() < epsilon and original) or not generated else generated
                entry = choices[int(random_() * len(choices))]
                instance["prompt"] = entry.render(fields)
            except RenderError as exc:
                raise InputError(f"task {task}: {exc}", name, line) from None
            if "target" not in instance:
                if "target_txt" not in instance:
                    raise InputError("missing field 'target_txt' (the training target)", name, line)
                instance["target"] = instance["target_txt"]
            instance["instruction_id"] = entry.instruction_id
            instance["instruction_origin"] = entry.origin
            key = (task, entry.origin)
            counts[key] = counts.get(key, 0) + 1
            yield instance
    finally:
        for (task, origin), n in counts.items():
            summary.written += n
            summary.by_origin[origin] += n
            summary.by_task[task] += n


class _TaskPlan:
    """What assembly needs to know about a task, worked out once."""

    __slots__ = ("held_out", "needs", "derives", "template_set")

    def __init__(self, pool: InstructionPool, task: str, held_out: bool):
        self.held_out = held_out
        self.needs = pool.needs.get(task, frozenset())
        sets = pool.tasks.get(task, {})
        # one set without a variant condition: no per-instance choice to make
        self.template_set = sets[None] if list(sets) == [None] else None
        self.derives = bool(self.template_set is None or self.needs & derived_names(task))


def render_all(
    pool: InstructionPool, instances: Iterable[InstanceRow], *, seed: int = 0
) -> Iterator[dict[str, Any]]:
    """Every template of each instance's task (and variant), rendered on that instance."""
    rng = random.Random(seed)
    for name, line, task, instance in instances:
        if instance is None:
            continue
        try:
            fields = render_fields(task, instance, rng)
            template_set = pool.sets_for(task, fields)
            if template_set is None:
                raise InputError(f"task {task!r} has no templates in the pool", name, line)
            for entry in template_set.all:
                yield {
                    "unique_id": instance.get("unique_id"),
                    "task": task,
                    "template_id": entry.instruction_id,
                    "prompt": entry.render(fields),
                }
        except RenderError as exc:
            raise InputError(f"task {task}: {exc}", name, line) from None

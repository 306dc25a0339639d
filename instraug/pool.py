"""An instruction pool loaded for rendering: rows grouped by task and variant, compiled once."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from instraug.derived import CONSTANTS, derived_names
from instraug.errors import InputError, TemplateError, validation_reason
from instraug.jsonl import read_jsonl
from instraug.placeholders import CompiledTemplate
from instraug.records import Instruction
from instraug.variants import VariantSelector


class PoolEntry:
    """A pool row with its template compiled (and its ids at hand for the hot loop)."""

    __slots__ = ("row", "compiled", "render", "instruction_id", "origin")

    def __init__(self, row: Instruction, compiled: CompiledTemplate):
        self.row = row
        self.compiled = compiled
        self.render = compiled.render
        self.instruction_id = row.instruction_id
        self.origin = row.origin


@dataclass
class TemplateSet:
    """The instructions of one task (and variant), split by origin."""

    selector: VariantSelector | None
    original: list[PoolEntry] = field(default_factory=list)
    generated: list[PoolEntry] = field(default_factory=list)

    @property
    def all(self) -> list[PoolEntry]:
        return self.original + self.generated


class InstructionPool:
    """Task -> template sets; picks the variant that applies to an instance."""

    def __init__(self, rows: Iterable[tuple[str, int, Instruction]]):
        self.tasks: dict[str, dict[str | None, TemplateSet]] = {}
        self.needs: dict[str, frozenset[str]] = {}
        seen: dict[str, tuple[str, int]] = {}
        for name, line, row in rows:
            if row.instruction_id in seen:
                first = seen[row.instruction_id]
                raise InputError(
                    f"duplicate instruction_id {row.instruction_id!r} (first at {first[0]}:{first[1]})",
                    name,
                    line,
                )
            seen[row.instruction_id] = (name, line)
            try:
                compiled = CompiledTemplate(row.template, CONSTANTS)
            except TemplateError as exc:
                raise TemplateError(f"{row.instruction_id}: {exc.reason}", name, line) from None
            sets = self.tasks.setdefault(row.task, {})
            if row.variant not in sets:
                try:
                    selector = VariantSelector(row.variant, row.task) if row.variant else None
                except TemplateError as exc:
                    raise TemplateError(f"variant: {exc.reason}", name, line) from None
                sets[row.variant] = TemplateSet(selector)
            target = sets[row.variant].original if row.origin == "original" else sets[row.variant].generated
            target.append(PoolEntry(row, compiled))
            self.needs[row.task] = self.needs.get(row.task, frozenset()) | compiled.roots
        for task, sets in self.tasks.items():
            if any(variant is not None for variant in sets):
                # choosing a variant may read any derived value
                self.needs[task] = self.needs[task] | derived_names(task)

    @classmethod
    def load(cls, path: str | Path) -> InstructionPool:
        name = "<stdin>" if str(path) == "-" else str(path)
        return cls(_validated(read_jsonl(path), name))

    def sets_for(self, task: str, fields: Mapping[str, Any]) -> TemplateSet | None:
        """The template set of `task` that applies to an instance with these fields."""
        sets = self.tasks.get(task)
        if not sets:
            return None
        if None in sets and len(sets) == 1:
            return sets[None]
        for variant, template_set in sets.items():
            if template_set.selector is None or template_set.selector.matches(fields):
                return sets[variant]
        return None


_POOL_ROW_MISSING = "missing (a pool row needs task, instruction_id, template, origin, root_id)"


def _validated(
    rows: Iterable[tuple[int, dict[str, Any]]], name: str
) -> Iterable[tuple[str, int, Instruction]]:
    for line, raw in rows:
        try:
            yield name, line, Instruction.model_validate(raw)
        except ValidationError as exc:
            raise InputError(validation_reason(exc, missing=_POOL_ROW_MISSING), name, line) from None

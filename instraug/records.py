"""Typed rows that cross stage boundaries. Instances stay plain dicts: every field is kept."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Instruction(BaseModel):
    """One row of an instruction pool: an original template or a generated rephrasing."""

    model_config = ConfigDict(extra="allow")

    task: str = Field(min_length=1)
    variant: str | None = None
    instruction_id: str = Field(min_length=1)
    template: str
    origin: Literal["original", "generated"]
    parent_id: str | None = None
    root_id: str = Field(min_length=1)


class Template(Instruction):
    """An expert-written template as `import-templates` writes it: a pool row of an original."""

    template_id: str
    placeholders: list[str]
    origin: Literal["original", "generated"] = "original"

    def as_row(self) -> dict[str, object]:
        """The JSONL row, keys in reading order."""
        data = self.model_dump(mode="json")
        order = ("task", "variant", "template_id", "template", "placeholders")
        return {**{k: data[k] for k in order}, **{k: v for k, v in data.items() if k not in order}}


class MetaPrompt(BaseModel):
    """A meta-prompt: how to ask the LLM for a rephrasing."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    text: str = Field(min_length=1)
    origin: Literal["direct", "bootstrap", "curated"]

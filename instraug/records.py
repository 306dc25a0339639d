"""Typed rows that cross stage boundaries. Instances stay plain dicts: every field is kept."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from instraug.placeholders import placeholders_of


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


class Generation(BaseModel):
    """A stage-2 generation row (the stage 2 -> 3 contract); fields the rules do not read are kept."""

    model_config = ConfigDict(extra="allow")

    template_id: str = Field(min_length=1)
    task: str = Field(min_length=1)
    variant: str | None = None
    root_id: str = Field(min_length=1)
    parent_id: str | None = None
    parent_template: str
    root_template: str
    masked: str | None = None
    mapping: dict[str, str] | None = None
    raw: str | None = None
    error: Any = None
    request_hash: str | None = None
    meta_prompt_id: str | None = None
    temperature: float | None = None
    sample_index: int | None = None
    iteration: int | None = None
    model: str | None = None


@dataclass
class Verdict:
    """The judgment of one generation row."""

    reasons: list[str]
    cleaned: str | None = None
    template: str | None = None
    instruction: dict[str, Any] | None = None  # the pool row, when kept
    notes: dict[str, str] = field(default_factory=dict)  # reason -> detail

    @property
    def kept(self) -> bool:
        return not self.reasons


def instruction_id(row: dict[str, Any]) -> str:
    """`<root_id>~g<10 hex>`, from the request hash (else from what determines the request).

    The request hash covers the prompt, the model, the sampling parameters and the sample
    index, so the id of a rewrite never depends on the other rows of the file.
    """
    basis = row.get("request_hash") or json.dumps(
        [
            row.get(k)
            for k in ("root_id", "parent_id", "parent_template", "iteration", "meta_prompt_id")
            + ("temperature", "sample_index", "model")
        ],
        ensure_ascii=False,
    )
    digest = hashlib.sha256(str(basis).encode("utf-8")).hexdigest()[:10]
    return f"{row['root_id']}~g{digest}"


def pool_row(gen: Generation, template: str) -> dict[str, Any]:
    """A kept rewrite as an instruction-pool row (it also reads as a `Template`)."""
    iid = instruction_id(gen.model_dump())
    return {
        "task": gen.task,
        "variant": gen.variant,
        "instruction_id": iid,
        "template_id": iid,
        "template": template,
        "placeholders": placeholders_of(template),
        "origin": "generated",
        "parent_id": gen.parent_id or gen.template_id,
        "root_id": gen.root_id,
        "meta_prompt_id": gen.meta_prompt_id,
        "temperature": gen.temperature,
        "iteration": gen.iteration,
        "model": gen.model,
        "request_hash": gen.request_hash,
    }

"""What MultiInstruct's build_instruction defines and computes before it picks a template: its string
constants, and the task-specific derived fields (given_region, region_info, dial_history, ...)."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

from instraug.placeholders import RenderError

#: The string constants MultiInstruct's build_instruction defines, by name.
CONSTANTS: dict[str, str] = {
    "options_token": "\n\n[Options]:",
    "split_token": "||||",
    "region_split_token": "||||",
    "image_token": "image",
    "region_token": "Regions: ",
}
SPLIT = CONSTANTS["split_token"]
OPTIONS_TOKEN = CONSTANTS["options_token"]


def _object_regions(instance: Mapping[str, Any], key: str) -> list[Any]:
    meta = instance.get("meta_data")
    regions = meta.get("object_regions") if isinstance(meta, dict) else None
    if not isinstance(regions, dict) or key not in regions:
        raise RenderError(f"missing meta_data.object_regions.{key}")
    value = regions[key]
    if not isinstance(value, list):
        raise RenderError(f"meta_data.object_regions.{key} is not a list")
    return value


def _join_regions(key: str) -> Callable[[Mapping[str, Any], random.Random], Any]:
    return lambda instance, _rng: SPLIT.join(map(str, _object_regions(instance, key)))


def _wikihow_context(instance: Mapping[str, Any], _rng: random.Random) -> str:
    context = instance.get("context")
    if not isinstance(context, list):
        raise RenderError("field 'context' must be a list of steps")
    return "\n".join(map(str, context)) if context else '"nothing"'


def _step_order_options(_instance: Mapping[str, Any], rng: random.Random) -> list[str]:
    options = ["next", "previous"]
    rng.shuffle(options)
    return options


def _region_info(instance: Mapping[str, Any], _rng: random.Random) -> str:
    meta = instance.get("meta_data")
    regions = meta.get("object_regions") if isinstance(meta, dict) else None
    if not isinstance(regions, dict):
        raise RenderError("missing meta_data.object_regions")
    parts = []
    for key, value in regions.items():
        if not isinstance(value, list) or not value:
            raise RenderError(f"meta_data.object_regions.{key} must be a non-empty list of regions")
        parts.append(f"{key} is in {value[0]}.")
    return " ".join(parts)


def _dial_history(instance: Mapping[str, Any], _rng: random.Random) -> list[str]:
    meta = instance.get("meta_data")
    turns = meta.get("dialog_hist") if isinstance(meta, dict) else None
    if not isinstance(turns, list):
        raise RenderError("missing meta_data.dialog_hist")
    out = []
    for turn in turns:
        if not isinstance(turn, dict) or "q" not in turn or "a" not in turn:
            raise RenderError("meta_data.dialog_hist turns need 'q' and 'a'")
        out.append(f"{turn['q']}, {turn['a']};")
    return out


Deriver = Callable[[Mapping[str, Any], random.Random], Any]

#: task -> {field name: how to compute it from the instance}
DERIVED: dict[str, dict[str, Deriver]] = {
    "visual_object_region": {"region": _join_regions("subject")},
    "visual_subject_region": {"region": _join_regions("object")},
    "wikihow_next_step": {"context": _wikihow_context},
    "wikihow_text_image_step_order": {"options": _step_order_options},
    "wikihow_image_text_step_order": {"options": _step_order_options},
    "commonsense_VQA": {"region_info": _region_info},
    "visual_answer_justification": {"region_info": _region_info},
    "visual_dialog": {"dial_history": _dial_history},
    **{
        task: {"given_region": _join_regions("given_region")}
        for task in (
            "select_overlap_most_region",
            "select_overlap_least_region",
            "select_overlaped_region",
            "select_nonoverlaped_region",
            "if_region_overlap",
        )
    },
}


def derived_names(task: str) -> set[str]:
    return {"options_str", *DERIVED.get(task, {})}


def render_fields(
    task: str, instance: dict[str, Any], rng: random.Random, needs: frozenset[str] | None = None
) -> dict[str, Any]:
    """The instance's fields as the templates of its task see them (derived values included).

    `needs` limits the derived values to those some template reads; None derives them all.
    The instance itself is never modified.
    """
    derivers = DERIVED.get(task)
    wants_options_str = needs is None or "options_str" in needs
    if derivers is None and not (wants_options_str and instance.get("options").__class__ is list):
        return instance
    fields = dict(instance)
    if derivers:
        for key, derive in derivers.items():
            if needs is None or key in needs:
                fields[key] = derive(instance, rng)
    options = fields.get("options")
    if wants_options_str and isinstance(options, list):
        fields["options_str"] = f"{OPTIONS_TOKEN} {SPLIT.join(map(str, options))}"
    return fields

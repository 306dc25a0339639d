"""Instances of a MultiInstruct checkout, as upstream's build_dataset.py sees them before rendering.

A checkout holds raw rows (`training_data/<task>/train.jsonl`) whose regions are lists of
numbers; upstream's build turns them into strings, takes the target of region-output tasks from
the regions and skips the tasks it cannot build. `build_instance` does the same, in the same
order, and leaves a value that is already a string alone: built and raw rows read the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from instraug.errors import InputError
from instraug.jsonl import read_jsonl

#: Tasks whose outputs are image codes (upstream's build skips them) and tasks upstream marks missing.
SKIPPED_TASKS: frozenset[str] = frozenset(
    {
        "image_generation",
        "infilling",
        "im_region_extraction",
        "im_descriptive_infilling",
        "image_completion",
        "image_completion_w_image_caption",
        "image_completion_w_region_caption",
        "im_descriptive_extraction",
        "VQA_absurd",
        "region_area",
    }
)

#: Tasks whose target is the regions, written out.
REGION_OUTPUT_TASKS: frozenset[str] = frozenset(
    {
        "detection",
        "VG",
        "object_region_selection",
        "region_generation",
        "pointing_grounded_VQA",
        "descriptive_object_region_generate",
        "text_localization",
        "visual_object_region",
        "visual_subject_region",
        "descriptive_object_region_select",
        "VG_selection",
        "grounded_VQA",
        "select_overlap_most_region",
        "select_overlap_least_region",
        "select_overlaped_region",
        "select_nonoverlaped_region",
    }
)

_OVERLAP_TASKS = (
    "select_overlap_most_region",
    "select_overlap_least_region",
    "select_overlaped_region",
    "select_nonoverlaped_region",
)

#: Tasks whose options are regions.
REGION_OPTION_TASKS: frozenset[str] = frozenset(
    {
        "object_region_selection",
        "pointing_grounded_VQA",
        "text_localization",
        "descriptive_object_region_select",
        "VG_selection",
        "grounded_VQA",
        *_OVERLAP_TASKS,
    }
)

#: Tasks with regions in meta_data.object_regions.
META_REGION_TASKS: frozenset[str] = frozenset(
    {
        "visual_answer_justification",
        "commonsense_VQA",
        "visual_object_region",
        "visual_subject_region",
        "if_region_overlap",
        *_OVERLAP_TASKS,
    }
)

Row = tuple[str, int, str, "dict[str, Any] | None"]


class BuildError(ValueError):
    """A raw row that upstream's build could not turn into a built one."""


def _is_number(value: object) -> bool:
    return value.__class__ in (int, float)  # not bool: true is no coordinate


def join_region(region: object, where: str) -> str:
    """A region as upstream writes it: its numbers as str() shows them, joined by one space."""
    if isinstance(region, str):
        return region  # built before
    if isinstance(region, list) and region and all(map(_is_number, region)):
        return " ".join(map(str, region))
    raise BuildError(f"{where}: a region must be a list of numbers or a string, got {_show(region)}")


def _regions(value: object, where: str) -> list[str]:
    if not isinstance(value, list):
        raise BuildError(f"{where}: expected a list of regions, got {_show(value)}")
    return [join_region(region, f"{where}[{i}]") for i, region in enumerate(value)]


def _meta_regions(value: object, where: str) -> list[str]:
    # training rows hold a list of regions per key, test rows one flat region
    if isinstance(value, list) and value and all(map(_is_number, value)):
        return [join_region(value, where)]
    return _regions(value, where)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def build_instance(task: str, instance: dict[str, Any]) -> dict[str, Any] | None:
    """The row upstream's build renders (None: a task it skips); converts `instance` in place."""
    if task in SKIPPED_TASKS:
        return None
    if "region" in instance:
        regions = instance["region"] = _regions(instance["region"], "region")
        if task in REGION_OUTPUT_TASKS:
            instance["target_txt"] = " ".join(regions)
    if task in REGION_OPTION_TASKS and "options" in instance:
        instance["options"] = _regions(instance["options"], "options")
    if task in META_REGION_TASKS:
        meta = instance.get("meta_data")
        object_regions = meta.get("object_regions") if isinstance(meta, dict) else None
        if isinstance(object_regions, dict):
            for key, value in object_regions.items():
                object_regions[key] = _meta_regions(value, f"meta_data.object_regions.{key}")
    return instance


def instance_files(path: str | Path, split: str = "train") -> list[Path]:
    """The instance files of a MultiInstruct directory (or the file itself)."""
    root = Path(path)
    if str(path) == "-" or root.is_file():
        return [root]
    if not root.is_dir():
        raise InputError("no such file or directory", str(path))
    data_dir = "training_data" if split == "train" else "testing_data"
    files = sorted((root / data_dir).glob(f"*/{split}.jsonl"))
    if not files and (root / f"{split}.jsonl").is_file():
        files = [root / f"{split}.jsonl"]
    if not files:
        raise InputError(f"no instances: expected {data_dir}/*/{split}.jsonl or {split}.jsonl", str(path))
    return files


def read_instances(path: str | Path, split: str = "train") -> Iterator[Row]:
    """Yield (file, line, task, built instance); the instance is None for a task upstream skips.

    The task is `task_name`, else the task folder's name.
    """
    for file in instance_files(path, split):
        folder = file.parent.name if file.parent.parent.name.endswith("_data") else None
        name = "<stdin>" if str(file) == "-" else str(file)
        for line, instance in read_jsonl(file):
            task = instance.get("task_name")
            if task is None or task == "":
                task = folder
            if task is not None and not isinstance(task, str):
                raise InputError(f"task_name must be a string, got {_show(task)}", name, line)
            if not task:
                raise InputError("instance has no task_name", name, line)
            try:
                yield name, line, task, build_instance(task, instance)
            except BuildError as exc:
                raise InputError(f"task {task}: {exc}", name, line) from None

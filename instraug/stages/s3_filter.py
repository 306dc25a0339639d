"""Stage 3 over files: generation rows -> the rules (s3_rules) -> the instruction pool + rejected rows.

`filter_generations` streams a file of rows through a `RuleChain`; `filter_to_pool` writes the
pool (originals first, then kept rewrites) and the rejected rows; `sample_instances` reads the
instances the render check uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instraug.config import FilterConfig
from instraug.errors import InputError
from instraug.funnel import FilterSummary
from instraug.instances import instance_files, read_instances
from instraug.jsonl import atomic_writer, read_jsonl
from instraug.pool import _validated as validated_rows  # the pool's own row validation
from instraug.records import Verdict
from instraug.stages.s3_rules import RuleChain, validate_generation

if TYPE_CHECKING:
    from instraug.stages.s3_judge import Judge


@dataclass
class Judged:
    """One input row, where it was read, and its verdict."""

    line: int
    row: Mapping[str, Any]
    verdict: Verdict

    def rejected_row(self) -> dict[str, Any]:
        """The generation row with its reasons, the cleaned reply and the candidate template."""
        verdict = self.verdict
        return {
            **self.row,
            "kept": False,
            "reasons": verdict.reasons,
            "notes": verdict.notes,
            "cleaned": verdict.cleaned,
            "candidate": verdict.template,
        }


def filter_generations(
    rows: Iterable[tuple[int, Mapping[str, Any]]],
    chain: RuleChain,
    source: str = "<input>",
    batch_size: int = 256,
) -> Iterator[Judged]:
    """Judge (line, generation row) pairs in order; errors in a row name `source:line`.

    With embeddings in use, rows are read `batch_size` at a time and embedded together first.
    """
    it = iter(rows)
    size = batch_size if chain.batches else 1
    while batch := list(islice(it, size)):
        if chain.batches:
            chain.prefetch(row for _line, row in batch)
        for line, row in batch:
            try:
                verdict = chain.judge(row)
            except InputError as exc:
                raise type(exc)(exc.reason, source, line) from None
            yield Judged(line, row, verdict)


def sample_instances(
    path: str | Path, split: str = "train", tasks: Iterable[str] | None = None, per_task: int = 1
) -> dict[str, list[dict[str, Any]]]:
    """The first `per_task` instances of each task (of `tasks`, if given), for the render check.

    A file of a task folder is read only until the tasks it showed have their samples.
    """
    wanted = set(tasks) if tasks is not None else None
    samples: dict[str, list[dict[str, Any]]] = {}
    for file in instance_files(path, split):
        one_task = file.parent.parent.name.endswith("_data")
        seen: set[str] = set()
        for _name, _line, task, instance in read_instances(file, split):
            if instance is None:
                continue
            seen.add(task)
            if wanted is None or task in wanted:
                bucket = samples.setdefault(task, [])
                if len(bucket) < per_task:
                    bucket.append(instance)
            if one_task and all(len(samples.get(t, ())) >= per_task for t in seen & (wanted or seen)):
                break
        if wanted is not None and all(len(samples.get(t, ())) >= per_task for t in wanted):
            break
    return samples


@dataclass
class PoolWritten:
    """What `filter_to_pool` wrote: how many originals, and the funnel of the rewrites."""

    originals: int
    funnel: FilterSummary

    def as_dict(self) -> dict[str, Any]:
        return {"originals": self.originals, **self.funnel.as_dict()}


def filter_to_pool(
    generations: str | Path,
    templates: str | Path,
    output: str | Path,
    rejected: str | Path | None = None,
    config: FilterConfig | None = None,
    samples: Mapping[str, Mapping[str, Any] | Sequence[Mapping[str, Any]]] | None = None,
    judge: Judge | None = None,
    examples: Sequence[str] = (),
) -> PoolWritten:
    """Judge every row of `generations` again, then write the rows of `templates` and every kept
    rewrite as one pool (`instraug filter`; `expand` builds its pool from stage 2's verdicts).

    Rejected rows go to `rejected` (if given) with their reasons. Both files appear only when
    every row was read.
    """
    originals = [row for _name, _line, row in validated_rows(read_jsonl(templates), _name_of(templates))]
    chain = RuleChain(config, samples, originals=originals, judge=judge, examples=examples)
    with contextlib.ExitStack() as stack:
        stack.enter_context(chain)
        out = stack.enter_context(atomic_writer(output))
        bad = stack.enter_context(atomic_writer(rejected)) if rejected is not None else None
        for row in originals:
            out.write(row.model_dump(mode="json"))
        for judged in filter_generations(read_jsonl(generations), chain, _name_of(generations)):
            if judged.verdict.instruction is not None:
                out.write(judged.verdict.instruction)
            elif bad is not None:
                bad.write(judged.rejected_row())
    return PoolWritten(len(originals), chain.summary)


def _name_of(path: str | Path) -> str:
    return "<stdin>" if str(path) == "-" else str(path)


def pool_from_verdicts(
    generations: str | Path, templates: str | Path, output: str | Path, rejected: str | Path | None = None
) -> dict[str, Any]:
    """The pool from the verdicts stage 2 recorded (no rule runs again): the rows of `templates`, then
    every generation row marked kept. Rows not kept go to `rejected`. Returns the funnel counts."""
    from instraug.funnel import RunFunnel
    from instraug.records import pool_row

    originals = [row for _name, _line, row in validated_rows(read_jsonl(templates), _name_of(templates))]
    funnel = RunFunnel()
    source = _name_of(generations)
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(atomic_writer(output))
        bad = stack.enter_context(atomic_writer(rejected)) if rejected is not None else None
        for original in originals:
            out.write(original.model_dump(mode="json"))
        for line, row in read_jsonl(generations):
            reasons, template = row.get("reasons"), row.get("template")
            if not isinstance(reasons, list) or row.get("kept") is not (not reasons):
                raise InputError("a judged generation row needs 'kept' and its 'reasons'", source, line)
            try:
                gen = validate_generation(row)
            except InputError as exc:
                raise InputError(exc.reason, source, line) from None
            funnel.add(gen.task, gen.root_id, Verdict(list(reasons)))
            if reasons:
                if bad is not None:
                    bad.write(row)
            elif isinstance(template, str):
                out.write(pool_row(gen, template))
            else:
                raise InputError("a kept generation row needs its 'template'", source, line)
    return {"originals": len(originals), **funnel.overall.as_dict()}

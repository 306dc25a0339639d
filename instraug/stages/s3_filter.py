"""Stage 3: LLM rewrites -> candidate templates -> named rules -> instruction-pool rows.

A generation row (stage 2) becomes a candidate template: its reply is cleaned of chat, then its
mask tokens are restored (or, with protection off, it is parsed as a template). Every rule runs
and a rejected row keeps the full list of its reason codes. The meaning rules (similarity to the
root, near-duplicates among kept rewrites) live in s3_semantic. `RuleChain` judges rows one at a
time, so the stage-2 scheduler can stop once a template has enough kept rewrites;
`filter_generations` streams a whole file of rows through it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from instraug.config import FilterConfig
from instraug.errors import InputError, TemplateError
from instraug.jsonl import atomic_writer, read_jsonl
from instraug.multiinstruct import CONSTANTS, VariantSelector, instance_files, read_instances, render_fields
from instraug.placeholders import (
    CompiledTemplate,
    Masked,
    Placeholder,
    RenderError,
    canonical,
    parse_template,
    placeholders_of,
    restore_placeholders,
)
from instraug.pool import _validated as validated_rows  # the pool's own row validation
from instraug.records import Instruction
from instraug.stages.s3_cleanup import answer_like, clean_response
from instraug.stages.s3_semantic import SemanticRules, constant_text

if TYPE_CHECKING:
    from instraug.embeddings import Embedder

#: Every reason code, in the order the funnel reports them.
REASONS: tuple[str, ...] = (
    "failed_request",  # no reply: the request failed (raw is null or error is set)
    "duplicate_request",  # a second reply to a request already judged (same request_hash)
    "empty",  # nothing left once the chat around the reply is removed
    "bad_braces",  # braces that are neither mask tokens nor valid template syntax
    "mask_left",  # an {X} token that maps to no placeholder
    "placeholders",  # placeholders differ from the root template's (as a multiset)
    "length_ratio",  # not min_words <= words < max_length_ratio x words(parent)
    "identical",  # same as the root, the parent, an original of the task or an earlier keep
    "banned_pattern",  # a filters.banned_patterns regex matches
    "answer_like",  # an answer, a description or assistant talk instead of an instruction
    "render_fails",  # does not render on a sample instance of its task
    "semantic_drift",  # embedding similarity to the root below filters.semantic.min_similarity
    "near_copy",  # embedding similarity to the root at or above filters.semantic.max_similarity
    "near_duplicate",  # too close to an earlier kept rewrite of the same root (filters.near_duplicate)
)
_ORDER = {reason: i for i, reason in enumerate(REASONS)}
_WORDS = re.compile(r"\w+(?:['’]\w+)*")
_MASK_SLOPPY = re.compile(r"\{\{?[^\S\n]*([A-Z]{1,2})[^\S\n]*\}\}?")
_MASK = re.compile(r"\{[A-Z]{1,2}\}")
_BRACED = re.compile(r"\{[^{}\n]{0,200}\}")


class GenerationRow(BaseModel):
    """The fields of a stage-2 generation row that the rules read; other fields are kept as is."""

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


@dataclass
class FilterSummary:
    """Counts for the funnel: each row is removed at its first reason, flagged by all of them."""

    generated: int = 0
    kept: int = 0
    flagged: Counter[str] = field(default_factory=Counter)
    removed: Counter[str] = field(default_factory=Counter)
    render_skipped: int = 0

    def add(self, verdict: Verdict) -> None:
        self.generated += 1
        self.flagged.update(verdict.reasons)
        if verdict.reasons:
            self.removed[verdict.reasons[0]] += 1
        else:
            self.kept += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "generated": self.generated,
            "kept": self.kept,
            "removed": {r: self.removed[r] for r in REASONS if self.removed[r]},
            "flagged": {r: self.flagged[r] for r in REASONS if self.flagged[r]},
            "render_skipped": self.render_skipped,
        }

    def funnel(self) -> list[str]:
        """generated -> each rule -> kept, one line each."""
        lines = [f"{self.generated} generated"]
        left = self.generated
        width = max(len(r) for r in REASONS)
        for reason in REASONS:
            left -= self.removed[reason]
            removed, flagged = self.removed[reason], self.flagged[reason]
            lines.append(f"  {reason:<{width}}  -{removed:<6} -> {left:<6} (flagged {flagged})")
        share = f" ({100 * self.kept / self.generated:.1f}%)" if self.generated else ""
        lines.append(f"{self.kept} kept{share}")
        return lines


# --------------------------------------------------------------------------------------------
# Reply -> candidate template


@dataclass(frozen=True)
class _Shape:
    """What the rules need to know about a template, computed once per distinct text."""

    display: str  # literal text, a constant as its value ("\n\n[Options]:"), any other placeholder as {P}
    words: int
    placeholders: tuple[str, ...]  # sorted, repeats kept
    key: str  # normalized for `identical`


@functools.lru_cache(maxsize=16384)
def _shape(template: str) -> _Shape:
    parts = parse_template(template)
    literal = "".join(p for p in parts if isinstance(p, str))
    display = "".join(p if isinstance(p, str) else constant_text(p) or "{P}" for p in parts)
    found = sorted(str(p) for p in parts if isinstance(p, Placeholder))
    return _Shape(display, len(_WORDS.findall(literal)), tuple(found), _normalized(parts))


def _normalized(parts: Sequence[str | Placeholder]) -> str:
    """Case, whitespace and punctuation do not count; placeholders do."""
    out: list[str] = []
    for part in parts:
        if isinstance(part, str):
            text = unicodedata.normalize("NFKC", part).lower()
            out.append("".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text))
        else:
            out.append(f" {part} ")
    return " ".join("".join(out).split())


def build_candidate(
    raw: str, parent_template: str, masked: str | None, mapping: Mapping[str, str] | None
) -> tuple[str, str | None, list[str]]:
    """A reply -> (cleaned text, candidate template or None, reasons found on the way).

    With protection on (`masked` given) mask tokens become their placeholders and every other
    brace is literal; with protection off the cleaned reply must itself be a valid template.
    """
    if masked is None:
        cleaned = clean_response(raw, parent_template)
        try:
            return cleaned, canonical(cleaned), []
        except TemplateError:
            return cleaned, None, ["bad_braces"]
    letters = dict(mapping or {})
    cleaned = clean_response(raw, masked)
    # tolerate {{A}} / { A } for {A}, unless the template itself shows that form (literal braces
    # around a placeholder), where it means just what it says
    text = _MASK_SLOPPY.sub(
        lambda m: "{" + m[1] + "}" if m[1] in letters and m[0] not in masked else m[0], cleaned
    )
    reasons = []
    if _stray_braces(text) > _stray_braces(masked):
        reasons.append("bad_braces")
    template, unknown = restore_placeholders(text, Masked(masked, letters))
    if unknown:
        reasons.append("mask_left")
    return text, template, reasons


def _stray_braces(text: str) -> int:
    rest = _MASK.sub("", text)
    return rest.count("{") + rest.count("}")


# --------------------------------------------------------------------------------------------
# The rules


class RuleChain:
    """Judges generation rows one at a time and remembers what it kept.

    State: the normalized text of every kept rewrite per root (for `identical`, and its n-grams
    or embedding for `near_duplicate`), the requests already judged, and kept counts per input
    template (`kept_count`) for the scheduler. The same rows in the same order always get the
    same verdicts. With embeddings in use (filters.semantic.enabled, or near_duplicate.method:
    embedding) the chain holds an `Embedder`; `close()` releases it.
    """

    def __init__(
        self,
        config: FilterConfig | None = None,
        samples: Mapping[str, Mapping[str, Any] | Sequence[Mapping[str, Any]]] | None = None,
        *,
        originals: Iterable[Instruction | Mapping[str, Any]] = (),
        embedder: Embedder | None = None,
    ) -> None:
        """`samples`: task -> an instance or a list of instances for `render_fails` (None: no check);
        `originals`: pool rows (records or dicts) a rewrite must not repeat within their task;
        `embedder`: for the embedding rules (default: opened from filters.semantic when needed)."""
        self.config = config or FilterConfig()
        self._owns_embedder = False
        if embedder is None and SemanticRules.needs_embedder(self.config):
            from instraug.embeddings import open_embedder

            embedder = open_embedder(self.config.semantic)
            self._owns_embedder = True
        self.embedder = embedder if SemanticRules.needs_embedder(self.config) else None
        self._semantic = SemanticRules(self.config, self.embedder)
        self.samples: dict[str, list[Mapping[str, Any]]] | None = None
        if samples is not None:
            self.samples = {
                task: [found] if isinstance(found, Mapping) else list(found)
                for task, found in samples.items()
            }
        self.summary = FilterSummary()
        self._banned = [re.compile(p, re.IGNORECASE) for p in self.config.banned_patterns]
        self._task_keys: dict[str, set[str]] = {}
        for row in originals:
            task, template, iid = (
                (row["task"], row["template"], row.get("instruction_id"))
                if isinstance(row, Mapping)
                else (row.task, row.template, row.instruction_id)
            )
            try:
                self._task_keys.setdefault(task, set()).add(_shape(template).key)
            except TemplateError as exc:
                raise TemplateError(f"{iid}: {exc.reason}") from None
        self._kept_keys: dict[str, set[str]] = {}
        self._kept: Counter[str] = Counter()
        self._requests: set[str] = set()
        self._fields: dict[tuple[str, str | None, str], dict[str, Any] | None] = {}

    def close(self) -> None:
        """Close the embedder the chain opened itself."""
        if self._owns_embedder and self.embedder is not None:
            self.embedder.close()
            self._owns_embedder = False

    def __enter__(self) -> RuleChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prefetch(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Embed the candidates and roots of many rows in a few batched calls (no-op without embeddings).

        Verdicts do not change; rows that cannot be read are left for `judge` to report.
        """
        if self.embedder is None:
            return
        templates: list[str] = []
        for row in rows:
            try:
                gen = _validated(row)
                if gen.raw is None or gen.error:
                    continue
                _cleaned, template, _reasons = build_candidate(
                    gen.raw, gen.parent_template, gen.masked, gen.mapping
                )
                _shape(gen.root_template)
                if template:
                    _shape(template)
                    templates.append(template)
                templates.append(gen.root_template)
            except (InputError, ValueError):
                continue
        self._semantic.prefetch(templates)

    def kept_count(self, template_id: str) -> int:
        """How many rewrites of this input template were kept so far."""
        return self._kept[template_id]

    def judge_row(self, row: Mapping[str, Any]) -> tuple[bool, list[str], dict[str, Any] | None]:
        """The stage-2 `Judge` protocol: (kept, reasons, pool row or None)."""
        verdict = self.judge(row)
        return verdict.kept, verdict.reasons, verdict.instruction

    __call__ = judge_row

    def judge(self, row: Mapping[str, Any]) -> Verdict:
        """Run every rule on one generation row; a kept row is remembered."""
        gen = _validated(row)
        verdict = self._judge(gen)
        verdict.reasons.sort(key=_ORDER.__getitem__)
        if verdict.kept and verdict.template is not None:
            shape = _shape(verdict.template)
            self._kept_keys.setdefault(gen.root_id, set()).add(shape.key)
            self._semantic.remember(gen.root_id, verdict.template)
            self._kept[gen.template_id] += 1
            verdict.instruction = pool_row(gen, verdict.template)
        self.summary.add(verdict)
        return verdict

    def _judge(self, gen: GenerationRow) -> Verdict:
        if gen.raw is None or gen.error:
            return Verdict(["failed_request"], notes={"failed_request": str(gen.error or "no reply")})
        if gen.request_hash is not None:
            if gen.request_hash in self._requests:
                return Verdict(["duplicate_request"])
            self._requests.add(gen.request_hash)
        root, parent = _source_shape(gen.root_template, "root"), _source_shape(gen.parent_template, "parent")
        cleaned, template, reasons = build_candidate(gen.raw, gen.parent_template, gen.masked, gen.mapping)
        if not cleaned.strip():
            return Verdict(["empty"], cleaned=cleaned)
        verdict = Verdict(reasons, cleaned=cleaned, template=template)
        display = _BRACED.sub("{P}", cleaned)
        if template is not None:
            shape = _shape(template)
            display = shape.display
            self._check_template(gen, verdict, shape, root, parent)
        for pattern in self._banned:
            if pattern.search(cleaned):
                verdict.reasons.append("banned_pattern")
                verdict.notes["banned_pattern"] = pattern.pattern
                break
        if self.config.reject_answer_like:
            why = answer_like(display, parent.display, root.display)
            if why:
                verdict.reasons.append("answer_like")
                verdict.notes["answer_like"] = why
        if template is not None:
            found = self._semantic.check(gen.root_id, template, gen.root_template)
            for reason, note in found.items():
                # an exact repeat is `identical`; near_copy and near_duplicate would only echo it
                if reason == "semantic_drift" or "identical" not in verdict.reasons:
                    verdict.reasons.append(reason)
                    verdict.notes[reason] = note
        return verdict

    def _check_template(
        self, gen: GenerationRow, verdict: Verdict, shape: _Shape, root: _Shape, parent: _Shape
    ) -> None:
        reasons, config = verdict.reasons, self.config
        if shape.placeholders != root.placeholders:
            reasons.append("placeholders")
            verdict.notes["placeholders"] = _multiset_diff(shape.placeholders, root.placeholders)
        if not config.min_words <= shape.words < config.max_length_ratio * parent.words:
            reasons.append("length_ratio")
            verdict.notes["length_ratio"] = f"{shape.words} words, parent {parent.words}"
        for what, same in (
            ("the root", shape.key == root.key),
            ("the parent", shape.key == parent.key),
            ("an earlier kept rewrite", shape.key in self._kept_keys.get(gen.root_id, ())),
            ("an original of the task", shape.key in self._task_keys.get(gen.task, ())),
        ):
            if same:
                reasons.append("identical")
                verdict.notes["identical"] = f"same as {what}"
                break
        if config.check_render and self.samples is not None and verdict.template is not None:
            fields = self._sample_fields(gen.task, gen.variant, gen.root_template)
            if fields is None:
                self.summary.render_skipped += 1
                return
            try:
                CompiledTemplate(verdict.template, CONSTANTS).render(fields)
            except RenderError as exc:
                reasons.append("render_fails")
                verdict.notes["render_fails"] = str(exc)

    def _sample_fields(self, task: str, variant: str | None, root_template: str) -> dict[str, Any] | None:
        """Fields of the first sample instance of the task on which the root template renders."""
        key = (task, variant, root_template)
        if key in self._fields:
            return self._fields[key]
        found = None
        try:
            selector = VariantSelector(variant, task) if variant else None
        except TemplateError:
            selector = None
        for instance in (self.samples or {}).get(task, []):
            try:
                fields = render_fields(task, dict(instance), random.Random(0))
                if selector is not None and not selector.matches(fields):
                    continue
                CompiledTemplate(root_template, CONSTANTS).render(fields)
            except RenderError:
                continue
            found = fields
            break
        self._fields[key] = found
        return found


def _validated(row: Mapping[str, Any]) -> GenerationRow:
    try:
        return GenerationRow.model_validate(row)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).replace("Input should be", "must be")
        if err["type"] == "missing":
            msg = "missing (needs template_id, task, root_id, parent_template, root_template)"
        raise InputError(f"{key}: {msg}") from None


def _source_shape(template: str, which: str) -> _Shape:
    try:
        return _shape(template)
    except TemplateError as exc:
        raise TemplateError(f"{which}_template: {exc.reason}") from None


def _multiset_diff(got: Sequence[str], want: Sequence[str]) -> str:
    have, need = Counter(got), Counter(want)
    parts = []
    if missing := need - have:
        parts.append("missing " + ", ".join(sorted(missing.elements())))
    if extra := have - need:
        parts.append("extra " + ", ".join(sorted(extra.elements())))
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Pool rows and streaming


def instruction_id(row: Mapping[str, Any]) -> str:
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


def pool_row(gen: GenerationRow, template: str) -> dict[str, Any]:
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
    size = batch_size if chain.embedder is not None else 1
    while batch := list(islice(it, size)):
        if chain.embedder is not None:
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


def filter_to_pool(
    generations: str | Path,
    templates: str | Path,
    output: str | Path,
    rejected: str | Path | None = None,
    config: FilterConfig | None = None,
    samples: Mapping[str, Mapping[str, Any] | Sequence[Mapping[str, Any]]] | None = None,
    summary: FilterSummary | None = None,
) -> dict[str, Any]:
    """Write the rows of `templates`, then every kept rewrite of `generations`, as one pool.

    Rejected rows go to `rejected` (if given) with their reasons. Both files appear only when
    every row was read; returns the funnel counts.
    """
    originals = [row for _name, _line, row in validated_rows(read_jsonl(templates), _name_of(templates))]
    chain = RuleChain(config, samples, originals=originals)
    if summary is not None:
        chain.summary = summary
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
    return {"originals": len(originals), **chain.summary.as_dict()}


def _name_of(path: str | Path) -> str:
    return "<stdin>" if str(path) == "-" else str(path)

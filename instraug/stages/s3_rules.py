"""Stage 3 rules: a reply -> a candidate template -> every rule -> a verdict with its reasons.

A generation row (stage 2) becomes a candidate template: its reply is cleaned of chat, then its
mask tokens are restored (or, with protection off, it is parsed as a template). Every rule runs
and a rejected row keeps the full list of its reason codes. The meaning rules (similarity to the
root, near-duplicates among kept rewrites) live in s3_semantic. `RuleChain` judges rows one at a
time, so the stage-2 scheduler can stop once a template has enough kept rewrites.
"""

from __future__ import annotations

import functools
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from instraug.config import FilterConfig
from instraug.derived import CONSTANTS, render_fields
from instraug.errors import InputError, TemplateError, validation_reason
from instraug.funnel import REASON_ORDER, FilterSummary
from instraug.placeholders import (
    CompiledTemplate,
    Masked,
    Placeholder,
    RenderError,
    canonical,
    mask_placeholders,
    parse_template,
    restore_core,
    restore_placeholders,
    split_core,
)
from instraug.records import Generation, Instruction, Verdict, pool_row
from instraug.stages.s3_cleanup import answer_like, clean_response
from instraug.stages.s3_meaning import MeaningRules
from instraug.stages.s3_semantic import SemanticRules, constant_text
from instraug.variants import VariantSelector

if TYPE_CHECKING:
    from instraug.embeddings import Embedder
    from instraug.stages.s3_judge import Judge

_WORDS = re.compile(r"\w+(?:['’]\w+)*")
_MASK_SLOPPY = re.compile(r"\{\{?[^\S\n]*([A-Z]{1,2})[^\S\n]*\}\}?")
_MASK = re.compile(r"\{[A-Z]{1,2}\}")
_BRACED = re.compile(r"\{[^{}\n]{0,200}\}")

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
    core = split_core(parent_template)  # request_shape core: the LLM saw only the body, masked
    if core.body != parent_template and masked == mask_placeholders(core.body).text:
        template = restore_core(template, core)  # the hidden runs (the row's prefix, suffix) go back
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
        examples: Iterable[str] = (),
        judge: Judge | None = None,
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
        texts: dict[str, list[str]] = {}
        for row in originals:
            task, template, iid = (
                (row["task"], row["template"], row.get("instruction_id"))
                if isinstance(row, Mapping)
                else (row.task, row.template, row.instruction_id)
            )
            try:
                shape = _shape(template)
            except TemplateError as exc:
                raise TemplateError(f"{iid}: {exc.reason}") from None
            self._task_keys.setdefault(task, set()).add(shape.key)
            texts.setdefault(task, []).append(shape.display)
        self._meaning = MeaningRules(self.config.meaning, texts, examples)
        if self.config.judge.enabled and judge is None:
            raise ValueError("filters.judge is enabled: the chain needs a Judge")
        self.judge_llm = judge if self.config.judge.enabled else None
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

    @property
    def batches(self) -> bool:
        """True when judging a round at once saves calls (embeddings, the LLM judge)."""
        return self.embedder is not None or self.judge_llm is not None

    def prefetch(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Embed the candidates and roots of many rows, and ask the judge about them, in a few
        batched calls (no-op without embeddings or judge).

        Verdicts do not change; rows that cannot be read are left for `judge` to report.
        """
        if not self.batches:
            return
        templates: list[str] = []
        pairs: list[tuple[str, str]] = []
        for row in rows:
            try:
                gen = validate_generation(row)
                if gen.raw is None or gen.error:
                    continue
                _cleaned, template, reasons = build_candidate(
                    gen.raw, gen.parent_template, gen.masked, gen.mapping
                )
                root = _shape(gen.root_template)
                if template:
                    shape = _shape(template)
                    templates.append(template)
                    if not reasons and shape.placeholders == root.placeholders:
                        pairs.append((gen.root_template, template))
                templates.append(gen.root_template)
            except (InputError, ValueError):
                continue
        if self.embedder is not None:
            self._semantic.prefetch(templates)
        if self.judge_llm is not None:
            self.judge_llm.ask(pairs)

    def kept_count(self, template_id: str) -> int:
        """How many rewrites of this input template were kept so far."""
        return self._kept[template_id]

    def judge(self, row: Mapping[str, Any]) -> Verdict:
        """Run every rule on one generation row; a kept row is remembered."""
        gen = validate_generation(row)
        verdict = self._judge(gen)
        verdict.reasons.sort(key=REASON_ORDER.__getitem__)
        if verdict.kept and verdict.template is not None:
            shape = _shape(verdict.template)
            self._kept_keys.setdefault(gen.root_id, set()).add(shape.key)
            self._semantic.remember(gen.root_id, verdict.template)
            self._kept[gen.template_id] += 1
            verdict.instruction = pool_row(gen, verdict.template)
        self.summary.add(verdict)
        return verdict

    def _judge(self, gen: Generation) -> Verdict:
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
        options = any(p.lstrip("{").startswith("options") for p in root.placeholders)
        for reason, note in self._meaning.check(gen.task, cleaned, display, root.display, options).items():
            verdict.reasons.append(reason)
            verdict.notes[reason] = note
        if template is not None:
            found = self._semantic.check(gen.root_id, template, gen.root_template)
            for reason, note in found.items():
                # an exact repeat is `identical`; near_copy and near_duplicate would only echo it
                if reason == "semantic_drift" or "identical" not in verdict.reasons:
                    verdict.reasons.append(reason)
                    verdict.notes[reason] = note
        if self.judge_llm is not None and template is not None and not verdict.reasons:
            # the judge costs a request: it is asked only about what every other rule kept
            why = self.judge_llm.check(gen.root_template, template)
            if why:
                verdict.reasons.append("judge")
                verdict.notes["judge"] = why
        return verdict

    def _check_template(
        self, gen: Generation, verdict: Verdict, shape: _Shape, root: _Shape, parent: _Shape
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
            except (RenderError, TemplateError) as exc:  # TemplateError: a constant joined or indexed
                reasons.append("render_fails")
                verdict.notes["render_fails"] = getattr(exc, "reason", None) or str(exc)

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


def validate_generation(row: Mapping[str, Any]) -> Generation:
    """A generation row as a record; an InputError names the wrong field (the caller adds path:line)."""
    try:
        return Generation.model_validate(row)
    except ValidationError as exc:
        needs = "missing (needs template_id, task, root_id, parent_template, root_template)"
        raise InputError(validation_reason(exc, missing=needs)) from None


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

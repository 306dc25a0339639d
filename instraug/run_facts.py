"""What a run directory holds, as report.md shows it: the funnel, the pool, the training set, the
LLM use, and the measures of lexical diversity and length. Read from the run's files only."""

from __future__ import annotations

import itertools
import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instraug.errors import InputError, TemplateError
from instraug.funnel import FilterSummary, RunFunnel
from instraug.jsonl import read_jsonl
from instraug.placeholders import parse_template
from instraug.rundir import CACHE, GENERATIONS, INSTRUCTIONS, REPORT_JSON, TEMPLATES, TRAIN

BIN_WIDTH = 5  # words per histogram bin
EXAMPLES_PER_TASK = 3  # kept and rejected rewrites shown per task
MAX_PAIRS_PER_TASK = 5000  # beyond this, the pairwise similarity of a task is taken on a seeded sample
_WORD = re.compile(r"\w+(?:['’]\w+)*")


# --------------------------------------------------------------------------------------------
# Measures


def instruction_words(template: str) -> list[str]:
    """Lower-cased words of a template's literal text; each placeholder counts as one word."""
    words: list[str] = []
    for part in parse_template(template):
        words.extend(_WORD.findall(part.lower()) if isinstance(part, str) else [str(part)])
    return words


def distinct_n(texts: Iterable[Sequence[str]], n: int) -> float | None:
    """Distinct n-grams / all n-grams over a set of tokenized texts (None when there are none)."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for tokens in texts:
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else None


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a & b| / |a | b| of two word sets (two empty sets are identical)."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def mean_pairwise_jaccard(groups: dict[str, list[frozenset[str]]]) -> float | None:
    """Mean word-set Jaccard over all pairs within each group (a seeded sample in large groups)."""
    total, pairs = 0.0, 0
    for name, sets in sorted(groups.items()):
        for i, j in _pairs(len(sets), name):
            total += jaccard(sets[i], sets[j])
            pairs += 1
    return total / pairs if pairs else None


def _pairs(count: int, seed: str) -> Iterator[tuple[int, int]]:
    """Every pair of `count` items, or a seeded sample of MAX_PAIRS_PER_TASK of them when more."""
    if count * (count - 1) // 2 <= MAX_PAIRS_PER_TASK:
        yield from itertools.combinations(range(count), 2)
        return
    rng = random.Random(seed)  # a str seed does not depend on PYTHONHASHSEED
    for _ in range(MAX_PAIRS_PER_TASK):
        i, j = rng.sample(range(count), 2)
        yield i, j


def length_histogram(facts: RunFacts, width: int = BIN_WIDTH) -> tuple[list[str], dict[str, list[int]]]:
    """Bin labels ("0–4", "5–9", ...) up to the longest instruction, and each set's count per bin."""
    lengths = facts.lengths()
    bins = 1 + max((n // width for v in lengths.values() for n in v), default=-1)
    labels = [f"{k * width}–{k * width + width - 1}" for k in range(bins)]
    counts = {name: [0] * bins for name in lengths}
    for name, v in lengths.items():
        for n in v:
            counts[name][n // width] += 1
    return labels, counts


# --------------------------------------------------------------------------------------------
# What a run directory holds


@dataclass
class InstructionSet:
    """The original or the generated instructions of a pool, tokenized."""

    words: list[list[str]] = field(default_factory=list)
    by_task: dict[str, list[frozenset[str]]] = field(default_factory=dict)

    def add(self, task: str, words: list[str]) -> None:
        self.words.append(words)
        self.by_task.setdefault(task, []).append(frozenset(words))

    @property
    def lengths(self) -> list[int]:
        return [len(w) for w in self.words]


@dataclass
class RunFacts:
    """Everything report.md shows, read from one run directory."""

    name: str
    originals: Counter[str] = field(default_factory=Counter)  # task -> original templates
    verdicts: RunFunnel = field(default_factory=RunFunnel)
    original: InstructionSet = field(default_factory=InstructionSet)
    generated: InstructionSet = field(default_factory=InstructionSet)
    to_root: list[float] = field(default_factory=list)  # Jaccard of each generated row to its root
    target_factor: int | None = None
    llm: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] | None = None
    train: Counter[str] | None = None  # instruction_origin -> training rows
    outcome: str = ""  # how the last `instraug expand` ended, when it was not simply as planned
    failed: bool = False  # an error stopped that run: its outputs are not all there, or not its own
    stages: dict[str, str] = field(default_factory=dict)  # stage -> what that run did with it
    templates: dict[str, str] = field(default_factory=dict)  # original instruction id -> template
    kept_examples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # task -> (root, rewrite)
    rejected_examples: dict[str, list[tuple[str, list[str]]]] = field(
        default_factory=dict
    )  # task -> (text, why)

    @property
    def funnel(self) -> FilterSummary:
        return self.verdicts.overall

    @property
    def funnel_by_task(self) -> dict[str, FilterSummary]:
        return self.verdicts.by_task

    @property
    def roots(self) -> dict[str, set[str]]:
        return self.verdicts.roots

    @property
    def tasks(self) -> list[str]:
        return sorted(set(self.originals) | set(self.funnel_by_task))

    def lengths(self) -> dict[str, list[int]]:
        return {"original": self.original.lengths, "generated": self.generated.lengths}


def read_run(run_dir: Path, summary: dict[str, Any] | None = None) -> RunFacts:
    """Read the funnel, pool, training set, report.json (or `summary`) and cache of a run directory."""
    if summary is None:
        summary = _read_summary(run_dir / REPORT_JSON)
    facts = RunFacts(run_dir.resolve().name)
    outcome = summary.get("outcome")
    if isinstance(outcome, dict):
        facts.outcome = str(outcome.get("message") or "")
        facts.failed = outcome.get("status") == "failed"
    stages = summary.get("stages")
    facts.stages = {str(k): str(v) for k, v in stages.items()} if isinstance(stages, dict) else {}
    facts.llm = dict(summary.get("llm") or {})
    facts.target_factor = _target_factor(summary)
    if not facts.failed:
        _read_outputs(run_dir, facts)
    if (run_dir / CACHE).is_file():
        from instraug.llm.cache import ResponseCache

        with ResponseCache(run_dir / CACHE) as cache:
            facts.cache = cache.stats()
    return facts


def _read_summary(path: Path) -> dict[str, Any]:
    """report.json, or {} when there is none."""
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"malformed JSON: {exc}", path) from None
    if not isinstance(summary, dict):
        raise InputError("malformed report: not a JSON object", path)
    return summary


def _read_outputs(run_dir: Path, facts: RunFacts) -> None:
    for name in (TEMPLATES, GENERATIONS, INSTRUCTIONS):
        if not (run_dir / name).is_file():
            raise InputError(f"not a run directory: no {name} (run `instraug expand` first)", run_dir)
    for _line, row in read_jsonl(run_dir / TEMPLATES):
        facts.originals[row["task"]] += 1
    facts.verdicts = RunFunnel.read(run_dir / GENERATIONS)
    _read_rejected_examples(run_dir / GENERATIONS, facts)
    _read_pool(run_dir / INSTRUCTIONS, facts)
    if (run_dir / TRAIN).is_file():
        facts.train = Counter(str(row.get("instruction_origin")) for _l, row in read_jsonl(run_dir / TRAIN))


def _read_pool(path: Path, facts: RunFacts) -> None:
    roots: dict[str, frozenset[str]] = {}
    generated: list[tuple[str, frozenset[str], int]] = []  # root_id, words, line
    for line, row in read_jsonl(path):
        try:
            words = instruction_words(row["template"])
        except (KeyError, TypeError):
            raise InputError("a pool row needs a 'template' string", path, line) from None
        except TemplateError as exc:
            raise InputError(f"template does not parse: {exc.reason}", path, line) from None
        which = facts.generated if row.get("origin") == "generated" else facts.original
        task = str(row.get("task"))
        which.add(task, words)
        if which is facts.original:
            roots[str(row.get("instruction_id"))] = frozenset(words)
            facts.templates[str(row.get("instruction_id"))] = row["template"]
        else:
            generated.append((str(row.get("root_id")), frozenset(words), line))
            shown = facts.kept_examples.setdefault(task, [])
            if len(shown) < EXAMPLES_PER_TASK:
                shown.append((str(row.get("root_id")), row["template"]))
    for root_id, word_set, line in generated:
        if root_id not in roots:
            raise InputError(f"root_id {root_id!r} is not an original of the pool", path, line)
        facts.to_root.append(jaccard(word_set, roots[root_id]))


def _read_rejected_examples(path: Path, facts: RunFacts) -> None:
    """The first rejected rewrites of each task, with their reasons (the funnel checked the rows)."""
    for _line, row in read_jsonl(path):
        reasons = row.get("reasons") or []
        shown = facts.rejected_examples.setdefault(str(row.get("task")), [])
        if reasons and len(shown) < EXAMPLES_PER_TASK:
            text = row.get("template") or row.get("candidate") or row.get("raw") or "(no reply)"
            shown.append((str(text), [str(r) for r in reasons]))


def _target_factor(summary: dict[str, Any]) -> int | None:
    """expansion.factor as the run recorded it, if it did."""
    expansion = summary.get("expansion")
    if isinstance(expansion, dict) and isinstance(expansion.get("factor"), int):
        return int(expansion["factor"])
    for entry in (summary.get("achieved_factor") or {}).values():
        if isinstance(entry, dict) and isinstance(entry.get("target_factor"), int):
            return int(entry["target_factor"])
    return None

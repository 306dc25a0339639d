"""report.md for a run directory: the filter funnel, expansion factors, instruction lengths,
lexical diversity and LLM use, as tables; PNG plots beside it when matplotlib is installed.

Everything is read from the run's files, so the same run directory always gives the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import random
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from instraug.errors import InputError, TemplateError
from instraug.funnel import REASONS, FilterSummary, RunFunnel
from instraug.jsonl import atomic_binary, read_jsonl
from instraug.placeholders import parse_template
from instraug.rundir import CACHE, GENERATIONS, INSTRUCTIONS, PLOTS, REPORT_JSON, REPORT_MD, TEMPLATES, TRAIN

PLOT_NAMES = ("funnel", "factor", "lengths")
PLOTS_DIR = PLOTS
PLOTS_EXTRA = "pip install 'instraug[report]'"
BIN_WIDTH = 5  # words per histogram bin
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
        which.add(str(row.get("task")), words)
        if which is facts.original:
            roots[str(row.get("instruction_id"))] = frozenset(words)
        else:
            generated.append((str(row.get("root_id")), frozenset(words), line))
    for root_id, word_set, line in generated:
        if root_id not in roots:
            raise InputError(f"root_id {root_id!r} is not an original of the pool", path, line)
        facts.to_root.append(jaccard(word_set, roots[root_id]))


def _target_factor(summary: dict[str, Any]) -> int | None:
    """expansion.factor as the run recorded it, if it did."""
    expansion = summary.get("expansion")
    if isinstance(expansion, dict) and isinstance(expansion.get("factor"), int):
        return int(expansion["factor"])
    for entry in (summary.get("achieved_factor") or {}).values():
        if isinstance(entry, dict) and isinstance(entry.get("target_factor"), int):
            return int(entry["target_factor"])
    return None


# --------------------------------------------------------------------------------------------
# report.md


def write_report(run_dir: Path, *, plots: bool = True, summary: dict[str, Any] | None = None) -> Path:
    """Write RUN_DIR/report.md (and RUN_DIR/report/*.png when `plots` and matplotlib allow).

    With `summary` (what `instraug expand` just did), RUN_DIR/report.json is written with it, and the
    two files are replaced together: report.md is rendered first, and when it cannot be, the old
    report.md is removed rather than left describing an earlier run than report.json.
    """
    run_dir = Path(run_dir)
    path = run_dir / REPORT_MD
    try:
        facts = read_run(run_dir, summary)
        images: dict[str, str] = {}
        if not plots:
            note = "Plots: not drawn (turned off)."
        elif facts.failed:
            note = ""
            _remove_plots(run_dir / PLOTS_DIR, keep=())
        else:
            try:
                images = draw_plots_once(facts, run_dir / PLOTS_DIR)
                _remove_plots(run_dir / PLOTS_DIR, keep=images)
                note = ""
            except ImportError:
                note = f"Plots: not drawn, they need matplotlib, the report extra: `{PLOTS_EXTRA}`."
        markdown = render_markdown(facts, images, note).encode("utf-8")
    except BaseException:
        if summary is not None:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    if summary is not None:
        with atomic_binary(run_dir / REPORT_JSON) as fp:
            fp.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    with atomic_binary(path) as fp:
        fp.write(markdown)
    return path


def render_markdown(facts: RunFacts, images: dict[str, str], note: str = "") -> str:
    """The whole report.md: tables always, image links for the plots that were drawn."""
    out: list[str] = [f"# instraug run report: {facts.name}", ""]
    if facts.outcome:
        out += [f"Outcome: {facts.outcome}", ""]
    if facts.failed:
        return "\n".join([*out, *_stages_section(facts), *_llm_section(facts)]).rstrip("\n") + "\n"
    out += _summary(facts)
    if note:
        out += [note, ""]
    out += _funnel_section(facts) + _image(images, "funnel")
    out += _factor_section(facts) + _image(images, "factor")
    out += _length_section(facts) + _image(images, "lengths")
    out += _diversity_section(facts) + _llm_section(facts)
    return "\n".join(out).rstrip("\n") + "\n"


def _stages_section(facts: RunFacts) -> list[str]:
    rows = [[name, status] for name, status in facts.stages.items()]
    return [
        "## Stages",
        "",
        "What this run did with each stage. The files of the stages that did not run to the end are "
        "an earlier run's, or missing; the funnel, factors and lengths are reported once a run ends.",
        "",
        *_table(["stage", "this run"], rows, "ll"),
        "",
    ]


def _summary(facts: RunFacts) -> list[str]:
    funnel, originals = facts.funnel, sum(facts.originals.values())
    lines = [
        f"- Original templates: {originals} in {len(facts.originals)} tasks",
        f"- LLM rewrites judged: {funnel.generated}; kept: {funnel.kept}"
        f" ({_pct(funnel.kept, funnel.generated)})",
        f"- Instruction pool: {originals} original + {len(facts.generated.words)} generated"
        f" = {originals + len(facts.generated.words)}",
        f"- Target expansion factor: {_target(facts)}",
    ]
    if facts.train is None:
        lines.append("- Training set: no train.jsonl")
    else:
        total = sum(facts.train.values())
        shares = ", ".join(f"{origin} {n} ({_pct(n, total)})" for origin, n in sorted(facts.train.items()))
        lines.append(f"- Training instances: {total}; instruction origin: {shares or 'none'}")
    return ["## Summary", "", *lines, ""]


def _funnel_section(facts: RunFacts) -> list[str]:
    funnel = facts.funnel
    rows, left = [["generated", "", str(funnel.generated), ""]], funnel.generated
    for reason in REASONS:
        left -= funnel.removed[reason]
        rows.append([reason, str(funnel.removed[reason]), str(left), str(funnel.flagged[reason])])
    rows.append(["kept", "", str(funnel.kept), ""])
    out = [
        "## Filter funnel",
        "",
        "Each rejected rewrite is removed at the first rule it fails, in rule order; `flagged` counts "
        "every rule it fails.",
        "",
        *_table(["stage", "removed", "left", "flagged"], rows, "lrrr"),
        "",
    ]
    used = [r for r in REASONS if any(f.removed[r] for f in facts.funnel_by_task.values())]
    task_rows = [
        [task, str(f.generated), *(str(f.removed[r]) for r in used), str(f.kept), _pct(f.kept, f.generated)]
        for task, f in sorted(facts.funnel_by_task.items())
    ]
    out += ["### Per task (removed by each rule)", ""]
    if not task_rows:
        return [*out, "No generations.", ""]
    out += _table(["task", "generated", *used, "kept", "kept %"], task_rows, "l" + "r" * (len(used) + 3))
    idle = [r for r in REASONS if r not in used]
    return [*out, "", *([f"Rules that removed nothing: {', '.join(idle)}.", ""] if idle else [])]


def _factor_section(facts: RunFacts) -> list[str]:
    target = facts.target_factor
    rows = []
    factors = facts.verdicts.achieved(target)
    for task in facts.tasks:
        entry = factors.get(task)
        roots, kept = (entry["templates_augmented"], entry["kept"]) if entry else (0, 0)
        if not roots:
            achieved, status = "", "not rephrased"
        else:
            achieved = f"{kept / roots:.2f}"
            status = "unknown" if target is None else ("short" if entry and entry["short"] else "met")
        pool = facts.originals[task] + kept
        rows.append([task, str(facts.originals[task]), str(roots), str(kept), achieved, str(pool), status])
    return [
        "## Expansion factor",
        "",
        f"Achieved = kept rewrites / original templates rephrased; target: {_target(facts)}.",
        "",
        *_table(["task", "originals", "rephrased", "kept", "achieved", "pool", "status"], rows, "lrrrrrl"),
        "",
    ]


def _length_section(facts: RunFacts) -> list[str]:
    stats = []
    for name, v in facts.lengths().items():
        if v:  # no generated instruction (nothing kept) is a row of n/a, not an error
            shape = [f"{statistics.mean(v):.1f}", f"{statistics.median(v):g}", str(min(v)), str(max(v))]
        else:
            shape = ["n/a", "n/a", "n/a", "n/a"]
        stats.append([name, str(len(v)), *shape])
    labels, shares = length_histogram(facts)
    rows = [
        [label, *(f"{counts[i]} ({_pct(counts[i], sum(counts))})" for counts in shares.values())]
        for i, label in enumerate(labels)
    ]
    return [
        "## Instruction length (words)",
        "",
        "Words of the template text; each placeholder counts as one word.",
        "",
        *_table(["instructions", "count", "mean", "median", "min", "max"], stats, "lrrrrr"),
        "",
        *_table(["words", *shares], rows, "lrr"),
        "",
    ]


def _diversity_section(facts: RunFacts) -> list[str]:
    rows = []
    for name, which in (("original", facts.original), ("generated", facts.generated)):
        measures = (
            distinct_n(which.words, 1),
            distinct_n(which.words, 2),
            mean_pairwise_jaccard(which.by_task),
        )
        rows.append([name, str(len(which.words)), str(sum(which.lengths)), *map(_num, measures)])
    to_root = _num(statistics.mean(facts.to_root)) if facts.to_root else "n/a"
    return [
        "## Lexical diversity",
        "",
        *_table(
            ["instructions", "count", "words", "distinct-1", "distinct-2", "same-task Jaccard"],
            rows,
            "lrrrrr",
        ),
        "",
        "distinct-n: distinct n-grams / all n-grams of the set (it falls as a set grows, so compare sets "
        "of like size); same-task Jaccard: mean word-set Jaccard similarity over pairs of instructions of "
        "one task (lower is more diverse).",
        "",
        f"Mean Jaccard of a generated instruction to its original: {to_root}.",
        "",
    ]


def _llm_section(facts: RunFacts) -> list[str]:
    out = ["## LLM use", ""]
    llm = facts.llm
    if llm:
        rows = [[label, _plain(llm.get(key))] for label, key in _LLM_ROWS]
        retries = llm.get("retries") or {}
        rows.append(["retries", ", ".join(f"{k} {v}" for k, v in sorted(retries.items())) or "0"])
        cost = llm.get("cost")
        rows.append(["cost", "not priced (llm.price_per_1k_*)" if cost is None else f"{cost:.4f}"])
        out += ["The last `instraug expand` (report.json; cost counts the requests sent):", ""]
        out += _table(["", "value"], rows, "lr")
    else:
        out.append("No LLM use recorded in report.json (no report.json, or every LLM stage was up to date).")
    out.append("")
    if facts.cache is None:
        return [*out, "No cache.sqlite in the run directory (the run used another cache).", ""]
    cache = facts.cache
    models = [
        [model, str(m["entries"]), str(m["prompt_tokens"]), str(m["completion_tokens"])]
        for model, m in sorted(cache["models"].items())
    ]
    models.append(
        ["all", str(cache["entries"]), str(cache["prompt_tokens"]), str(cache["completion_tokens"])]
    )
    return [
        *out,
        "Response cache (cache.sqlite), every run so far:",
        "",
        *_table(["model", "responses", "prompt tokens", "completion tokens"], models, "lrrr"),
        "",
    ]


_LLM_ROWS = (
    ("requests", "requests"),
    ("cache hits", "cache_hits"),
    ("requests sent", "requests_sent"),
    ("API calls", "api_calls"),
    ("failures", "failures"),
    ("truncated replies", "truncated"),
    ("prompt tokens", "prompt_tokens"),
    ("completion tokens", "completion_tokens"),
)


def _plain(value: Any) -> str:
    return "" if value is None else str(value)


def _table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(cells) + " |" for cells in (header, rule, *rows)]


def _image(images: dict[str, str], name: str) -> list[str]:
    return [f"![{name}]({images[name]})", ""] if name in images else []


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _target(facts: RunFacts) -> str:
    if facts.target_factor is None:
        return "unknown (report.json does not record expansion.factor)"
    return f"{facts.target_factor} kept rewrites per original template (expansion.factor)"


# --------------------------------------------------------------------------------------------
# Plots (matplotlib, the report extra)


PLOTS_STAMP = ".instraug-plots.json"  # beside the plots folder: what its PNGs were drawn from


def draw_plots_once(facts: RunFacts, folder: Path) -> dict[str, str]:
    """The plots of `facts`, drawn only when what they show changed since they were last drawn.

    A re-run of an up-to-date run directory redraws nothing (drawing takes seconds).
    """
    from instraug import __version__

    lengths = facts.lengths()
    key = hashlib.sha256(
        orjson.dumps(
            [
                __version__,
                facts.verdicts.as_dict(),
                facts.verdicts.achieved(facts.target_factor),
                facts.target_factor,
                lengths,
            ],
            option=orjson.OPT_SORT_KEYS,
        )
    ).hexdigest()
    stamp = folder.parent / PLOTS_STAMP
    with contextlib.suppress(OSError, ValueError):
        recorded = json.loads(stamp.read_text(encoding="utf-8"))
        drawn = recorded.get("drawn") if recorded.get("key") == key else None
        if isinstance(drawn, dict) and all((folder.parent / str(p)).is_file() for p in drawn.values()):
            return {str(k): str(v) for k, v in drawn.items()}
    images = draw_plots(facts, folder)
    with atomic_binary(stamp) as fp:
        fp.write(orjson.dumps({"key": key, "drawn": images}, option=orjson.OPT_SORT_KEYS))
    return images


def draw_plots(facts: RunFacts, folder: Path) -> dict[str, str]:
    """funnel.png, factor.png and lengths.png in `folder`; name -> path relative to the run dir."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # ImportError without the extra
    from matplotlib.figure import Figure

    def figure(width: float, height: float) -> tuple[Figure, Any]:
        fig = Figure(figsize=(width, height))
        FigureCanvasAgg(fig)
        return fig, fig.add_subplot()

    def save(fig: Figure, name: str) -> str:
        fig.tight_layout()
        with atomic_binary(folder / f"{name}.png") as fp:
            fig.savefig(fp, format="png", dpi=100, metadata={"Software": None})
        return f"{PLOTS_DIR}/{name}.png"

    drawn: dict[str, str] = {}
    tasks = sorted(facts.funnel_by_task)
    if tasks:
        fig, ax = figure(9, 1.4 + 0.45 * len(tasks))
        segments = [("kept", [facts.funnel_by_task[t].kept for t in tasks])]
        segments += [(r, [facts.funnel_by_task[t].removed[r] for t in tasks]) for r in REASONS]
        left = [0] * len(tasks)
        for i, (label, values) in enumerate(segments):
            if any(values):
                ax.barh(tasks, values, left=left, label=label, color=_PALETTE[i % len(_PALETTE)])
                left = [a + b for a, b in zip(left, values, strict=True)]
        ax.invert_yaxis()
        ax.set_title("Filter funnel per task")
        ax.set_xlabel("LLM rewrites: kept, or removed at their first failing rule")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        drawn["funnel"] = save(fig, "funnel")

        fig, ax = figure(9, 1.4 + 0.45 * len(tasks))
        achieved = [facts.funnel_by_task[t].kept / max(len(facts.roots.get(t, ())), 1) for t in tasks]
        ax.barh(tasks, achieved, color=_PALETTE[0], label="achieved")
        if facts.target_factor is not None:
            ax.axvline(facts.target_factor, color="black", linestyle="--", label="target")
        ax.invert_yaxis()
        ax.set_title("Expansion factor per task")
        ax.set_xlabel("kept rewrites per original template rephrased")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        drawn["factor"] = save(fig, "factor")

    labels, counts = length_histogram(facts)
    if labels:
        fig, ax = figure(max(6, 0.5 * len(labels) + 2), 4)
        for i, (name, values) in enumerate(counts.items()):
            total = sum(values) or 1
            xs = [k + (i - 0.5) * 0.4 for k in range(len(labels))]
            ax.bar(
                xs,
                [100 * v / total for v in values],
                width=0.4,
                label=f"{name} ({sum(values)})",
                color=_PALETTE[9 if i else 2],
            )
        ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize="small")
        ax.set_title("Instruction length, original vs generated")
        ax.set_xlabel("words")
        ax.set_ylabel("% of the set")
        ax.legend()
        drawn["lengths"] = save(fig, "lengths")
    return drawn


def _remove_plots(folder: Path, keep: Iterable[str]) -> None:
    """Delete the PNGs not drawn this time: they would show an earlier run."""
    for name in set(PLOT_NAMES) - set(keep):
        with contextlib.suppress(OSError):
            (folder / f"{name}.png").unlink()


_PALETTE = (
    "#2ca02c #d62728 #ff7f0e #9467bd #8c564b #e377c2 #7f7f7f #bcbd22 #17becf #1f77b4 #aec7e8 #ffbb78".split()
)

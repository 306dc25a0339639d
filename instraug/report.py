"""report.md for a run directory: the filter funnel, expansion factors, instruction lengths,
lexical diversity, examples and LLM use, as tables; PNG plots beside it when matplotlib is installed.

Everything is read from the run's files, so the same run directory always gives the same bytes.
"""

from __future__ import annotations

import contextlib
import statistics
from pathlib import Path
from typing import Any

import orjson

from instraug.funnel import REASONS
from instraug.jsonl import atomic_binary
from instraug.report_plots import PLOTS_DIR, draw_plots_once, remove_plots
from instraug.run_facts import (
    EXAMPLES_PER_TASK,
    RunFacts,
    distinct_n,
    length_histogram,
    mean_pairwise_jaccard,
    read_run,
)
from instraug.rundir import REPORT_JSON, REPORT_MD

PLOTS_EXTRA = "pip install 'instraug[report]'"


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
            remove_plots(run_dir / PLOTS_DIR, keep=())
        else:
            try:
                images = draw_plots_once(facts, run_dir / PLOTS_DIR)
                remove_plots(run_dir / PLOTS_DIR, keep=images)
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
    out += _diversity_section(facts) + _examples_section(facts) + _llm_section(facts)
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


def _examples_section(facts: RunFacts) -> list[str]:
    out = [
        "## Examples per task",
        "",
        f"The first {EXAMPLES_PER_TASK} kept rewrites of each task beside their original, and the first "
        f"{EXAMPLES_PER_TASK} rejected with their reasons: read them before training on the pool.",
        "",
    ]
    tasks = sorted(set(facts.kept_examples) | {t for t, r in facts.rejected_examples.items() if r})
    if not tasks:
        return [*out, "No rewrites.", ""]
    for task in tasks:
        out += [f"### {task}", ""]
        kept = [
            [_cell(facts.templates.get(root, root)), _cell(text)]
            for root, text in facts.kept_examples.get(task, [])
        ]
        out += _table(["original", "kept rewrite"], kept, "ll") if kept else ["No rewrite kept."]
        out.append("")
        rejected = [[_cell(text), ", ".join(why)] for text, why in facts.rejected_examples.get(task, [])]
        if rejected:
            out += [*_table(["rejected rewrite", "reasons"], rejected, "ll"), ""]
    return out


def _cell(text: str) -> str:
    """Text in a markdown table cell: pipes escaped, line breaks shown as ⏎."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "⏎")


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

"""Request shapes on the embedded model: how many rephrasings each shape gets past the filters.

    .venv/bin/python benchmarks/request_shape.py [--work /tmp/shapework] [--templates 30]
    .venv/bin/python benchmarks/request_shape.py --filter-only     # judge the saved replies again

A controlled trial of stage 2's request (`expansion.request_shape`, `sampling.constrain`): the
augmentable templates of examples/multiinstruct-mini, then one template of each further task of
the shared MultiInstruct templates (../shared/multiinstruct/templates.json, read in place), up to
`--templates`; each asked for 3 rephrasings, the scheduler's first three attempts (the direct
prompt and the first two curated strategies, T = 0.6, 96 tokens), in every shape:

    paper          the meta-prompt as system message, the masked template as user turn
    examples       + the example turns of meta_instructions/examples.yaml
    user_turn      + the meta-prompt and the rules in the user turn
    core           + the placeholder runs at the template's edges hidden, put back after
    core+grammar   + a llama.cpp grammar (each mask token as often as shown, one line)

and, with `--shapes ...,every-run`, an ablation of the core's split: every placeholder run at an
edge hidden, even inside a sentence ("Which option overlaps most with" + hidden
" {given_region}?..."), asked only for the templates where that differs from split_core.

Every reply is judged by the stage-3 rules with configs/default.yaml's filters (the RuleChain
`instraug filter` runs, with the example turns for `example_copy`; render checks on the instances
of the mini checkout and of the shared train.jsonl). Prints, per shape, the replies accepted out
of those asked and the seconds per request sent; writes each shape's rows
(generations-SHAPE.jsonl), every accepted reply with its template (accepted.jsonl, to label by
hand) and the timings (timings.json) to --work. Replies are cached there (cache.sqlite): a second
run sends nothing and reuses the timings it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from instraug.config import Config, load_config
from instraug.jsonl import read_jsonl, write_jsonl
from instraug.llm import open_llm
from instraug.multiinstruct import import_templates
from instraug.placeholders import Core, placeholders_of, split_core
from instraug.records import MetaPrompt
from instraug.stages import s2_generate, s3_rules
from instraug.stages.s1_meta_prompts import example_texts, load_seeds
from instraug.stages.s2_generate import GenerationSummary, augmentable, generate
from instraug.stages.s3_filter import sample_instances
from instraug.stages.s3_rules import RuleChain

ROOT = Path(__file__).resolve().parent.parent
MINI = ROOT / "examples" / "multiinstruct-mini"
SHARED = ROOT.parent / "shared" / "multiinstruct"
#: (name, expansion.request_shape, sampling.constrain)
SHAPES = [
    ("paper", "paper", "none"),
    ("examples", "examples", "none"),
    ("user_turn", "user_turn", "none"),
    ("core", "core", "none"),
    ("core+grammar", "core", "grammar"),
]
ATTEMPTS = 3
#: The ablation arm: core, every edge run hidden (not only where a sentence ends).
EVERY_RUN = "every-run"


def trial_templates(count: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the templates asked for, every original of both sources for the `identical` rule): up to
    two augmentable templates of each task of the mini checkout, then one of each further task that
    has instances in the shared train.jsonl (so the render check runs), picked with a fixed seed."""
    held_out = Config().assembly.held_out_tasks
    originals: list[dict[str, Any]] = []
    for source, path in (("mini", MINI / "instruction_templates.py"), ("shared", SHARED / "templates.json")):
        for template in import_templates(path):
            row = template.as_row()
            for key in ("template_id", "instruction_id", "root_id"):
                row[key] = f"{source}:{row[key]}"
            originals.append(row)
    usable = [r for r in originals if augmentable(r["template"], r["task"], held_out) is None]
    chosen: list[dict[str, Any]] = []
    per_task: Counter[str] = Counter()
    for row in usable:
        if row["root_id"].startswith("mini:") and per_task[row["task"]] < 2:
            chosen.append(row)
            per_task[row["task"]] += 1
    with_instances = {row.get("task_name") for _line, row in read_jsonl(SHARED / "train.jsonl")}
    shared = [r for r in usable if r["root_id"].startswith("shared:") and r["task"] in with_instances]
    random.Random(0).shuffle(shared)
    texts = {row["template"] for row in chosen}
    for row in shared:
        if len(chosen) < count and row["task"] not in per_task and row["template"] not in texts:
            chosen.append(row)
            per_task[row["task"]] += 1
    return chosen[:count], originals


def split_every_run(template: str) -> Core:
    """The ablation's split: the whole run of placeholders and punctuation at each edge, wherever
    the sentence stands (punctuation attached to the body's edge words stays in the body)."""
    core = split_core(template)
    literal = literal_positions(template)
    words = [i for i, char in literal.items() if char.isalnum() or char == "_"]
    if not words:
        return core
    start, end = words[0], words[-1] + 1
    while end < len(template) and end in literal and not literal[end].isspace() and literal[end] != '"':
        end += 1
    prefix, suffix = template[:start], template[end:]
    return Core(
        prefix if placeholders_of(prefix) else "",
        template[len(prefix) if placeholders_of(prefix) else 0 : end if placeholders_of(suffix) else None],
        suffix if placeholders_of(suffix) else "",
    )


def literal_positions(template: str) -> dict[int, str]:
    """The literal characters of a template source by position (placeholders left out)."""
    spans = [
        (m.start(), m.end())
        for m in re.finditer(r"\{\{|\}\}|\{([^{}]*)\}", template)
        if m.group(1) is not None
    ]
    inside = {i for a, b in spans for i in range(a, b)}
    return {i: c for i, c in enumerate(template) if i not in inside}


@contextlib.contextmanager
def every_run_split() -> Iterator[None]:
    """Stage 2 and stage 3 split templates with split_every_run meanwhile."""
    saved = s2_generate.split_core, s3_rules.split_core
    s2_generate.split_core = s3_rules.split_core = split_every_run  # type: ignore[assignment]
    try:
        yield
    finally:
        s2_generate.split_core, s3_rules.split_core = saved  # type: ignore[assignment]


def trial_config(shape: str, constrain: str) -> Config:
    config = load_config(ROOT / "configs" / "default.yaml")
    config.sampling.temperatures = [0.6]
    config.sampling.max_tokens = 96
    config.sampling.constrain = constrain  # type: ignore[assignment]
    config.expansion.request_shape = shape  # type: ignore[assignment]
    config.expansion.factor = config.expansion.max_attempts = ATTEMPTS
    config.expansion.iterations = 1
    return config


def judge_rows(
    rows: list[dict[str, Any]], config: Config, samples: Any, originals: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The saved rows judged again, in order, by a fresh rule chain."""
    with RuleChain(config.filters, samples, originals=originals, examples=example_texts()) as chain:
        out = []
        for row in rows:
            verdict = chain.judge(row)
            out.append(
                {
                    **row,
                    "candidate": verdict.cleaned,
                    "template": verdict.template,
                    "kept": verdict.kept,
                    "reasons": verdict.reasons,
                }
            )
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/shapework"))
    parser.add_argument("--templates", type=int, default=30)
    parser.add_argument("--shapes", default=",".join(name for name, _s, _c in SHAPES))
    parser.add_argument("--filter-only", action="store_true", help="judge the saved replies again")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    templates, originals = trial_templates(args.templates)
    tasks = {row["task"] for row in templates}
    samples = sample_instances(MINI, "train", tasks, 3)
    for task, found in sample_instances(SHARED / "train.jsonl", "train", tasks, 3).items():
        samples.setdefault(task, found)
    seeds = load_seeds()
    metas = [MetaPrompt(id="direct", text=seeds.direct, origin="direct")]
    metas += [MetaPrompt(id=s.id, text=s.text, origin="curated") for s in seeds.strategies[: ATTEMPTS - 1]]
    timings_path = args.work / "timings.json"
    timings: dict[str, Any] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    wanted = args.shapes.split(",")
    results: dict[str, list[dict[str, Any]]] = {}
    for name, shape, constrain in [*SHAPES, (EVERY_RUN, "core", "none")]:
        if name not in wanted:
            continue
        config = trial_config(shape, constrain)
        asked_templates = templates
        split = every_run_split() if name == EVERY_RUN else contextlib.nullcontext()
        if name == EVERY_RUN:
            asked_templates = [
                t for t in templates if split_every_run(t["template"]) != split_core(t["template"])
            ]
        rows_path = args.work / f"generations-{name}.jsonl"
        if args.filter_only:
            saved = [row for _line, row in read_jsonl(rows_path)]
            with split:
                results[name] = judge_rows(saved, config, samples, originals)
            continue
        summary = GenerationSummary()
        with (
            split,
            open_llm(config.llm, cache_path=args.work / "cache.sqlite", quiet=True) as llm,
            RuleChain(config.filters, samples, originals=originals, examples=example_texts()) as chain,
        ):
            started = time.perf_counter()
            rows = list(generate(asked_templates, metas, seeds, config, llm, chain.judge, summary))
            elapsed = time.perf_counter() - started
            sent = llm.stats.requests_sent
        if sent:
            timings[name] = {"requests_sent": sent, "seconds": round(elapsed, 1)}
            timings_path.write_text(json.dumps(timings, indent=1) + "\n")
        write_jsonl(rows_path, rows)
        results[name] = rows
        print(
            f"{name}: {len(rows)} replies, {sum(r['kept'] for r in rows)} accepted, {elapsed:.0f} s",
            flush=True,
        )
    accepted = [
        {
            "shape": name,
            "template_id": row["template_id"],
            "task": row["task"],
            "original": row["root_template"],
            "shown": row["masked"],
            "meta_prompt_id": row["meta_prompt_id"],
            "raw": row["raw"],
            "candidate": row["candidate"],
            "template": row["template"],
        }
        for name, rows in results.items()
        for row in rows
        if row["kept"]
    ]
    write_jsonl(args.work / "accepted.jsonl", accepted)
    asked = len(templates) * ATTEMPTS
    print(f"\n{len(templates)} templates x {ATTEMPTS} requests = {asked} per shape\n")
    print("| shape | accepted | s/request | most frequent first rejections |")
    print("|---|---|---|---|")
    for name, rows in results.items():
        kept = sum(row["kept"] for row in rows)
        timing = timings.get(name)
        per = f"{timing['seconds'] / timing['requests_sent']:.1f}" if timing else "-"
        reasons = Counter(row["reasons"][0] for row in rows if row["reasons"])
        common = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common(3))
        print(f"| {name} | {kept}/{len(rows)} | {per} | {common} |")
    if EVERY_RUN in results and "core" in results:
        ids = {row["template_id"] for row in results[EVERY_RUN]}
        same = [row for row in results["core"] if row["template_id"] in ids]
        print(f"| core, same {len(ids)} templates | {sum(r['kept'] for r in same)}/{len(same)} | | |")
    print(f"\naccepted replies with their templates: {args.work / 'accepted.jsonl'}")


if __name__ == "__main__":
    main()

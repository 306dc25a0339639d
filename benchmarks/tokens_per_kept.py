"""Tokens per kept rephrasing for three ways of asking, judged by the stage-3 rules.

    python benchmarks/tokens_per_kept.py [-c CONFIG] [--templates N] [--k K] [--cache PATH]

For each augmentable template of the example checkout (first N), K rephrasings are asked for:

(a) one per request (the paper): K requests, each under the next meta-prompt (the direct prompt,
    then the curated strategies), as stage 2 plans its attempts;
(b) `n` samples per request: the direct prompt with llm.n = K (sample indices 0..K-1 share a call
    where the server returns n choices; llama.cpp returns one, and the backend asks again);
(c) a list: one request under the direct prompt asking for K different rewrites, one per line;
    the answer is split with stage 1's list parser (`parse_list`), its first K items judged one
    by one (each with its own request hash: the request's key + "#item").

Every request is the paper's shape: system = meta-prompt + keep-tokens + suffix from seeds.yaml
((c) replaces the one-rewrite suffix with the list instruction), user = the masked template. Each
shape is judged by a fresh stage-3 RuleChain (the config's filters, render check on the example's
instances). Prompt and completion tokens are those the server reported (or the cache kept);
llama.cpp's server returns one choice whatever n asks, so here every sample of (b) is a call of
its own that pays its prompt; "billed with n" counts (b)'s prompt once per prompt, as a server
that returns n choices per call (OpenAI, vLLM) bills it. Answers are cached, one cache per shape
(--cache PATH: PATH.a, PATH.b, PATH.c), so a second run re-judges without sending anything.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from instraug.config import Config, load_config
from instraug.llm import ChatRequest, Completion, open_llm
from instraug.multiinstruct import import_templates
from instraug.placeholders import Masked, mask_placeholders
from instraug.records import MetaPrompt
from instraug.stages.s1_meta_prompts import Seeds, load_seeds, parse_list, system_prompt
from instraug.stages.s2_generate import augmentable
from instraug.stages.s3_filter import RuleChain, sample_instances

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "multiinstruct-mini"
#: (c)'s suffix, in place of "reply with the rewritten instruction only".
LIST_SUFFIX = (
    "Do not answer or carry out the instruction. Write {k} different rewrites of it, one per line, "
    "numbered 1. to {k}, and nothing else."
)


@dataclass
class Asked:
    """One request of a shape and the rows its answer becomes."""

    template: dict[str, Any]
    masked: Masked
    meta: MetaPrompt
    request: ChatRequest
    items: int  # rephrasings this request stands for


@dataclass
class Tally:
    calls: int = 0
    asked: int = 0
    produced: int = 0
    kept: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    billed_prompt_tokens: int = 0  # (b): the prompt once per prompt, as a server that returns n choices
    cached: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


def meta_prompts(seeds: Seeds, count: int) -> list[MetaPrompt]:
    """The direct prompt, then the curated strategies."""
    metas = [MetaPrompt(id="direct", text=seeds.direct, origin="direct")]
    metas += [MetaPrompt(id=s.id, text=s.text, origin="curated") for s in seeds.strategies]
    return metas[:count]


def request_for(
    seeds: Seeds, meta: MetaPrompt, masked: Masked, config: Config, sample: int, max_tokens: int
) -> ChatRequest:
    sampling = config.sampling
    return ChatRequest(
        messages=(("system", system_prompt(seeds, meta.text, masked.tokens)), ("user", masked.text)),
        temperature=sampling.temperatures[0],
        top_p=sampling.top_p,
        max_tokens=max_tokens,
        stop=tuple(sampling.stop),
        sample_index=sample,
    )


def plan(shape: str, templates: list[dict[str, Any]], seeds: Seeds, config: Config, k: int) -> list[Asked]:
    metas = meta_prompts(seeds, k)
    list_seeds = seeds.model_copy(update={"suffix": LIST_SUFFIX.format(k=k)})
    max_tokens = config.sampling.max_tokens
    out: list[Asked] = []
    for template in templates:
        masked = mask_placeholders(template["template"])
        if shape == "a":
            for i in range(k):
                meta = metas[i % len(metas)]
                out.append(
                    Asked(template, masked, meta, request_for(seeds, meta, masked, config, 0, max_tokens), 1)
                )
        elif shape == "b":
            for i in range(k):
                out.append(
                    Asked(
                        template,
                        masked,
                        metas[0],
                        request_for(seeds, metas[0], masked, config, i, max_tokens),
                        1,
                    )
                )
        else:
            request = request_for(list_seeds, metas[0], masked, config, 0, max_tokens * k)
            out.append(Asked(template, masked, metas[0], request, k))
    return out


def row_for(asked: Asked, completion: Completion, raw: str | None, item: int | None) -> dict[str, Any]:
    """A stage-2 generation row, as the rules read it."""
    template = asked.template
    key = completion.key if item is None else f"{completion.key}#{item}"
    return {
        "template_id": template["instruction_id"],
        "task": template["task"],
        "variant": template.get("variant"),
        "meta_prompt_id": asked.meta.id,
        "temperature": asked.request.temperature,
        "sample_index": asked.request.sample_index if item is None else item,
        "iteration": 1,
        "parent_id": template["instruction_id"],
        "root_id": template["root_id"],
        "parent_template": template["template"],
        "root_template": template["template"],
        "masked": asked.masked.text,
        "mapping": asked.masked.mapping,
        "raw": raw,
        "request_hash": key,
        "model": completion.model,
        "error": completion.error,
    }


def measure(
    shape: str,
    templates: list[dict[str, Any]],
    seeds: Seeds,
    config: Config,
    k: int,
    cache: Path,
    samples: dict[str, list[dict[str, Any]]],
) -> Tally:
    asked = plan(shape, templates, seeds, config, k)
    llm_config = config.llm.model_copy(update={"n": k if shape == "b" else 1})
    tally = Tally(asked=sum(a.items for a in asked))
    started = time.perf_counter()
    # One cache per shape: (b)'s first sample is (a)'s first request, and would be counted as cached.
    with open_llm(llm_config, cache_path=cache.with_name(f"{cache.name}.{shape}"), quiet=True) as llm:
        requests = [replace(a.request, tag=i) for i, a in enumerate(asked)]
        answers = {c.request.tag: c for c in llm.run(requests)}
        stats = llm.stats
    tally.seconds = time.perf_counter() - started
    tally.calls, tally.cached = stats.api_calls, stats.cache_hits
    if stats.api_calls < stats.requests_sent:
        raise SystemExit("the server returned several choices per call: count (b)'s prompt tokens per call")
    rows: list[dict[str, Any]] = []
    seen_prompts: set[tuple[str, ...]] = set()
    for i, a in enumerate(asked):
        completion = answers[i]
        # One choice per call (llama.cpp's server ignores n): every sample paid its prompt.
        tally.prompt_tokens += completion.prompt_tokens
        tally.completion_tokens += completion.completion_tokens
        prompt = tuple(content for _role, content in a.request.messages)
        if prompt not in seen_prompts or shape != "b":
            tally.billed_prompt_tokens += completion.prompt_tokens
        seen_prompts.add(prompt)
        if shape == "c" and completion.text is not None:
            items = parse_list(completion.text)[:k]
            rows += [row_for(a, completion, text, j) for j, text in enumerate(items)]
        else:
            rows.append(row_for(a, completion, completion.text, None))
    tally.produced = sum(1 for r in rows if r["raw"] is not None)
    with RuleChain(config.filters, samples, originals=templates) as chain:
        for row in rows:
            verdict = chain.judge(row)
            tally.kept += verdict.kept
            tally.reasons.update(verdict.reasons[:1])
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-c", "--config", type=Path, help="default: the embedded model (configs/default.yaml)"
    )
    parser.add_argument("--source", type=Path, default=EXAMPLE, help="a MultiInstruct checkout")
    parser.add_argument("--templates", type=int, default=20, help="augmentable templates to use")
    parser.add_argument("--k", type=int, default=6, help="rephrasings asked per template and shape")
    parser.add_argument("--shapes", default="abc")
    parser.add_argument("--cache", type=Path, default=Path(".instraug") / "tokens-per-kept.sqlite")
    args = parser.parse_args()
    config = load_config(args.config)
    held_out = config.assembly.held_out_tasks
    templates = [
        t.model_dump(mode="json")
        for t in import_templates(args.source / "instruction_templates.py")
        if augmentable(t.template, t.task, held_out) is None
    ][: args.templates]
    seeds = load_seeds(config.meta_prompts.directory)
    samples = sample_instances(args.source, config.assembly.split, {t["task"] for t in templates})
    print(
        f"{len(templates)} templates x {args.k} rephrasings, model: {config.llm.model or config.llm.backend}"
    )
    rows = [
        (
            "shape",
            "API calls",
            "asked",
            "answered",
            "kept",
            "kept share",
            "prompt+completion tokens",
            "tokens per kept",
            "billed with n",
            "first rejection reasons",
            "seconds",
        )
    ]
    names = {"a": "(a) one per request", "b": f"(b) n={args.k} per request", "c": f"(c) list of {args.k}"}
    for shape in args.shapes:
        tally = measure(shape, templates, seeds, config, args.k, args.cache, samples)
        total = tally.prompt_tokens + tally.completion_tokens
        billed = tally.billed_prompt_tokens + tally.completion_tokens
        per_kept = f"{total / tally.kept:.0f}" if tally.kept else "-"
        billed_per_kept = f"{billed / tally.kept:.0f}" if tally.kept else "-"
        reasons = ", ".join(f"{r} {n}" for r, n in tally.reasons.most_common(3))
        rows.append(
            (
                names[shape],
                f"{tally.calls} (+{tally.cached} cached)" if tally.cached else str(tally.calls),
                str(tally.asked),
                str(tally.produced),
                str(tally.kept),
                f"{tally.kept / tally.asked:.1%}",
                f"{tally.prompt_tokens}+{tally.completion_tokens}",
                per_kept,
                billed_per_kept,
                reasons,
                f"{tally.seconds:.0f}",
            )
        )
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows[1:]:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

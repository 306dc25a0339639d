"""Stage 2: templates x meta-prompts x sampling plan -> placeholder-protected generations.

The scheduler asks, for every template still short of `expansion.factor` kept candidates, for
as many new samples as it still needs (next meta-prompt, then next temperature, then next
sample index), judges the answers with the stage-3 rules in a fixed order, and stops at the
factor or at `expansion.max_attempts`. Kept outputs of one iteration are the inputs of the next.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from instraug.config import BudgetConfig, Config
from instraug.errors import InputError
from instraug.instances import SKIPPED_TASKS
from instraug.placeholders import Core, Masked, literal_text, mask_placeholders, placeholders_of, split_core
from instraug.records import MetaPrompt
from instraug.stages.s1_meta_prompts import Seeds, system_prompt, user_prompt
from instraug.stages.s2_constrain import constraint_for

if TYPE_CHECKING:
    from instraug.llm import LLMSession
    from instraug.llm.base import ChatRequest, Completion
    from instraug.records import Verdict

#: judge(generation row) -> Verdict (the stage-3 RuleChain.judge): reasons, cleaned text, template, pool row
Judge = Callable[[dict[str, Any]], "Verdict"]


@dataclass(frozen=True)
class Source:
    """An instruction to rephrase: an original template or a kept generation of an earlier round."""

    instruction_id: str
    task: str
    variant: str | None
    template: str
    root_id: str
    root_template: str
    iteration: int


@dataclass
class GenerationSummary:
    requests: int = 0
    attempts: Counter[str] = field(default_factory=Counter)  # by root id
    kept: Counter[str] = field(default_factory=Counter)  # by root id
    roots: dict[str, str] = field(default_factory=dict)  # root id -> task
    skipped: dict[str, str] = field(default_factory=dict)  # template id -> why
    stopped: str | None = None  # why generation stopped early (budget)

    def achieved_factor(self) -> dict[str, dict[str, float | int]]:
        """Per task: templates augmented, kept generations, kept per template."""
        out: dict[str, dict[str, float | int]] = {}
        for root, task in self.roots.items():
            entry = out.setdefault(task, {"templates": 0, "kept": 0, "attempts": 0})
            entry["templates"] += 1
            entry["kept"] += self.kept[root]
            entry["attempts"] += self.attempts[root]
        for entry in out.values():
            entry["factor"] = round(entry["kept"] / entry["templates"], 3)
        return dict(sorted(out.items()))


def augmentable(template: str, task: str, held_out: Iterable[str]) -> str | None:
    """Why a template is not augmented, or None when it is."""
    if task in set(held_out):
        return "held_out_task"
    if task in SKIPPED_TASKS:  # upstream's build never renders its instances
        return "skipped_task"
    if not literal_text(template).strip(" \t\n.,;:!?\"'"):
        return "pure_placeholder"
    return None


def attempt_plan(
    index: int, n_meta: int, temperatures: list[float], per_prompt: int = 1
) -> tuple[int, float, int]:
    """Attempt number -> (meta-prompt index, temperature, sample index): `per_prompt` samples of one
    prompt in a row (one API call with llm.n), then meta-prompts vary fastest, then temperatures."""
    group, within = divmod(index, per_prompt)
    meta = group % n_meta
    temperature = temperatures[(group // n_meta) % len(temperatures)]
    sample = group // (n_meta * len(temperatures)) * per_prompt + within
    return meta, temperature, sample


@dataclass
class _State:
    source: Source
    attempts: int = 0
    kept: int = 0


def generate(
    templates: Iterable[dict[str, Any]],
    meta_prompts: list[MetaPrompt],
    seeds: Seeds,
    config: Config,
    llm: LLMSession,
    judge: Judge,
    summary: GenerationSummary | None = None,
    budget: BudgetConfig | None = None,
    prefetch: Callable[[list[dict[str, Any]]], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield generation rows in a deterministic order (round by round, template order within)."""
    summary = summary if summary is not None else GenerationSummary()
    if not meta_prompts:
        raise InputError("no meta-prompts: generation needs at least one (see `instraug meta-prompts`)")
    expansion, sampling = config.expansion, config.sampling
    sources: list[Source] = []
    for template in templates:
        why = augmentable(template["template"], template["task"], config.assembly.held_out_tasks)
        if why:
            summary.skipped[template["instruction_id"]] = why
            continue
        sources.append(
            Source(
                template["instruction_id"],
                template["task"],
                template.get("variant"),
                template["template"],
                template["root_id"],
                template["template"],
                1,
            )
        )
        summary.roots[template["root_id"]] = template["task"]
    for iteration in range(1, expansion.iterations + 1):
        states = [_State(source) for source in sources]
        next_sources: list[Source] = []
        while True:
            batch: list[tuple[_State, MetaPrompt, float, int, Shown, Any]] = []
            for state in states:
                need = min(expansion.factor - state.kept, expansion.max_attempts - state.attempts)
                for _ in range(max(need, 0)):
                    meta_i, temperature, sample = attempt_plan(
                        state.attempts, len(meta_prompts), sampling.temperatures, expansion.samples_per_prompt
                    )
                    state.attempts += 1
                    summary.attempts[state.source.root_id] += 1
                    meta = meta_prompts[meta_i]
                    shown, request = build_request(
                        state.source.template, meta, temperature, sample, seeds, config, tag=len(batch)
                    )
                    batch.append((state, meta, temperature, sample, shown, request))
            if not batch:
                break
            answers = _answers(llm, [item[-1] for item in batch], budget, summary)
            round_rows: list[tuple[_State, dict[str, Any]]] = []
            for tag, (state, meta, temperature, sample, shown, _request) in enumerate(batch):
                completion = answers.get(tag)
                if completion is None:  # not sent: the budget ran out
                    continue
                source = state.source
                round_rows.append(
                    (
                        state,
                        {
                            "template_id": source.instruction_id,
                            "task": source.task,
                            "variant": source.variant,
                            "meta_prompt_id": meta.id,
                            "temperature": temperature,
                            "sample_index": sample,
                            "iteration": iteration,
                            "parent_id": source.instruction_id,
                            "root_id": source.root_id,
                            "parent_template": source.template,
                            "root_template": source.root_template,
                            "masked": shown.masked.text if shown.masked else None,
                            "mapping": shown.masked.mapping if shown.masked else {},
                            "prefix": shown.core.prefix,
                            "suffix": shown.core.suffix,
                            "raw": completion.text,
                            "request_hash": completion.key,
                            "model": completion.model,
                            "error": completion.error,
                        },
                    )
                )
            if prefetch is not None:  # e.g. embed the whole round at once for the semantic rules
                prefetch([row for _state, row in round_rows])
            for state, row in round_rows:
                source = state.source
                verdict = judge(row)
                instruction = verdict.instruction
                row["candidate"] = verdict.cleaned
                row["template"] = verdict.template
                row["kept"] = verdict.kept
                row["reasons"] = verdict.reasons
                row["notes"] = verdict.notes
                yield row
                if verdict.kept and instruction is not None:
                    state.kept += 1
                    summary.kept[source.root_id] += 1
                    next_sources.append(
                        Source(
                            instruction["instruction_id"],
                            source.task,
                            source.variant,
                            instruction["template"],
                            source.root_id,
                            source.root_template,
                            iteration + 1,
                        )
                    )
            if summary.stopped:
                return
        sources = next_sources


@dataclass(frozen=True)
class Shown:
    """What the LLM is shown of a template and what puts its answer back: the runs hidden at its
    edges (`core.prefix`, `core.suffix`, empty unless request_shape is core) and the mask of the
    body (None when placeholders are not protected)."""

    core: Core
    masked: Masked | None

    @property
    def text(self) -> str:
        """The instruction as the LLM reads it."""
        return self.masked.text if self.masked else self.core.body


def build_request(
    template: str,
    meta: MetaPrompt,
    temperature: float,
    sample: int,
    seeds: Seeds,
    config: Config,
    tag: Any = None,
) -> tuple[Shown, ChatRequest]:
    """The chat request rephrasing `template` under `meta`, in the shape `expansion.request_shape` says."""
    from instraug.llm.base import ChatRequest

    sampling, expansion = config.sampling, config.expansion
    shape = request_shape(config)
    hide = shape == "core" and expansion.protect_placeholders  # runs come back through the mask
    core = split_core(template) if hide else Core("", template, "")
    masked = mask_placeholders(core.body) if expansion.protect_placeholders else None
    shown = Shown(core, masked)
    tokens = masked.tokens if masked else _distinct(placeholders_of(core.body))
    request = ChatRequest(
        messages=_messages(shape, seeds, meta.text, tokens, shown.text),
        temperature=temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        stop=tuple(sampling.stop),
        sample_index=sample,
        tag=tag,
        constraint=constraint_for(config, masked),
    )
    return shown, request


def request_shape(config: Config) -> str:
    """The request shape in use: `expansion.request_shape`, auto resolved by the backend."""
    shape = config.expansion.request_shape
    if shape == "auto":
        return "core" if config.llm.backend == "local" else "paper"
    return shape


def _messages(
    shape: str, seeds: Seeds, meta: str, tokens: list[str], instruction: str
) -> tuple[tuple[str, str], ...]:
    """paper: the rules as system message, the instruction as user turn; examples: the example turns
    in between; user_turn and core: the example turns, then the rules and the instruction in one user
    turn. In those two, each example's user turn is worded the same way under the direct prompt, so
    every request opens with the same turns (a server reuses what it computed for them)."""
    if shape == "paper":
        return (("system", system_prompt(seeds, meta, tokens)), ("user", instruction))
    if shape == "examples":
        turns = [(ex.instruction, ex.rewrite) for ex in seeds.examples]
        system = ("system", system_prompt(seeds, meta, tokens))
        return (system, *_pairs(turns), ("user", instruction))
    turns = [
        (
            user_prompt(seeds, seeds.direct, _distinct(_MASK_TOKEN.findall(ex.instruction)), ex.instruction),
            ex.rewrite,
        )
        for ex in seeds.examples
    ]
    return (*_pairs(turns), ("user", user_prompt(seeds, meta, tokens, instruction)))


def _pairs(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [message for user, assistant in turns for message in (("user", user), ("assistant", assistant))]


def _answers(
    llm: LLMSession, requests: list[ChatRequest], budget: BudgetConfig | None, summary: GenerationSummary
) -> dict[Any, Completion]:
    """Send a round; with a budget, in slices, stopping before the budget is overspent."""
    if budget is None or (budget.max_requests is None and budget.max_usd is None):
        summary.requests += len(requests)
        return {c.request.tag: c for c in llm.run(requests)}
    answers: dict[Any, Completion] = {}
    stats = llm.stats
    pos = 0
    while pos < len(requests):
        if budget.max_requests is not None and stats.requests_sent >= budget.max_requests:
            summary.stopped = f"budget.max_requests ({budget.max_requests}) reached"
            break
        if budget.max_usd is not None and (stats.cost or 0.0) >= budget.max_usd:
            summary.stopped = f"budget.max_usd ({budget.max_usd}) reached"
            break
        room = len(requests) - pos
        if budget.max_requests is not None:
            room = min(room, budget.max_requests - stats.requests_sent)
        if budget.max_usd is not None:
            room = min(room, max(llm.backend.config.max_concurrency, 1))
        chunk = requests[pos : pos + room]
        pos += len(chunk)
        summary.requests += len(chunk)
        answers.update((c.request.tag, c) for c in llm.run(chunk))
    return answers


def _distinct(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


_MASK_TOKEN = re.compile(r"\{[A-Z]{1,2}\}")


@dataclass
class Estimate:
    """What a generation plan will ask for, before anything is sent."""

    templates: int = 0
    requests_min: int = 0
    requests_max: int = 0
    prompt_tokens_max: int = 0
    completion_tokens_max: int = 0
    cached_first_round: int = 0
    first_round: int = 0

    def cost(self, config: Config) -> float | None:
        """Upper bound of the cost, when prices are configured."""
        from instraug.funnel import cost

        llm = config.llm
        return cost(
            self.prompt_tokens_max,
            self.completion_tokens_max,
            llm.price_per_1k_input,
            llm.price_per_1k_output,
        )


def estimate(
    templates: Iterable[dict[str, Any]],
    meta_prompts: list[MetaPrompt],
    seeds: Seeds,
    config: Config,
    cached: Callable[[list[ChatRequest]], int] | None = None,
) -> Estimate:
    """Requests and tokens of the plan: at least `factor`, at most `max_attempts` per template and
    iteration (each kept rephrasing of one iteration is an input of the next). Prompt tokens are
    counted as characters / 4, completion tokens at `max_tokens`."""
    expansion = config.expansion
    out = Estimate()
    first_round: list[ChatRequest] = []
    chars = 0
    for template in templates:
        if augmentable(template["template"], template["task"], config.assembly.held_out_tasks):
            continue
        out.templates += 1
        for attempt in range(expansion.max_attempts):
            meta_i, temperature, sample = attempt_plan(
                attempt, len(meta_prompts), config.sampling.temperatures, expansion.samples_per_prompt
            )
            _shown, request = build_request(
                template["template"], meta_prompts[meta_i], temperature, sample, seeds, config
            )
            chars += sum(len(text) for _role, text in request.messages)
            if attempt < expansion.factor:
                first_round.append(request)
    inputs_min = inputs_max = out.templates
    per_template_chars = chars / max(out.templates * expansion.max_attempts, 1)
    for _iteration in range(expansion.iterations):
        out.requests_min += inputs_min * expansion.factor
        out.requests_max += inputs_max * expansion.max_attempts
        inputs_min *= expansion.factor
        inputs_max *= expansion.factor
    out.prompt_tokens_max = round(out.requests_max * per_template_chars / 4)
    out.completion_tokens_max = out.requests_max * config.sampling.max_tokens
    out.first_round = len(first_round)
    if cached is not None:
        out.cached_first_round = cached(first_round)
    return out

"""The pipeline: stages 1 -> 4 on a MultiInstruct checkout into a run directory, redoing only the
stages whose inputs changed. One runner owns the run directory (its lock, its state, its report).

Each stage is a `Stage`: its output file, the fingerprint of what determines that output, and how to
make it. Stage 2 judges every generation with the stage-3 rules as answers arrive and records the
verdict in the row; the pool is built from those recorded verdicts, never by judging again.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instraug.config import Config
from instraug.errors import (
    EXIT_BUDGET_REACHED,
    EXIT_COMPLETED_WITH_FAILURES,
    InputError,
    InstraugError,
)
from instraug.funnel import FilterSummary
from instraug.instances import instance_files, read_instances
from instraug.jsonl import read_jsonl, write_jsonl
from instraug.locks import run_dir_lock
from instraug.multiinstruct import import_templates
from instraug.rundir import (
    GENERATIONS,
    INSTRUCTIONS,
    META_PROMPTS,
    REJECTED,
    TEMPLATES,
    TRAIN,
    RunState,
    file_digest,
    fingerprint,
)
from instraug.rundir import cache_path as cache_file

if TYPE_CHECKING:
    from instraug.llm import LLMSession

STAGES = ("templates", "meta_prompts", "generations", "instructions", "train")


@dataclass
class RunResult:
    out: Path
    stages: dict[str, str] = field(default_factory=dict)  # stage -> "ran" | "up to date" | ...
    llm: dict[str, Any] = field(default_factory=dict)
    failures: int = 0
    first_failure: str | None = None  # the error of the first failed request
    stopped: str | None = None  # generation stopped early (budget); the run resumes from its cache
    error: InstraugError | None = None  # what stopped the run before its last stage
    report: dict[str, Any] = field(default_factory=dict)


def _llm_identity(config: Config) -> dict[str, Any]:
    """What about the LLM decides its answers (not where it runs or how fast)."""
    llm = config.llm
    return {"backend": llm.backend, "model": llm.model, "model_path": llm.model_path, "seed": llm.seed}


def run_pipeline(
    directory: Path,
    out: Path,
    config: Config,
    *,
    offline: bool = False,
    quiet: bool = False,
    cache_path: Path | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> RunResult:
    """Run every stage whose inputs changed since the last run into `out`.

    One run at a time holds `out` (RUN_DIR/.instraug.lock). Every run that gets it ends by writing
    report.json and report.md about itself, also when an error stops it (and then re-raises).
    """
    started = time.perf_counter()
    source = directory / "instruction_templates.py"
    if not source.is_file():
        raise InputError("not a MultiInstruct directory: no instruction_templates.py", directory)
    make_run_dir(out)
    result = RunResult(out)
    with run_dir_lock(out):
        try:
            _run_stages(directory, out, config, result, offline, quiet, cache_path, log)
        except InstraugError as exc:
            result.error = exc
            # the error is what the user must see; a report that cannot be written must not hide it
            with contextlib.suppress(InstraugError, OSError):
                _finish(out, config, result, time.perf_counter() - started)
            raise
        _finish(out, config, result, time.perf_counter() - started)
    return result


def make_run_dir(out: Path) -> None:
    """Create the run directory, or say why it cannot be one (exit 2)."""
    if out.exists() and not out.is_dir():
        raise InputError("not a directory: -o names a run directory, and this is a file", out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file" if blocker is not None else exc.strerror or str(exc)
        raise InputError(f"cannot create the run directory: {why}", out) from None


def _finish(out: Path, config: Config, result: RunResult, seconds: float) -> None:
    """report.json and report.md of this run, written together."""
    from instraug.report import write_report

    state = RunState(out)
    result.report = build_report(out, config, result, state.summary("train"), seconds)
    write_report(out, summary=result.report)


@dataclass
class Stage:
    """One step of the pipeline: `run` makes `output`; `inputs` fingerprints what determines it."""

    name: str
    output: Path
    inputs: Callable[[], str]
    run: Callable[[], dict[str, Any] | None]


def _run_stages(
    directory: Path,
    out: Path,
    config: Config,
    result: RunResult,
    offline: bool,
    quiet: bool,
    cache_path: Path | None,
    log: Callable[[str], None],
) -> None:
    state = RunState(out)
    source = directory / "instruction_templates.py"
    split = config.assembly.split
    inputs = [file_digest(f) for f in instance_files(directory, split)]
    paths = {name: out / name for name in (TEMPLATES, META_PROMPTS, GENERATIONS, INSTRUCTIONS, TRAIN)}
    session: list[LLMSession] = []  # opened on first use: up-to-date stages never start the model

    def failures() -> int:
        return session[0].stats.failures if session else 0

    def run_stage(stage: Stage) -> None:
        name, print_ = stage.name, stage.inputs()
        if state.fresh(name, stage.output, print_):
            result.stages[name] = "up to date"
            log(f"{name}: up to date")
            return
        log(f"{name}: running")
        failures_before = failures()
        result.stages[name] = "failed"
        try:
            summary = stage.run()
        except BaseException:
            state.forget(name)
            raise
        finally:
            if session:
                _llm_use(result, session[0])
        result.stages[name] = "ran"
        # a partial output (budget stop, failed requests) is never recorded as up to date,
        # so the next run sends what is missing (answers so far come from the cache)
        if result.stopped or failures() > failures_before:
            result.stages[name] = "stopped" if result.stopped else "incomplete"
            state.forget(name)
            unreachable = session[0].unreachable_error() if session else None
            if unreachable is not None:  # the server is down: the next stages would only fail too
                raise unreachable
            return
        state.record(name, stage.output, print_, summary)

    def templates() -> list[dict[str, Any]]:
        return [row for _line, row in read_jsonl(paths[TEMPLATES])]

    with contextlib.ExitStack() as stack:

        def llm() -> LLMSession:
            if not session:
                from instraug.llm import open_llm

                path = cache_file(cache_path, config.llm.cache_path, out)
                session.append(
                    stack.enter_context(open_llm(config.llm, cache_path=path, offline=offline, quiet=quiet))
                )
            return session[0]

        from instraug.stages.s1_meta_prompts import build_meta_prompts, load_seeds

        seeds = load_seeds(config.meta_prompts.directory)

        def run_templates() -> dict[str, Any]:
            rows = (t.as_row() for t in import_templates(source))
            return {"templates": write_jsonl(paths[TEMPLATES], rows)}

        def run_meta() -> dict[str, Any]:
            needs_llm = config.meta_prompts.bootstrap and config.meta_prompts.merge != "curated"
            built = build_meta_prompts(
                seeds, config.meta_prompts, config.sampling, llm() if needs_llm else None
            )
            write_jsonl(paths[META_PROMPTS], (p.model_dump() for p in built.prompts))
            return {"meta_prompts": len(built.prompts), "bootstrapped": built.bootstrapped}

        def run_generate() -> dict[str, Any]:
            from instraug.records import MetaPrompt
            from instraug.stages.s2_generate import GenerationSummary, generate
            from instraug.stages.s3_judge import open_judge
            from instraug.stages.s3_rules import RuleChain

            metas = [MetaPrompt.model_validate(row) for _line, row in read_jsonl(paths[META_PROMPTS])]
            summary = GenerationSummary()
            rows = templates()
            path = cache_file(cache_path, config.llm.cache_path, out)
            judge = open_judge(stack, config.filters, config.llm, llm, path, offline=offline, quiet=quiet)
            samples = _samples(directory, config, rows)
            shown = [text for e in seeds.examples for text in (e.instruction, e.rewrite)]
            with RuleChain(config.filters, samples, originals=rows, judge=judge, examples=shown) as chain:
                generated = generate(
                    rows, metas, seeds, config, llm(), chain.judge, summary, config.budget, chain.prefetch
                )
                write_jsonl(paths[GENERATIONS], generated)
            if summary.stopped:
                result.stopped = summary.stopped
                log(
                    f"generations: stopped early, {summary.stopped}; run again with a larger budget to resume"
                )
            return {
                "requests": summary.requests,
                "skipped": summary.skipped,
                "render_skipped": chain.summary.render_skipped,
            }

        def run_pool() -> dict[str, Any]:
            from instraug.stages.s3_filter import pool_from_verdicts

            return pool_from_verdicts(
                paths[GENERATIONS], paths[TEMPLATES], paths[INSTRUCTIONS], out / REJECTED
            )

        def run_assemble() -> dict[str, Any]:
            from instraug.pool import InstructionPool
            from instraug.stages.s4_assemble import AssemblySummary, assemble

            summary = AssemblySummary()
            rows = assemble(
                InstructionPool.load(paths[INSTRUCTIONS]),
                read_instances(directory, split),
                epsilon=config.assembly.epsilon,
                seed=config.assembly.seed,
                held_out=config.assembly.held_out_tasks,
                shuffle_options=config.assembly.shuffle_options,
                summary=summary,
            )
            write_jsonl(paths[TRAIN], rows)
            return summary.as_dict()

        def digest(name: str) -> str:
            return file_digest(paths[name])

        llm_identity = _llm_identity(config)
        stages = [
            Stage(
                "templates",
                paths[TEMPLATES],
                lambda: fingerprint("templates", file_digest(source)),
                run_templates,
            ),
            Stage(
                "meta_prompts",
                paths[META_PROMPTS],
                lambda: fingerprint(
                    "meta_prompts",
                    seeds.model_dump(),
                    config.meta_prompts.model_dump(),
                    config.sampling.model_dump(),
                    llm_identity,
                ),
                run_meta,
            ),
            Stage(
                "generations",  # judged by the stage-3 rules as answers arrive
                paths[GENERATIONS],
                lambda: fingerprint(
                    "generations",
                    digest(TEMPLATES),
                    digest(META_PROMPTS),
                    config.sampling.model_dump(),
                    config.expansion.model_dump(),
                    config.filters.model_dump(),
                    config.assembly.held_out_tasks,
                    llm_identity,
                    inputs,
                ),
                run_generate,
            ),
            Stage(
                "instructions",  # the pool, from the verdicts recorded in generations.jsonl
                paths[INSTRUCTIONS],
                lambda: fingerprint("instructions", digest(GENERATIONS), digest(TEMPLATES)),
                run_pool,
            ),
            Stage(
                "train",
                paths[TRAIN],
                lambda: fingerprint("train", digest(INSTRUCTIONS), inputs, config.assembly.model_dump()),
                run_assemble,
            ),
        ]
        for stage in stages:
            run_stage(stage)


def _llm_use(result: RunResult, session: LLMSession) -> None:
    result.llm = session.stats.as_dict()
    result.failures = session.stats.failures
    result.first_failure = session.first_failure


def _samples(directory: Path, config: Config, templates: list[dict[str, Any]]) -> dict[str, Any]:
    from instraug.stages.s3_filter import sample_instances

    tasks = {row["task"] for row in templates}
    return sample_instances(directory, config.assembly.split, tasks, config.filters.render_samples)


def build_report(
    out: Path, config: Config, result: RunResult, assembly: dict[str, Any], seconds: float
) -> dict[str, Any]:
    """report.json: what happened, funnel per rule and per task, achieved factor, LLM use, time."""
    stages = {name: result.stages.get(name, "not run") for name in STAGES}
    if result.error is not None:
        # The outputs on disk are not (all) this run's: the report says what stopped it, no more.
        return {
            "outcome": _outcome(result, stages, None),
            "stages": stages,
            "stopped": result.stopped,
            "llm": result.llm,
            "seconds": round(seconds, 2),
        }
    from instraug.funnel import RunFunnel

    originals: Counter[str] = Counter()
    for _line, row in read_jsonl(out / TEMPLATES):
        originals[row["task"]] += 1
    funnel = RunFunnel.read(out / GENERATIONS)
    funnel.overall.render_skipped = int(RunState(out).summary("generations").get("render_skipped", 0))
    return {
        "outcome": _outcome(result, stages, funnel.overall),
        "stages": stages,
        "stopped": result.stopped,
        "templates": dict(sorted(originals.items())),
        "expansion": {"factor": config.expansion.factor},
        **funnel.as_dict(),
        "achieved_factor": funnel.achieved(config.expansion.factor),
        "llm": result.llm,
        "assembly": assembly,
        "seconds": round(seconds, 2),
    }


def _outcome(result: RunResult, stages: dict[str, str], funnel: FilterSummary | None) -> dict[str, Any]:
    """How the run ended, its exit code, and a message that says so ("" for a run that met its plan)."""
    if result.error is not None:
        ran = [name for name, status in stages.items() if status != "not run"]
        where = f"in stage {ran[-1]}" if ran and stages[ran[-1]] in ("failed", "incomplete") else "early"
        code = result.error.exit_code
        what = "The LLM could not be used; the run stopped" if code == 3 else "The run stopped"
        return {"status": "failed", "exit_code": code, "message": f"{what} {where}: {result.error}"}
    parts: list[str] = []
    requests = int(result.llm.get("requests") or 0)
    every_request_failed = bool(result.failures) and result.failures >= requests
    if result.stopped:
        parts.append(
            f"Generation stopped early: {result.stopped}; the later stages ran on the answers so far, "
            "and a re-run resumes from the cache."
        )
    if every_request_failed:
        parts.append(
            f"Every request failed: {result.failures} of {requests} requests failed after all retries "
            f"(first error: {result.first_failure})."
        )
    elif result.failures:
        parts.append(
            f"{result.failures} of {requests} requests failed after all retries "
            f"(first error: {result.first_failure}); they are rows with their error in {GENERATIONS}."
        )
    if result.failures:
        parts.append("A re-run sends the failed requests again.")
    if funnel is not None and not funnel.kept:
        generated = funnel.generated
        if not generated:
            parts.append("No rephrasing was kept: no template was sent for rephrasing.")
        elif every_request_failed:
            parts.append("No rephrasing was kept.")
        else:
            reasons = sorted(funnel.flagged.items(), key=lambda item: (-item[1], item[0]))
            flagged = ", ".join(f"{reason} {n}" for reason, n in reasons)
            parts.append(f"No rephrasing was kept: all {generated} rewrites were rejected ({flagged}).")
    if result.stopped:
        status, code = "stopped", EXIT_BUDGET_REACHED
    elif result.failures:
        status, code = "completed_with_failures", EXIT_COMPLETED_WITH_FAILURES
    else:
        status, code = "completed", 0
    return {"status": status, "exit_code": code, "message": " ".join(parts)}


def estimate_run(
    directory: Path, out: Path, config: Config, cache_path: Path | None = None
) -> dict[str, Any]:
    """The planned requests, tokens and cost of `expand`, without sending anything."""
    from instraug.llm import count_cached
    from instraug.llm.base import get_backend
    from instraug.records import MetaPrompt
    from instraug.stages.s1_meta_prompts import load_seeds
    from instraug.stages.s2_generate import estimate

    source = directory / "instruction_templates.py"
    if not source.is_file():
        raise InputError("not a MultiInstruct directory: no instruction_templates.py", directory)
    templates = [t.as_row() for t in import_templates(source)]
    seeds = load_seeds(config.meta_prompts.directory)
    if (out / META_PROMPTS).is_file():
        metas = [MetaPrompt.model_validate(row) for _line, row in read_jsonl(out / META_PROMPTS)]
        meta_note = f"the {len(metas)} meta-prompts of {out / META_PROMPTS}"
    else:
        curated = [MetaPrompt(id="direct", text=seeds.direct, origin="direct")]
        curated += [MetaPrompt(id=s.id, text=s.text, origin="curated") for s in seeds.strategies]
        metas = curated[: config.meta_prompts.count]
        meta_note = "the direct and curated meta-prompts (bootstrapped ones are not known yet)"
    bootstrap = int(config.meta_prompts.bootstrap and config.meta_prompts.merge != "curated")
    path = cache_file(cache_path, config.llm.cache_path, out)
    model = get_backend(config.llm.backend).resolve_model(config.llm)

    def cached(requests: list[Any]) -> int:
        return count_cached(path, config.llm, requests)

    plan = estimate(templates, metas, seeds, config, cached)
    if config.filters.judge.enabled:
        # at most one yes/no question per rewrite: the original, the rewrite and the question
        from instraug.stages.s3_judge import JUDGE_PROMPT

        chars = sum(len(str(t["template"])) for t in templates) / max(len(templates), 1)
        judged = plan.requests_max
        plan.requests_max += judged
        plan.prompt_tokens_max += round(judged * (len(JUDGE_PROMPT) + 2 * chars) / 4)
        plan.completion_tokens_max += judged * config.filters.judge.max_tokens
    cost = plan.cost(config)
    if cost is not None and config.llm.mode == "batch":  # batches cost llm.batch_discount of the price
        cost *= config.llm.batch_discount
    return {
        "model": model,
        "mode": config.llm.mode,
        "templates_augmented": plan.templates,
        "requests_min": plan.requests_min + bootstrap,
        "requests_max": plan.requests_max + bootstrap,
        "prompt_tokens_max": plan.prompt_tokens_max,
        "completion_tokens_max": plan.completion_tokens_max,
        "cost_max_usd": None if cost is None else round(cost, 4),
        "first_round_cached": f"{plan.cached_first_round} of {plan.first_round}",
        "meta_prompts": meta_note,
        "budget": config.budget.model_dump(),
    }

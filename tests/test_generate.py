"""Stage 2: the generation scheduler, against an in-process LLM whose answers a test scripts."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from instraug.config import AssemblyConfig, Config, ExpansionConfig, SamplingConfig
from instraug.errors import InputError
from instraug.llm.base import ChatRequest, Completion, RunStats
from instraug.placeholders import Core, Masked, mask_placeholders, restore_core, restore_placeholders
from instraug.records import MetaPrompt, Verdict
from instraug.stages.s1_meta_prompts import Seeds
from instraug.stages.s2_generate import GenerationSummary, attempt_plan, generate

# --------------------------------------------------------------------------------------------
# The inputs


def template_row(task: str, index: int, template: str) -> dict[str, Any]:
    iid = f"{task}/{index}"
    return {
        "task": task,
        "variant": None,
        "template_id": iid,
        "instruction_id": iid,
        "root_id": iid,
        "parent_id": None,
        "origin": "original",
        "template": template,
    }


VQA = 'Answer the question {question} using the options {options|join("||||")}.'
PURE = '{question}{options_token} {options|join("||||")}'
CAPTION = "Write a short caption that describes the image."
REGIONS = "Compare {region} with {region} and describe both regions."
NLI = 'Does the image support "{text}"? Answer with yes or no.'
TEMPLATES = [
    template_row("vqa", 0, VQA),
    template_row("vqa", 1, PURE),  # nothing to rephrase
    template_row("caption", 0, CAPTION),
    template_row("caption", 1, REGIONS),  # one placeholder, twice
    template_row("visual_nli", 0, NLI),  # a held-out task by default
]
AUGMENTED = ["vqa/0", "caption/0", "caption/1"]

SEEDS = Seeds(
    direct="Rephrase the instruction.",
    bootstrap="Give {n} ways.",
    keep_tokens="Keep the tokens {tokens} exactly.",
    suffix="Reply with the rewrite only.",
)
METAS = [
    MetaPrompt(id="direct", text="Rephrase the instruction.", origin="direct"),
    MetaPrompt(id="synonyms", text="Use synonyms for some words.", origin="curated"),
    MetaPrompt(id="reorder", text="Reorder the phrases.", origin="curated"),
]
TEMPERATURES = [0.5, 1.0]


def make_config(**expansion: Any) -> Config:
    """The scheduler's tests ask in the paper's shape: the instruction alone is the last message."""
    return Config(
        sampling=SamplingConfig(temperatures=TEMPERATURES, top_p=0.9, max_tokens=77, stop=["\n\n"]),
        expansion=ExpansionConfig(**{"factor": 3, "max_attempts": 10, "request_shape": "paper", **expansion}),
    )


# --------------------------------------------------------------------------------------------
# The fake LLM


def attempt_number(meta: int, temperature: float, sample: int) -> int:
    """Which attempt of its template this is: the inverse of the documented plan."""
    return (sample * len(TEMPERATURES) + TEMPERATURES.index(temperature)) * len(METAS) + meta


def attempt_of(request: ChatRequest) -> int:
    system = request.messages[0][1]
    meta = next(i for i, m in enumerate(METAS) if system.startswith(m.text))
    return attempt_number(meta, request.temperature, request.sample_index)


ADVERBS = (
    "carefully quickly simply calmly briefly clearly gently plainly directly precisely neatly politely "
    "promptly quietly boldly firmly lightly openly swiftly truly wisely warmly freely fully fairly"
).split()


def rephrase(shown: str, attempt: int) -> str:
    """A good rewrite: an adverb unique to the attempt, then the text shown, tokens kept."""
    return f"{ADVERBS[attempt].capitalize()} {shown[0].lower()}{shown[1:]}"


def good(request: ChatRequest) -> str:
    return rephrase(request.messages[-1][1], attempt_of(request))


def junk(request: ChatRequest) -> str:
    return ""  # nothing left after cleanup: rejected as empty


def request_key(request: ChatRequest) -> str:
    fields = [request.messages, request.temperature, request.top_p, request.max_tokens, request.sample_index]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


class FakeSession:
    """An LLMSession stand-in: scripted answers, in a shuffled completion order if asked."""

    def __init__(self, answer: Callable[[ChatRequest], str | None], shuffle: int | None = None) -> None:
        self.answer = answer
        self.rng = random.Random(shuffle) if shuffle is not None else None
        self.stats = RunStats()
        self.batches: list[list[ChatRequest]] = []

    def run(self, requests: Iterable[ChatRequest]) -> Iterator[Completion]:
        batch = list(requests)
        self.batches.append(batch)
        self.stats.requests += len(batch)
        completions = [
            Completion(
                request=request,
                key=request_key(request),
                model="fake",
                text=self.answer(request),
                finish_reason="stop",
                prompt_tokens=1,
                completion_tokens=1,
                cached=False,
            )
            for request in batch
        ]
        if self.rng is not None:
            self.rng.shuffle(completions)
        yield from completions

    @property
    def requests(self) -> list[ChatRequest]:
        return [request for batch in self.batches for request in batch]

    def requests_for(self, template: str) -> list[ChatRequest]:
        shown = {template, mask_placeholders(template).text}
        return [r for r in self.requests if r.messages[-1][1] in shown]


def judge(row: dict[str, Any]) -> Verdict:
    """A stand-in for the stage-3 rules: an empty reply is rejected, anything else kept as is."""
    raw = row["raw"]
    if not raw:
        return Verdict(["empty"], cleaned="")
    masked = row["masked"]
    template = restore_placeholders(raw, Masked(masked, row["mapping"]))[0] if masked is not None else raw
    instruction_id = f"{row['root_id']}~{row['request_hash'][:8]}"
    instruction = {"instruction_id": instruction_id, "template": template, "root_id": row["root_id"]}
    return Verdict([], cleaned=raw, template=template, instruction=instruction)


class Run:
    """One generate() call: its rows, the fake LLM it used, its summary, every verdict."""

    def __init__(
        self,
        config: Config,
        answer: Callable[[ChatRequest], str | None],
        *,
        templates: list[dict[str, Any]] = TEMPLATES,
        shuffle: int | None = None,
    ) -> None:
        self.session = FakeSession(answer, shuffle)
        self.summary = GenerationSummary()
        self.verdicts: list[tuple[dict[str, Any], Verdict]] = []

        def judged(row: dict[str, Any]) -> Verdict:
            verdict = judge(row)
            self.verdicts.append((dict(row), verdict))
            return verdict

        rows = generate(templates, METAS, SEEDS, config, self.session, judged, self.summary)
        self.rows = list(rows)

    def rows_of(self, template_id: str) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["template_id"] == template_id]


# --------------------------------------------------------------------------------------------
# The attempt plan


@pytest.mark.parametrize(("n_meta", "temperatures"), [(1, [0.7]), (3, [0.5, 1.0]), (2, [0.2, 0.6, 1.4])])
def test_attempt_plan_varies_meta_prompts_fastest_then_temperature_then_sample(
    n_meta: int, temperatures: list[float]
) -> None:
    expected = [(m, t, s) for s in range(4) for t in temperatures for m in range(n_meta)]
    assert [attempt_plan(i, n_meta, temperatures) for i in range(len(expected))] == expected


@pytest.mark.parametrize("per_prompt", [2, 3])
def test_several_samples_of_one_prompt_come_in_a_row(per_prompt: int) -> None:
    n_meta, temperatures = 2, [0.5, 1.0]
    plan = [attempt_plan(i, n_meta, temperatures, per_prompt) for i in range(n_meta * 2 * per_prompt * 2)]
    expected = [
        (m, t, r * per_prompt + s)
        for r in range(2)
        for t in temperatures
        for m in range(n_meta)
        for s in range(per_prompt)
    ]
    assert plan == expected
    assert len(set(plan)) == len(plan)  # no request asked twice


def test_requests_follow_the_attempt_plan() -> None:
    run = Run(make_config(), junk)
    plan = [attempt_plan(i, len(METAS), TEMPERATURES) for i in range(10)]
    for template in (VQA, CAPTION, REGIONS):
        asked = run.session.requests_for(template)
        assert len(asked) == 10
        for request, (meta, temperature, sample) in zip(asked, plan, strict=True):
            assert request.messages[0][1].startswith(METAS[meta].text)
            assert (request.temperature, request.sample_index) == (temperature, sample)
    for template_id in AUGMENTED:
        rows = run.rows_of(template_id)
        assert [(r["meta_prompt_id"], r["temperature"], r["sample_index"]) for r in rows] == [
            (METAS[m].id, t, s) for m, t, s in plan
        ]


# --------------------------------------------------------------------------------------------
# When to stop


def test_stops_at_the_factor() -> None:
    run = Run(make_config(factor=3), good)
    assert len(run.session.batches) == 1  # every answer was kept: nothing more to ask
    for template_id in AUGMENTED:
        rows = run.rows_of(template_id)
        assert len(rows) == 3
        assert all(row["kept"] and row["reasons"] == [] for row in rows)
        assert run.summary.kept[template_id] == 3 and run.summary.attempts[template_id] == 3
    assert run.summary.achieved_factor() == {
        "caption": {"templates": 2, "kept": 6, "attempts": 6, "factor": 3.0},
        "vqa": {"templates": 1, "kept": 3, "attempts": 3, "factor": 3.0},
    }


def test_asks_again_only_for_what_is_still_missing() -> None:
    def direct_fails(request: ChatRequest) -> str:
        return junk(request) if attempt_of(request) % len(METAS) == 0 else good(request)

    run = Run(make_config(factor=3), direct_fails)
    # attempt 0 (direct) fails, 1 and 2 are kept; attempt 3 (direct again) fails; attempt 4 is kept
    per_batch = [Counter(r.messages[-1][1] for r in batch) for batch in run.session.batches]
    for template in (VQA, CAPTION, REGIONS):
        shown = mask_placeholders(template).text
        assert [counts[shown] for counts in per_batch] == [3, 1, 1]
    for template_id in AUGMENTED:
        assert [row["kept"] for row in run.rows_of(template_id)] == [False, True, True, False, True]
        assert run.summary.kept[template_id] == 3


def test_stops_at_max_attempts_when_the_llm_answers_junk() -> None:
    run = Run(make_config(factor=3, max_attempts=7), junk)
    for template_id in AUGMENTED:
        rows = run.rows_of(template_id)
        assert len(rows) == 7
        assert not any(row["kept"] for row in rows)
        assert all(row["reasons"] == ["empty"] for row in rows)
    assert len(run.session.requests) == 7 * len(AUGMENTED)
    assert run.summary.achieved_factor() == {
        "caption": {"templates": 2, "kept": 0, "attempts": 14, "factor": 0.0},
        "vqa": {"templates": 1, "kept": 0, "attempts": 7, "factor": 0.0},
    }


def test_summary_reports_a_partial_shortfall() -> None:
    def rarely_good(request: ChatRequest) -> str:
        meta, temperature, _ = attempt_plan(attempt_of(request), len(METAS), TEMPERATURES)
        return good(request) if (meta, temperature) == (1, TEMPERATURES[0]) else junk(request)

    run = Run(make_config(factor=3, max_attempts=10), rarely_good)
    # within 10 attempts only attempts 1 and 7 use meta-prompt 1 at the first temperature
    for template_id in AUGMENTED:
        assert [i for i, row in enumerate(run.rows_of(template_id)) if row["kept"]] == [1, 7]
        assert len(run.rows_of(template_id)) == 10
    factors = run.summary.achieved_factor()
    assert factors["vqa"]["factor"] == factors["caption"]["factor"] == 2.0


# --------------------------------------------------------------------------------------------
# What is asked


def test_held_out_tasks_and_pure_placeholder_templates_are_never_requested() -> None:
    run = Run(make_config(), good)
    asked = {r.messages[-1][1] for r in run.session.requests}
    assert asked == {mask_placeholders(t).text for t in (VQA, CAPTION, REGIONS)}
    assert {row["template_id"] for row in run.rows} == set(AUGMENTED)
    assert run.summary.skipped == {"vqa/1": "pure_placeholder", "visual_nli/0": "held_out_task"}


def test_held_out_tasks_come_from_the_config() -> None:
    config = make_config()
    config.assembly = AssemblyConfig(held_out_tasks=["caption"])
    run = Run(config, good)
    assert {row["template_id"] for row in run.rows} == {"vqa/0", "visual_nli/0"}
    assert run.session.requests_for(CAPTION) == run.session.requests_for(REGIONS) == []
    assert run.summary.skipped == {
        "vqa/1": "pure_placeholder",
        "caption/0": "held_out_task",
        "caption/1": "held_out_task",
    }


@pytest.mark.parametrize(
    ("template", "user", "tokens"),
    [
        (VQA, "Answer the question {A} using the options {B}.", "{A}, {B}"),
        (REGIONS, "Compare {A} with {A} and describe both regions.", "{A}"),
        (CAPTION, CAPTION, None),
    ],
    ids=["two-placeholders", "repeated-placeholder", "no-placeholder"],
)
def test_requests_carry_the_meta_prompt_and_the_masked_template(
    template: str, user: str, tokens: str | None
) -> None:
    run = Run(make_config(factor=3), good)
    asked = run.session.requests_for(template)
    assert len(asked) == 3
    for request, meta in zip(asked, METAS, strict=True):
        (role_s, system), (role_u, shown) = request.messages
        assert (role_s, role_u) == ("system", "user")
        assert shown == user
        assert system.startswith(meta.text) and system.endswith(SEEDS.suffix)
        if tokens is None:
            assert "Keep the tokens" not in system
        else:
            assert f"Keep the tokens {tokens} exactly." in system
        assert (request.top_p, request.max_tokens, request.stop) == (0.9, 77, ("\n\n",))
    for row in run.rows:
        assert row["masked"] == mask_placeholders(row["parent_template"]).text
        assert row["mapping"] == mask_placeholders(row["parent_template"]).mapping


def test_unprotected_requests_show_the_raw_template() -> None:
    run = Run(make_config(factor=2, protect_placeholders=False), good)
    asked = run.session.requests_for(VQA)
    assert [r.messages[-1][1] for r in asked] == [VQA, VQA]
    assert 'Keep the tokens {question}, {options|join("||||")} exactly.' in asked[0].messages[0][1]
    assert [r.messages[-1][1] for r in run.session.requests_for(REGIONS)] == [REGIONS, REGIONS]
    for row in run.rows:
        assert row["masked"] is None and row["mapping"] == {}


# --------------------------------------------------------------------------------------------
# Iterations


def test_second_iteration_rephrases_the_kept_outputs_of_the_first() -> None:
    run = Run(make_config(factor=2, iterations=2), good)
    first = {
        verdict.instruction["instruction_id"]: (row, verdict.instruction)
        for row, verdict in run.verdicts
        if row["iteration"] == 1 and verdict.kept
    }
    assert len(first) == 2 * len(AUGMENTED)
    second = [row for row in run.rows if row["iteration"] == 2]
    assert len(second) == 2 * len(first)  # each kept first-round rewrite got the factor again
    assert {row["parent_id"] for row in second} == set(first)
    for row in second:
        parent_row, parent = first[row["parent_id"]]
        assert row["template_id"] == parent["instruction_id"]
        assert row["parent_template"] == parent["template"]
        assert row["root_id"] == parent_row["root_id"] == parent["root_id"]
        assert row["root_template"] == parent_row["root_template"]
        assert row["masked"] == mask_placeholders(parent["template"]).text
        assert row["kept"]
    roots = {row["template_id"]: row["template"] for row in TEMPLATES}
    assert all(row["root_template"] == roots[row["root_id"]] for row in run.rows)
    second_asked = {r.messages[-1][1] for r in run.session.requests} - {
        mask_placeholders(t).text for t in (VQA, CAPTION, REGIONS)
    }
    assert second_asked == {mask_placeholders(parent["template"]).text for _, parent in first.values()}


# --------------------------------------------------------------------------------------------
# Order


def test_rows_come_out_in_a_deterministic_order_whatever_the_completion_order() -> None:
    def mixed(request: ChatRequest) -> str:
        return junk(request) if attempt_of(request) % 4 == 2 else good(request)

    config = make_config(factor=3, iterations=2)
    runs = [Run(config, mixed, shuffle=seed) for seed in (None, 1, 2, 3)]
    assert all(run.rows == runs[0].rows for run in runs[1:])
    # every answer sits on the row of the request it answered
    for row in runs[1].rows:
        meta = [m.id for m in METAS].index(row["meta_prompt_id"])
        attempt = attempt_number(meta, row["temperature"], row["sample_index"])
        assert row["raw"] == ("" if attempt % 4 == 2 else rephrase(row["masked"], attempt))
    # within the first batch: template order, then attempt order
    first_batch = runs[2].rows[: 3 * len(AUGMENTED)]
    assert [row["template_id"] for row in first_batch] == [t for t in AUGMENTED for _ in range(3)]


def test_no_meta_prompts_is_an_input_error_and_asks_nothing() -> None:
    session = FakeSession(good)
    rows = generate(TEMPLATES, [], SEEDS, make_config(), session, judge)
    with pytest.raises(InputError) as error:
        next(rows)
    assert str(error.value) == "no meta-prompts: generation needs at least one (see `instraug meta-prompts`)"
    assert session.batches == []


# --------------------------------------------------------------------------------------------
# The core shape: what stage 3 needs to put the hidden runs back is on the row

COLOR = 'Pick the colour of the object. {question}{options_token} {options|join("||||")}'


def instruction_shown(request: ChatRequest) -> str:
    """The instruction of a user-turn request (seeds' default wording)."""
    match = re.search(r"Instruction: (.*)\nRewritten instruction:$", request.messages[-1][1], re.S)
    assert match, request.messages[-1][1]
    return match.group(1)


def test_core_rows_carry_the_hidden_runs_and_the_body_the_llm_saw() -> None:
    templates = [template_row("vqa", 0, VQA), template_row("color", 0, COLOR)]
    run = Run(
        make_config(factor=2, request_shape="core"),
        lambda request: "Kindly " + instruction_shown(request),
        templates=templates,
    )
    assert len(run.rows) == 4
    for row in run.rows:
        core = Core.of(row["parent_template"], row["prefix"], row["suffix"])
        assert row["masked"] == mask_placeholders(core.body).text
        assert row["mapping"] == mask_placeholders(core.body).mapping
        body, _unknown = restore_placeholders(row["raw"], Masked(row["masked"], row["mapping"]))
        restored = restore_core(body, core)
        assert restored.startswith(row["prefix"]) and restored.endswith(row["suffix"])
    color = run.rows_of("color/0")
    assert {(r["prefix"], r["suffix"]) for r in color} == {
        ("", ' {question}{options_token} {options|join("||||")}')
    }
    assert {r["masked"] for r in color} == {"Pick the colour of the object."}
    vqa = run.rows_of("vqa/0")  # its placeholders sit inside its sentence: nothing hidden
    assert {(r["prefix"], r["suffix"], r["masked"]) for r in vqa} == {("", "", mask_placeholders(VQA).text)}


def test_paper_rows_hide_nothing() -> None:
    run = Run(make_config(factor=1), good, templates=[template_row("color", 0, COLOR)])
    (row,) = run.rows
    assert (row["prefix"], row["suffix"], row["masked"]) == ("", "", mask_placeholders(COLOR).text)


def test_templates_of_tasks_upstreams_build_skips_are_not_augmented() -> None:
    from instraug.instances import SKIPPED_TASKS
    from instraug.stages.s2_generate import augmentable

    assert "image_generation" in SKIPPED_TASKS
    assert augmentable("Generate an image of {text}.", "image_generation", ()) == "skipped_task"
    assert augmentable("Describe {text}.", "image_caption", ()) is None


def test_samples_of_one_prompt_go_in_one_call_with_llm_n(tmp_path: Path) -> None:
    """samples_per_prompt with llm.n: one API call answers the samples of a prompt (billed once)."""
    import yaml
    from fake_openai_server import ScriptedOpenAIServer
    from test_expand import EXAMPLE, KEY_ENV, write_config
    from typer.testing import CliRunner

    from instraug.cli import app

    def run(per_prompt: int, n: int) -> tuple[int, dict[str, Any]]:
        with ScriptedOpenAIServer() as server:
            path = write_config(tmp_path / f"c{per_prompt}{n}.yaml", server.url)
            config = yaml.safe_load(path.read_text())
            config["llm"]["n"] = n
            config["expansion"] = {"factor": 3, "max_attempts": 3, "samples_per_prompt": per_prompt}
            config["meta_prompts"] = {"merge": "curated", "count": 3}
            path.write_text(yaml.safe_dump(config))
            out = tmp_path / f"run{per_prompt}{n}"
            result = CliRunner().invoke(
                app, ["expand", str(EXAMPLE), "-o", str(out), "-c", str(path), "-q"], env={KEY_ENV: "k"}
            )
            assert result.exit_code == 0, result.stderr
            return len(server.requests), json.loads((out / "report.json").read_text())["llm"]

    calls_apart, llm_apart = run(1, 3)  # the paper's plan: three meta-prompts, nothing to group
    calls_grouped, llm_grouped = run(3, 3)
    assert llm_apart["requests"] == llm_grouped["requests"]
    assert calls_apart == llm_apart["requests"]
    assert calls_grouped * 3 == llm_grouped["requests"]

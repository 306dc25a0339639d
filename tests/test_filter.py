"""Stage 3: reply cleanup, every rule (cases that must pass and cases that must fail), the
stateful chain, and `instraug filter` end to end."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import read_jsonl, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import Result

from instraug.config import FilterConfig, load_config
from instraug.derived import CONSTANTS, render_fields
from instraug.errors import ConfigError, InputError
from instraug.funnel import REASONS
from instraug.multiinstruct import import_templates
from instraug.placeholders import CompiledTemplate, literal_text, mask_placeholders, placeholders_of
from instraug.records import Instruction, instruction_id
from instraug.stages.s3_cleanup import clean_response
from instraug.stages.s3_filter import filter_generations, sample_instances
from instraug.stages.s3_rules import RuleChain, build_candidate

Cli = Callable[..., Result]

GC = 'What is the content of {region|join("||||")}?'
GC_REGION = '{region|join("||||")}'
CAPTION = "Generate some text to describe the image."
GC_INSTANCE = {"task_name": "GC", "region": ["<bin_1>", "<bin_2>"], "target_txt": "a dog"}


def gen(
    parent: str = GC,
    raw: str | None = "Describe what is in {A}.",
    *,
    root: str | None = None,
    task: str = "GC",
    root_id: str = "GC/1",
    protect: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """A stage-2 generation row rephrasing `parent` (placeholders masked unless protect=False)."""
    masked = mask_placeholders(parent) if protect else None
    return {
        "template_id": extra.pop("template_id", root_id),
        "task": task,
        "variant": None,
        "meta_prompt_id": "direct",
        "temperature": 0.6,
        "sample_index": 0,
        "iteration": 1,
        "parent_id": extra.pop("parent_id", root_id),
        "root_id": root_id,
        "parent_template": parent,
        "root_template": root or parent,
        "masked": masked.text if masked else None,
        "mapping": masked.mapping if masked else {},
        "raw": raw,
        "request_hash": extra.pop("request_hash", None),
        "model": "test-model",
        "error": None,
        **extra,
    }


def reasons(raw: str | None, parent: str = GC, chain: RuleChain | None = None, **kw: Any) -> list[str]:
    return (chain or RuleChain()).judge(gen(parent, raw, **kw)).reasons


# --------------------------------------------------------------------------------------------
# clean_response

MASKED_GC = "What is the content of {A}?"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('Sure! Here is the rewritten instruction: "Describe what is in {A}."', "Describe what is in {A}."),
        ("Here's the rewritten instruction:\n\nDescribe what is in {A}.", "Describe what is in {A}."),
        ("Rewritten instruction: What does {A} contain?", "What does {A} contain?"),
        ("**Rephrased:** Can you tell me what is in {A}?", "Can you tell me what is in {A}?"),
        ("Output: “What is shown in {A}?”", "What is shown in {A}?"),
        ("`What is displayed in {A}?`", "What is displayed in {A}?"),
        ("```\nWhat is displayed in {A}?\n```", "What is displayed in {A}?"),
        ("- Identify the contents of {A}.", "Identify the contents of {A}."),
        ("*Identify the contents of {A}.*", "Identify the contents of {A}."),
        ('"Describe what is in {A}." This version is more direct.', "Describe what is in {A}."),
        ("“Describe {A}.” — this keeps the meaning.", "Describe {A}."),
        ("Describe what is in {A}.\n\nNote: I kept {A} unchanged.", "Describe what is in {A}."),
        ("Describe {A}. (Note: kept the token.)", "Describe {A}."),
        ("Here is a rewritten version: Describe {A}. I hope this helps!", "Describe {A}."),
        ("What is in {A}? I rephrased it to be shorter.", "What is in {A}?"),
        ("Sure, I can help with that!\n\nWhat does the region {A} show?", "What does the region {A} show?"),
        ("Certainly. Describe {A}.", "Describe {A}."),
        ('The rephrased instruction is: "Describe {A}."', "Describe {A}."),
        (
            "Original: What is the content of {A}?\nRewritten: Describe the content of {A}.",
            "Describe the content of {A}.",
        ),
        ("Here are some options:\n1. What can be seen in {A}?\n2. Describe {A}.", "What can be seen in {A}?"),
        ("1) Summarize {A}.\n2) Explain {A}.", "Summarize {A}."),
        # the line holding the input's mask tokens wins over a line without them
        ("Describe the region.\nWhat is inside {A}?", "What is inside {A}?"),
        ("Tell me what's in {A}.", "Tell me what's in {A}."),
        ("'Tell me what's in {A}.'", "Tell me what's in {A}."),
        ("Sure!", ""),
        ("", ""),
    ],
)
def test_clean_response(raw: str, expected: str) -> None:
    assert clean_response(raw, MASKED_GC) == expected


@pytest.mark.parametrize(
    ("raw", "shown", "expected"),
    [
        # quotes that belong to the instruction stay
        (
            '"{A}" refers to a part of the image. Locate it.',
            ' "{A}" describes part of the image. Find it.',
            '"{A}" refers to a part of the image. Locate it.',
        ),
        (
            '"{A}" is described in the image; find that region.',
            'Find the region that "{A}" describes.',
            '"{A}" is described in the image; find that region.',
        ),
        # words before a colon are kept unless they talk about the rewrite
        (
            "Here is a region: {A}. What does it contain?",
            MASKED_GC,
            "Here is a region: {A}. What does it contain?",
        ),
        ("Great care: describe {A}.", MASKED_GC, "Great care: describe {A}."),
        # a multi-line input keeps a multi-line rewrite whole
        (
            "Here is the rewritten instruction:\n\nWrite one sentence about the object.\nRegion: {A}\n\n"
            "This version is shorter.",
            "Write a sentence to describe the object.\n\nRegion: {A}",
            "Write one sentence about the object.\nRegion: {A}",
        ),
        # no tokens (a caption template): the first line of alternatives
        ("Write a short caption.\nCompose a description of the picture.", CAPTION, "Write a short caption."),
    ],
)
def test_clean_response_keeps_the_instruction(raw: str, shown: str, expected: str) -> None:
    assert clean_response(raw, shown) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "{" * 50_000,
        "Here is" + " x" * 50_000,
        "the " * 25_000 + "image shows",
        '"' * 30_000,
        "Sure, " * 20_000,
        "(" + "a." * 40_000,
        ("1. {A}\n" * 5_000),
    ],
)
def test_cleanup_and_rules_stay_linear_on_hostile_replies(raw: str) -> None:
    started = time.perf_counter()
    RuleChain().judge(gen(GC, raw))
    assert time.perf_counter() - started < 2.0


# --------------------------------------------------------------------------------------------
# Chatter around a good rewrite survives cleanup and passes; answers are rejected


@pytest.mark.parametrize(
    "raw",
    [
        'Sure! Here is the rewritten instruction: "Describe what is in {A}."',
        "**Rewritten instruction:** Identify what {A} shows.",
        "Here's a rephrased version of the instruction:\n\n1. What can be seen in {A}?\n2. Describe {A}.",
        '"Tell me what {A} contains." This keeps the original meaning.',
        "Sure, I can help with that!\n\nWhat does the region {A} show?",
        "Describe {{A}} briefly.",  # a doubled mask token is taken as the token
        "Describe { A } briefly.",
    ],
)
def test_chatter_wrapped_rewrite_is_kept(raw: str) -> None:
    verdict = RuleChain().judge(gen(GC, raw))
    assert verdict.reasons == []
    assert verdict.template is not None and placeholders_of(verdict.template) == [GC_REGION]


# --------------------------------------------------------------------------------------------
# Rule by rule: must fail, must pass


def test_failed_request() -> None:
    assert reasons(None) == ["failed_request"]
    row = gen(raw="Describe {A}.")
    row["error"] = "HTTP 500 after 5 retries"
    verdict = RuleChain().judge(row)
    assert verdict.reasons == ["failed_request"]
    assert verdict.notes["failed_request"] == "HTTP 500 after 5 retries"
    assert reasons("Describe what is in {A}.") == []


def test_duplicate_request_only_after_a_reply() -> None:
    chain = RuleChain()
    assert chain.judge(gen(raw=None, request_hash="h1")).reasons == ["failed_request"]
    assert chain.judge(gen(raw="Describe what is in {A}.", request_hash="h1")).reasons == []
    assert chain.judge(gen(raw="Identify {A}.", request_hash="h1")).reasons == ["duplicate_request"]
    assert chain.judge(gen(raw="Identify {A}.", request_hash="h2")).reasons == []


@pytest.mark.parametrize("raw", ["", "   \n ", "Sure!", "```\n```", "Rewritten instruction:"])
def test_empty(raw: str) -> None:
    assert reasons(raw) == ["empty"]


def test_length_ratio_is_judged_against_the_parent() -> None:
    # GC has 5 words, so a rewrite needs 1 <= words < 10
    assert reasons("Describe {A}.") == []
    assert reasons("Please describe everything that can be seen in {A} now.") == []  # 9 words
    assert "length_ratio" in reasons("Please describe everything that can be seen inside {A} right now.")
    assert "length_ratio" in reasons("{A}?")  # no words at all
    long_parent = "Look closely at the region {A} of the image and then describe what it contains."
    iteration2 = gen(
        long_parent.replace("{A}", GC_REGION),
        "Look closely at region {A} of the image, then describe everything it contains in detail.",
        root=GC,
    )
    assert RuleChain().judge(iteration2).reasons == []  # 14 words: too long for the root, not the parent


def test_length_ratio_and_min_words_come_from_the_config() -> None:
    strict = RuleChain(FilterConfig(max_length_ratio=1.0, min_words=3))
    assert reasons("Describe the whole region {A} now please.", chain=strict) == ["length_ratio"]  # 6 >= 5
    assert reasons("Describe region {A} please.", chain=strict) == []
    assert reasons("Describe {A}.", chain=strict) == ["length_ratio"]  # 1 word < 3


def test_placeholders_must_equal_the_roots_as_a_multiset() -> None:
    two = 'Is "{text}" in {region|join("||||")}?{options_token} {options|join("||||")}'
    assert reasons("Does {B} contain \u201c{A}\u201d?{C} {D}", parent=two, task="object_region_match") == []
    assert reasons("Does {B} contain {A}? {C} {D}", parent=two, task="object_region_match") == []
    assert reasons("Does {B} contain {A}? {D}", parent=two, task="object_region_match") == ["placeholders"]
    assert reasons("Does {B} hold {A} or {A}?{C} {D}", parent=two, task="object_region_match") == [
        "placeholders"
    ]
    verdict = RuleChain().judge(gen(two, "Does {B} contain {A}? {D}", task="object_region_match"))
    assert verdict.notes["placeholders"] == "missing {options_token}"


def test_placeholders_without_protection_are_compared_canonically() -> None:
    row = gen(GC, 'Describe what is in {region|join( "||||" )}.', protect=False)
    verdict = RuleChain().judge(row)
    assert verdict.reasons == []
    assert verdict.template == f"Describe what is in {GC_REGION}."
    assert RuleChain().judge(gen(GC, "Describe what is in {region}.", protect=False)).reasons == [
        "placeholders"
    ]


def test_mask_left() -> None:
    assert reasons("Describe what is in {B}.") == ["mask_left", "placeholders"]
    assert reasons("Describe {A} and {Z}.") == ["mask_left"]
    # letters the parent shows literally are not masks: {A} and {B} stay literal text
    parent = "Answer {{A}} or {{B}}: {question}"
    verdict = RuleChain().judge(gen(parent, "Reply {A} or {B} to this: {C}", task="VQA"))
    assert verdict.reasons == []
    assert verdict.template == "Reply {{A}} or {{B}} to this: {question}"


def test_bad_braces() -> None:
    assert reasons("Describe the {region} {A}.") == ["bad_braces"]
    assert reasons("Describe {A} }.") == ["bad_braces"]
    assert "bad_braces" in RuleChain().judge(gen(GC, 'Describe {region|join("||||")', protect=False)).reasons
    assert "bad_braces" in RuleChain().judge(gen(GC, "Describe {1region}.", protect=False)).reasons
    assert (
        RuleChain().judge(gen(GC, f"Describe {GC_REGION}, {{{{literally}}}}.", protect=False)).reasons == []
    )


def test_identical_is_normalized_and_scoped_to_the_root() -> None:
    chain = RuleChain(
        originals=[
            Instruction(
                task="GC",
                instruction_id="GC/2",
                template="Describe {region}.",
                root_id="GC/2",
                origin="original",
            )
        ]
    )
    assert reasons("what is the content of {A}", chain=chain) == ["identical"]  # the parent
    assert reasons("What  is the CONTENT of {A} ?!", chain=chain) == ["identical"]
    assert reasons("Describe {A}", parent="Describe {region}.", task="GC", chain=chain) == ["identical"]
    assert reasons("Describe what is in {A}.", chain=chain) == []
    assert reasons("describe what is in {A}", chain=chain) == ["identical"]  # an earlier keep
    assert reasons("Describe what is in {A}.", chain=chain, root_id="GC/3") == []  # another root
    iteration2 = gen(f"Tell me what is in {GC_REGION}.", "What is the content of {A}?", root=GC)
    assert chain.judge(iteration2).notes["identical"] == "same as the root"


def test_originals_may_be_plain_pool_rows() -> None:
    chain = RuleChain(originals=[{"task": "GC", "template": "Describe {region}.", "instruction_id": "GC/2"}])
    assert reasons("Describe {A}!", parent="Tell me about {region}.", chain=chain) == ["identical"]
    assert reasons("Describe {A}!", parent="Tell me about {region}.", chain=chain, task="VG") == []


def test_identical_ignores_rejected_candidates() -> None:
    chain = RuleChain()
    assert reasons("Describe what is in {A}. Rephrased.", chain=chain) == ["banned_pattern"]
    assert reasons("Describe what is in {A}. Rephrased.", chain=chain) == ["banned_pattern"]
    assert reasons("Describe what is in {A}.", chain=chain) == []


def test_banned_patterns() -> None:
    assert reasons("Rewrite the following instruction: what is in {A}?") == ["banned_pattern"]
    assert reasons("Describe {A} without touching the placeholder.") == ["banned_pattern"]
    custom = RuleChain(FilterConfig(banned_patterns=[r"\bimage\b"]))
    assert reasons("Describe {A} of the IMAGE.", chain=custom) == ["banned_pattern"]
    assert reasons("Describe {A} of the picture.", chain=custom) == []
    verdict = custom.judge(gen(GC, "Describe {A} of the image."))
    assert verdict.notes["banned_pattern"] == r"\bimage\b"
    assert reasons("Rephrase: what is in {A}?", chain=RuleChain(FilterConfig(banned_patterns=[]))) == []


def test_a_bad_banned_pattern_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("filters:\n  banned_patterns:\n    - ok\n    - '(unclosed'\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}:2: filters.banned_patterns: item 1 is not a valid regular expression "
        "(missing ), unterminated subpattern at position 0): '(unclosed'"
    )


REGION_TASK = "The goal of this task is to generate a description for the part of the image given by {A}."
QUESTION_TASK = "Please answer the following question about the sport in the image. {A}{B} {C}"
PARENT_OF = {"region": REGION_TASK, "gc": MASKED_GC, "caption": CAPTION, "question": QUESTION_TASK}

# Failures a small LLM really produces: it answers, describes the image, or talks about itself.
ANSWERS = [
    ("gc", "The image shows a man riding a skateboard down {A}."),
    ("gc", "This picture depicts a dog in {A}."),
    ("gc", "Yes, there is a dog in {A}."),
    ("gc", "No. {A} is empty."),
    ("gc", "In the image, a woman is holding an umbrella in {A}."),
    ("gc", "There are two cats sleeping on a couch in {A}."),
    ("gc", "It is a red car parked in {A}."),
    ("gc", "I'm sorry, but I cannot see {A}."),
    ("gc", "As an AI language model, I cannot view images such as {A}."),
    ("gc", "I think the object in {A} is a cat."),
    ("gc", "{A} contains a red fire hydrant."),
    ("gc", "The content of {A} is a red car."),
    ("gc", "What is in {A}? A red fire hydrant."),
    ("gc", "The answer is a red car in {A}."),
    ("gc", "A dog is in {A}. Is there anything else you would like to know?"),
    ("region", "{A} shows a man in a blue shirt holding a tennis racket."),
    ("caption", "A group of people standing around a table with food."),
    ("caption", "Two dogs are playing with a frisbee in a park."),
    ("caption", "Sure! Here's a description of the image: a cat on a sofa."),
    ("question", "There are two people playing tennis on a clay court. {A}{B} {C}"),
    ("question", "The sport is tennis. {A}{B} {C}"),
    ("question", "I would say tennis. {A}{B} {C}"),
]
# Rewrites that must pass: imperative, question, "In this task, you ...", completion prompts.
INSTRUCTIONS = [
    ("gc", "Describe what is in {A}."),
    ("gc", "Briefly describe the content of {A}."),
    ("gc", "Can you tell me what {A} contains?"),
    ("gc", "In this task, you describe {A}."),
    ("gc", "The content of {A} is"),
    ("gc", "In the image, locate {A} and describe it."),
    ("gc", "Region {A}: what does it show?"),
    ("gc", "I want you to describe {A}."),
    ("region", "Your task is to write a description of the image part specified by {A}."),
    ("region", "There is a region {A} in the image. Describe what that part contains."),
    ("region", "Given {A}, generate a description of that part of the image."),
    ("caption", "Write a short caption for the picture."),
    ("caption", "Look at the picture and summarize it in a sentence."),
    ("caption", "Please provide a brief description of the image."),
    ("caption", "What does the image show?"),
    ("question", "Based on the sport shown in the image, answer the question. {A}{B} {C}"),
    ("question", "Look at the sport in the picture and respond: {A}{B} {C}"),
]


@pytest.mark.parametrize(("parent", "candidate"), ANSWERS)
def test_answer_like_must_fail(parent: str, candidate: str) -> None:
    row = gen(_unmask(PARENT_OF[parent]), candidate, task="sports")
    assert "answer_like" in RuleChain().judge(row).reasons


@pytest.mark.parametrize(("parent", "candidate"), INSTRUCTIONS)
def test_answer_like_must_pass(parent: str, candidate: str) -> None:
    row = gen(_unmask(PARENT_OF[parent]), candidate, task="sports")
    assert "answer_like" not in RuleChain().judge(row).reasons


def test_answer_like_can_be_turned_off() -> None:
    chain = RuleChain(FilterConfig(reject_answer_like=False))
    assert reasons("There are two cats sleeping on a couch in {A}.", chain=chain) == []


def test_an_opener_the_parent_uses_itself_is_allowed() -> None:
    parent = "There are some sports taking place in the image. {question}"
    assert reasons("There is a sport being played in the picture. {A}", parent=parent, task="x") == []
    assert reasons("There is a sport being played in {A}.", task="x") == ["answer_like"]


def _unmask(masked: str) -> str:
    fields = {"A": "{region}", "B": "{options_token}", "C": '{options|join("||||")}'}
    if "{C}" in masked:
        fields["A"] = "{question}"
    for letter, placeholder in fields.items():
        masked = masked.replace("{" + letter + "}", placeholder)
    return masked


def test_render_fails_on_a_sample_instance() -> None:
    chain = RuleChain(samples={"GC": GC_INSTANCE})
    assert chain.judge(gen(GC, "Describe what is in {A}.")).reasons == []
    verdict = chain.judge(gen(GC, "Describe {region[5]}.", protect=False))
    assert verdict.reasons == ["placeholders", "render_fails"]
    assert verdict.notes["render_fails"] == "{region[5]}: index 5 out of range for 2 items"
    assert chain.judge(gen(GC, "Describe {meta_data.box}.", protect=False)).reasons == [
        "placeholders",
        "render_fails",
    ]


def test_render_check_is_skipped_without_an_instance() -> None:
    no_task = RuleChain(samples={"VQA": {"question": "q"}})
    assert no_task.judge(gen(GC, "Describe {meta_data.box}.", protect=False)).reasons == ["placeholders"]
    assert no_task.summary.render_skipped == 1
    # an instance on which even the root does not render is no sample
    unusable = RuleChain(samples={"GC": [{"task_name": "GC"}]})
    assert unusable.judge(gen(GC, "Describe {meta_data.box}.", protect=False)).reasons == ["placeholders"]
    off = RuleChain(FilterConfig(check_render=False), samples={"GC": GC_INSTANCE})
    assert off.judge(gen(GC, "Describe {region[5]}.", protect=False)).reasons == ["placeholders"]


def test_every_applicable_rule_is_reported_in_funnel_order() -> None:
    verdict = RuleChain(samples={"GC": GC_INSTANCE}).judge(
        gen(GC, "Yes, the image shows {Q} and {region[7]} which I rephrased for you in many many words.")
    )
    assert verdict.reasons == [
        "bad_braces",
        "mask_left",
        "placeholders",
        "length_ratio",
        "banned_pattern",
        "answer_like",
    ]
    assert verdict.reasons == sorted(verdict.reasons, key=REASONS.index)


# --------------------------------------------------------------------------------------------
# The chain: state, determinism, ids, streaming


def test_kept_count_and_the_pool_row_of_a_verdict() -> None:
    chain = RuleChain()
    verdict = chain.judge(gen(raw="Describe what is in {A}.", request_hash="abc"))
    assert (verdict.kept, verdict.reasons) == (True, [])
    row = verdict.instruction
    assert row is not None
    assert row == {
        "task": "GC",
        "variant": None,
        "instruction_id": instruction_id({"root_id": "GC/1", "request_hash": "abc"}),
        "template_id": row["instruction_id"],
        "template": f"Describe what is in {GC_REGION}.",
        "placeholders": [GC_REGION],
        "origin": "generated",
        "parent_id": "GC/1",
        "root_id": "GC/1",
        "meta_prompt_id": "direct",
        "temperature": 0.6,
        "iteration": 1,
        "model": "test-model",
        "request_hash": "abc",
    }
    rejected = chain.judge(gen(raw="No, {A} is empty."))
    assert (rejected.kept, rejected.reasons, rejected.instruction) == (False, ["answer_like"], None)
    assert chain.kept_count("GC/1") == 1
    chain.judge(gen(raw="Identify what {A} shows."))
    chain.judge(gen(raw="identify what {A} shows!"))  # identical to the last keep
    assert chain.kept_count("GC/1") == 2
    assert chain.kept_count("GC/2") == 0
    assert Instruction.model_validate(row).origin == "generated"


def test_instruction_id_is_stable_and_independent_of_other_rows() -> None:
    row = gen(raw="Describe {A}.", request_hash="sha-of-the-request")
    first = instruction_id(row)
    assert first.startswith("GC/1~g") and len(first) == len("GC/1~g") + 10
    assert instruction_id({**row, "raw": "something else"}) == first  # the request decides, not the reply
    assert instruction_id({**row, "request_hash": "other"}) != first
    without = {**row, "request_hash": None}
    assert instruction_id(without) == instruction_id(dict(without))
    assert instruction_id({**without, "sample_index": 1}) != instruction_id(without)

    rows = [gen(raw=f"Describe {{A}} in {n} words.", request_hash=f"h{n}") for n in range(6)]

    def kept_ids(selection: list[dict[str, Any]]) -> dict[str, str]:
        chain = RuleChain()
        return {
            j.row["raw"]: j.verdict.instruction["instruction_id"]
            for j in filter_generations(enumerate(selection), chain)
            if j.verdict.instruction
        }

    everything = kept_ids(rows)
    assert len(set(everything.values())) == 6
    some = kept_ids(rows[3:] + rows[:1])
    assert some == {raw: everything[raw] for raw in some}


def test_same_rows_same_verdicts() -> None:
    rng = random.Random(7)
    replies = [r for _p, r in ANSWERS + INSTRUCTIONS] * 2
    rng.shuffle(replies)
    rows = [
        gen(QUESTION_TASK.replace("{A}{B} {C}", '{question}{options_token} {options|join("||||")}'), r)
        for r in replies
    ]

    def run() -> list[tuple[list[str], str | None]]:
        return [
            (j.verdict.reasons, j.verdict.template) for j in filter_generations(enumerate(rows), RuleChain())
        ]

    assert run() == run()


def test_a_bad_row_names_its_line() -> None:
    rows = [(1, gen()), (2, {"task": "GC", "raw": "x"})]
    with pytest.raises(InputError) as info:
        list(filter_generations(rows, RuleChain(), "gen.jsonl"))
    assert str(info.value) == (
        "gen.jsonl:2: template_id: missing (needs template_id, task, root_id, parent_template, root_template)"
    )
    with pytest.raises(InputError, match=r"^gen.jsonl:5: root_template: unmatched '\{' at character 1"):
        list(filter_generations([(5, gen(root="{oops"))], RuleChain(), "gen.jsonl"))


FRAGMENTS = [
    "Sure! Here is the rewritten instruction:",
    "Describe",
    "what is in",
    "{A}",
    "{B}",
    "{",
    "}",
    "the image shows",
    "Yes,",
    "?",
    ".",
    "\n",
    '"',
    "1.",
    "Note: I kept the token.",
    "rephrased",
    "{region}",
    "please",
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=12), st.booleans())
def test_invariants_rejected_have_reasons_kept_render(parts: list[str], protect: bool) -> None:
    chain = RuleChain(samples={"GC": GC_INSTANCE})
    verdict = chain.judge(gen(GC, " ".join(parts), protect=protect))
    assert verdict.reasons == sorted(set(verdict.reasons), key=REASONS.index)
    if verdict.kept:
        assert verdict.template is not None and verdict.instruction is not None
        assert placeholders_of(verdict.template) == [GC_REGION]
        fields = render_fields("GC", GC_INSTANCE, random.Random(0))
        assert "<bin_1>||||<bin_2>" in CompiledTemplate(verdict.template, CONSTANTS).render(fields)
    else:
        assert verdict.reasons and verdict.instruction is None
    assert chain.summary.generated == 1 and chain.summary.kept == int(verdict.kept)


def test_build_candidate_restores_or_parses() -> None:
    masked = mask_placeholders(GC)
    assert build_candidate('"Describe {A}."', GC, masked.text, masked.mapping) == (
        "Describe {A}.",
        f"Describe {GC_REGION}.",
        [],
    )
    assert build_candidate(f"Describe {GC_REGION}.", GC, None, None) == (
        f"Describe {GC_REGION}.",
        f"Describe {GC_REGION}.",
        [],
    )
    assert build_candidate("Describe {region", GC, None, None) == ("Describe {region", None, ["bad_braces"])


# --------------------------------------------------------------------------------------------
# Real MultiInstruct templates: sibling templates as rewrites pass; rewrites render on real data


def test_sibling_originals_pass_as_rewrites_and_render(
    shared: Path, shared_train: list[dict[str, Any]]
) -> None:
    templates = import_templates(shared / "templates.json")
    samples = sample_instances(shared / "train.jsonl", per_task=3)
    assert samples["GC"][0]["task_name"] == "GC"
    chain = RuleChain(samples=samples)
    checked = 0
    refused: set[tuple[str, tuple[str, ...]]] = set()
    by_task: dict[str, list[Any]] = {}
    for t in templates:
        by_task.setdefault(f"{t.task}|{t.variant}", []).append(t)
    for group in by_task.values():
        for parent in group:
            masked = mask_placeholders(parent.template)
            letter_of = {source: letter for letter, source in masked.mapping.items()}
            if not any(c.isalpha() for c in literal_text(parent.template)):
                continue  # stage 2 does not rephrase pure-placeholder templates
            for sibling in group:
                if not any(c.isalpha() for c in literal_text(sibling.template)):
                    continue
                if sibling is parent or sorted(placeholders_of(sibling.template)) != sorted(
                    placeholders_of(parent.template)
                ):
                    continue
                rewrite = sibling.template
                for source, letter in letter_of.items():
                    rewrite = rewrite.replace(source, "{" + letter + "}")
                if "{{" in rewrite or "}}" in rewrite:
                    continue
                reply = f'Sure! Here is the rewritten instruction: "{rewrite.strip()}"'
                verdict = chain.judge(
                    gen(parent.template, reply, task=parent.task, root_id=parent.template_id)
                )
                # siblings may repeat each other or be much longer than their parent
                if set(verdict.reasons) - {"identical", "length_ratio"}:
                    refused.add((sibling.template_id, tuple(verdict.reasons)))
                checked += 1
    # the one original that opens like a description ("There are some sports ...") passes only
    # as a rewrite of itself: a deliberate, conservative trade against description-answers
    assert {sibling for sibling, _why in refused} == {"VQA_sport_recognition/3"}
    assert {why for _sibling, why in refused} == {("answer_like",)}
    assert checked > 300
    assert chain.summary.render_skipped < chain.summary.generated


# --------------------------------------------------------------------------------------------
# instraug filter


ORIGINALS = [
    {
        "task": "GC",
        "variant": None,
        "instruction_id": "GC/1",
        "template_id": "GC/1",
        "template": GC,
        "placeholders": [GC_REGION],
        "origin": "original",
        "parent_id": None,
        "root_id": "GC/1",
    },
    {
        "task": "image_caption",
        "variant": None,
        "instruction_id": "image_caption/2",
        "template_id": "image_caption/2",
        "template": CAPTION,
        "placeholders": [],
        "origin": "original",
        "parent_id": None,
        "root_id": "image_caption/2",
    },
]


def _generations() -> list[dict[str, Any]]:
    caption = {"task": "image_caption", "root_id": "image_caption/2"}
    return [
        gen(GC, 'Sure! "Describe what is in {A}."', request_hash="r1"),
        gen(GC, "The image shows a dog in {A}.", request_hash="r2"),
        gen(CAPTION, "Write a short caption for the picture.", request_hash="r3", **caption),
        gen(GC, None, request_hash="r4"),
        gen(CAPTION, "A cat sleeping on a sofa.", request_hash="r5", **caption),
        gen(GC, "Identify what {A} contains.", request_hash="r6"),
    ]


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "templates.jsonl", ORIGINALS)
    write_jsonl(tmp_path / "gen.jsonl", _generations())
    write_jsonl(tmp_path / "train.jsonl", [GC_INSTANCE, {"task_name": "image_caption", "target_txt": "x"}])
    return tmp_path


def test_cli_writes_originals_then_kept_rewrites(cli: Cli, work: Path) -> None:
    result = cli(
        "filter",
        "gen.jsonl",
        "-t",
        "templates.jsonl",
        "-i",
        "train.jsonl",
        "-o",
        "pool.jsonl",
        "--rejected",
        "rejected.jsonl",
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    pool = read_jsonl(work / "pool.jsonl")
    assert [row["instruction_id"] for row in pool[:2]] == ["GC/1", "image_caption/2"]
    assert [row["template"] for row in pool[2:]] == [
        f"Describe what is in {GC_REGION}.",
        "Write a short caption for the picture.",
        f"Identify what {GC_REGION} contains.",
    ]
    assert all(
        row["origin"] == "generated" and row["instruction_id"].startswith(row["root_id"] + "~g")
        for row in pool[2:]
    )
    rejected = read_jsonl(work / "rejected.jsonl")
    assert [(row["request_hash"], row["reasons"]) for row in rejected] == [
        ("r2", ["answer_like"]),
        ("r4", ["failed_request"]),
        ("r5", ["answer_like"]),
    ]
    assert rejected[0]["cleaned"] == "The image shows a dog in {A}."
    assert rejected[0]["notes"] == {"answer_like": "opens like a description (image_shows)"}
    assert "filter: 2 originals + 3 kept rewrites -> pool.jsonl" in result.stderr
    assert "6 generated" in result.stderr and "3 kept (50.0%)" in result.stderr
    assert re.search(r"\n +answer_like +-2 +-> 3 +\(flagged 2\)\n", result.stderr)
    # the pool is usable downstream
    from instraug.pool import InstructionPool

    assert len(InstructionPool.load(work / "pool.jsonl").tasks["GC"][None].generated) == 2


def test_cli_reads_stdin_and_writes_stdout(cli: Cli, work: Path) -> None:
    text = (work / "gen.jsonl").read_text(encoding="utf-8")
    result = cli("filter", "-", "-t", "templates.jsonl", "-q", input=text)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert len([line for line in result.stdout.splitlines() if line]) == 5


def test_cli_notes_a_skipped_render_check(cli: Cli, work: Path) -> None:
    result = cli("filter", "gen.jsonl", "-t", "templates.jsonl", "-o", "pool.jsonl")
    assert result.exit_code == 0
    assert "render check skipped: no --instances given" in result.stderr


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (
            lambda w: (w / "gen.jsonl").write_text('{"task": "GC"}\n{"raw": }\n'),
            (),
            "Error: gen.jsonl:1: template_id: missing (needs template_id, task, root_id, parent_template, "
            "root_template)",
        ),
        (
            lambda w: (w / "gen.jsonl").write_text('\n{"raw": }\n'),
            (),
            "Error: gen.jsonl:2: malformed JSON: unexpected character, expected a JSON value at column 9",
        ),
        (
            lambda w: (w / "templates.jsonl").write_text('{"task": "GC"}\n'),
            (),
            "Error: templates.jsonl:1: instruction_id: missing (a pool row needs task, instruction_id, "
            "template, origin, root_id)",
        ),
        (
            lambda w: (w / "c.yaml").write_text("filters:\n  max_length_ratio: 0\n"),
            ("-c", "c.yaml"),
            "Error: c.yaml:2: filters.max_length_ratio: must be > 0.0",
        ),
        (
            lambda w: None,
            ("-o", "-", "--rejected", "-"),
            "Error: --output and --rejected cannot both be stdout (-)",
        ),
        (
            lambda w: None,
            ("-t", "missing.jsonl"),
            "Error: missing.jsonl: cannot read: No such file or directory",
        ),
    ],
)
def test_cli_errors(
    cli: Cli, work: Path, setup: Callable[[Path], Any], args: tuple[str, ...], message: str
) -> None:
    setup(work)
    base = ["filter", "gen.jsonl", "-t", "templates.jsonl", "-o", "pool.jsonl", "--rejected", "rej.jsonl"]
    for flag, value in zip(args[::2], args[1::2], strict=True):
        if flag in base:
            base[base.index(flag) + 1] = value
        else:
            base += [flag, value]
    result = cli(*base)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == message + "\n"
    assert not (work / "pool.jsonl").exists() and not (work / "rej.jsonl").exists()
    assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]


def test_filter_has_help(cli: Cli) -> None:
    result = cli("filter", "--help")
    assert result.exit_code == 0
    assert "--rejected" in result.stdout and "--instances" in result.stdout


def test_an_unprotected_reply_that_joins_a_constant_fails_to_render_instead_of_crashing() -> None:
    """Without masking the reply is a template of its own; one the grammar reads but no instance can
    render (a constant joined) is a rejection, never an exception."""
    parent = 'Pick one.{options_token} {options|join("||||")}'
    raw = 'Pick one of these.{options_token} {options_token|join("||||")}'
    chain = RuleChain(samples={"VQA": [{"task_name": "VQA", "options": ["a", "b"]}]})
    verdict = chain.judge(gen(parent, raw, task="VQA", root_id="VQA/0", protect=False))
    assert "render_fails" in verdict.reasons
    assert "options_token is a constant" in verdict.notes["render_fails"]

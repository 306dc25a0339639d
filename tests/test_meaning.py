"""The rules on what a rewrite says: control tokens, other languages, copied examples, meaning flips,
lost task words. The must-fail cases are replies of the embedded model that passed the form rules."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest
from helpers import read_jsonl, write_jsonl

from instraug.config import FilterConfig, MeaningConfig
from instraug.funnel import REASONS
from instraug.placeholders import mask_placeholders
from instraug.stages.s3_meaning import (
    content_lost,
    content_stems,
    control_token,
    example_copy,
    example_ngrams,
    foreign_text,
    meaning_flip,
    task_key_stems,
)
from instraug.stages.s3_rules import RuleChain

OVERLAP = [  # the expert-written templates of select_overlap_least_region (upstream)
    "Given the region {given_region}, decide which region in the options shares the least common area "
    'with given region.{options_token} {options|join("||||")}',
    'Which option has the least overlap with {given_region}?{options_token} {options|join("||||")}',
    'Select the region that has the least overlap with {given_region}.{options_token} {options|join("||||")}',
    "Region: {given_region}. Pick the region from the options that overlaps the least with it."
    '{options_token} {options|join("||||")}',
]


def display(template: str) -> str:
    """A template as the rules read it: constants shown, other placeholders as {P}."""
    return re.sub(r"\{[^{}]*\}", "{P}", template.replace("{options_token}", "\n\n[Options]:"))


EXAMPLE_TURNS = ["Write the recipe for the dish in the photo using at most three sentences."]


def chain(**meaning: Any) -> RuleChain:
    meaning.setdefault("max_new_words", 0)  # as with the embedded model
    originals = [
        {"task": "select_overlap_least_region", "template": t, "instruction_id": f"o/{i}"}
        for i, t in enumerate(OVERLAP)
    ]
    return RuleChain(
        FilterConfig(meaning=MeaningConfig(**meaning)), originals=originals, examples=EXAMPLE_TURNS
    )


def judge(reply: str, root: str = OVERLAP[1], **meaning: Any) -> list[str]:
    masked = mask_placeholders(root)
    row = {
        "template_id": "o/1",
        "task": "select_overlap_least_region",
        "root_id": "o/1",
        "parent_template": root,
        "root_template": root,
        "masked": masked.text,
        "mapping": masked.mapping,
        "raw": reply,
    }
    return chain(**meaning).judge(row).reasons


def test_the_new_reasons_sit_between_answer_like_and_render_fails() -> None:
    start = REASONS.index("answer_like")
    assert REASONS[start : start + 9] == (
        "answer_like",
        "control_token",
        "foreign_text",
        "example_copy",
        "meaning_flip",
        "answer_changed",
        "new_content",
        "content_lost",
        "render_fails",
    )


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("Which option has the highest overlap with {A}?{B} {C}", "meaning_flip"),
        ("Which option has the least overlap with {A}?<start_of_image>{B} {C}", "control_token"),
        ("Which option has the least overlap with {A}?{B} {C} 衣装", "foreign_text"),
        ("Write the recipe for the option that overlaps least with {A}?{B} {C}", "example_copy"),
        ("Answer this question. The part is specified by {A}.{B} {C}", "content_lost"),
        ("Which option has the least overlap with {A} on the chessboard?{B} {C}", "new_content"),
        ("Question, which option has the least overlap with {A}?{B} {C}", "answer_like"),
        ("I think the option with the least overlap with {A} wins.{B} {C}", "answer_like"),
    ],
)
def test_what_slipped_through_the_form_rules_is_caught(reply: str, reason: str) -> None:
    assert reason in judge(reply)


@pytest.mark.parametrize(
    "reply",
    [
        "Which choice overlaps the least with {A}?{B} {C}",
        "Pick the option whose area overlaps {A} the least.{B} {C}",
        "Of the options, which one shares the smallest overlap with {A}?{B} {C}",
    ],
)
def test_faithful_rewrites_pass(reply: str) -> None:
    assert judge(reply) == []


def test_each_rule_can_be_turned_off() -> None:
    reply = "Which option has the highest overlap with {A}?<start_of_image>{B} {C} 衣装"
    assert {"meaning_flip", "control_token", "foreign_text"} <= set(judge(reply))
    off = {"meaning_flip": False, "control_token": False, "foreign_text": False}
    assert not {"meaning_flip", "control_token", "foreign_text"} & set(judge(reply, **off))


def test_control_tokens_the_original_shows_are_not_flagged() -> None:
    assert control_token("Read <s> carefully.", "Read <s> carefully.") is None
    assert control_token("Answer it.<|im_end|>", "Answer it.") == "control token <|im_end|>"
    assert control_token("[INST] Answer it.", "Answer it.") == "control token [INST]"


def test_a_script_the_original_uses_is_not_foreign() -> None:
    assert foreign_text("Translate 猫 into English.", "Translate 猫 into English please.") is None
    assert foreign_text("Répondez à la question.", "Answer the question.") is None  # Latin letters
    assert (
        foreign_text("Ответьте на вопрос.", "Answer the question.") == "letters of another script (CYRILLIC)"
    )


def test_words_that_are_not_english_need_a_word_list() -> None:
    english = {"which", "option", "overlaps", "least", "with", "the", "region"}
    reply, root = "Which option overlaps least with the region mendatang", "Which option overlaps least?"
    assert foreign_text(reply, root) is None  # no word list: scripts only
    assert foreign_text(reply, root, english) == "not English: mendatang"
    assert foreign_text("Which option overlaps least?", root, english) is None


@pytest.mark.skipif(importlib.util.find_spec("wordfreq") is None, reason="wordfreq (the language extra)")
def test_the_english_word_list_catches_a_trailing_foreign_word() -> None:
    reply = "Which choice overlaps the least with {A}?{B} {C}"
    assert judge(reply, english_words=True) == []
    assert "foreign_text" in judge(reply.replace("?", "? mendatang"), english_words=True)


def test_a_copied_run_must_be_four_words_the_original_does_not_share() -> None:
    grams = example_ngrams(EXAMPLE_TURNS)
    assert (
        example_copy("Write the recipe for it.", "Describe it.", grams)
        == "copies an example: write the recipe for"
    )
    assert example_copy("Write the recipe.", "Describe it.", grams) is None  # three words only
    root = "Write the recipe for the dish."
    assert example_copy("Write the recipe for the dish, please.", root, grams) is None  # the original's own


def test_flips_need_the_opposite_without_the_original_word() -> None:
    assert meaning_flip("Find the next step.", "Find the previous step.") == "previous became next"
    assert meaning_flip("Is it the same or different?", "Is it the same?") is None  # both said
    assert meaning_flip("Answer the question.", "Find the previous step.") is None  # nothing opposite
    plain, negated = "Select the content of {P}.", "Do not select the content of {P}."
    assert meaning_flip(negated, plain, negation_known=True) == "adds a negation (not)"
    assert meaning_flip(negated, plain) is None  # a template of the task may negate: not judged


def test_key_words_are_what_most_templates_of_a_task_share() -> None:
    keys = task_key_stems([display(t) for t in OVERLAP])
    assert keys == {"overlap", "least", "option", "region", "select"}  # pick, select: one word
    assert "decid" not in keys  # one template's wording
    assert (
        task_key_stems([display(t) for t in OVERLAP[:2]]) == set()
    )  # too few templates to tell task from wording
    assert content_stems("Pick the picture's areas") == {"select", "image", "region"}  # synonyms meet


def test_content_lost_counts_the_roots_key_words() -> None:
    keys = task_key_stems([display(t) for t in OVERLAP])
    root = display(OVERLAP[1])
    assert content_lost("Which choice overlaps least with it?", root, keys, 0.5) is None
    note = content_lost("Answer this question about it.", root, keys, 0.5)
    assert note is not None and note.startswith("kept 0 of 3 key words of the task")
    assert content_lost("Answer this question about it.", root, keys, 0.0) is None


def test_instraug_filter_rejects_a_reply_copied_from_the_shipped_example_turns(
    cli: Any, tmp_path: Path
) -> None:
    from instraug.stages.s1_meta_prompts import example_texts

    copied = example_texts()[1]  # the rewrite of the first example turn, as the model saw it
    root = "Describe the region {region} of the image in a few words."
    masked = mask_placeholders(root)
    templates = [
        {"task": "GC", "template": root, "instruction_id": "GC/0", "origin": "original", "root_id": "GC/0"}
    ]
    row = {
        "template_id": "GC/0",
        "task": "GC",
        "root_id": "GC/0",
        "parent_template": root,
        "root_template": root,
        "masked": masked.text,
        "mapping": masked.mapping,
        "raw": copied.replace("{A}", "{A} ") if "{A}" in copied else copied + " {A}",
    }
    write_jsonl(tmp_path / "t.jsonl", templates)
    write_jsonl(tmp_path / "g.jsonl", [row])
    result = cli(
        "filter",
        tmp_path / "g.jsonl",
        "-t",
        tmp_path / "t.jsonl",
        "-o",
        tmp_path / "p.jsonl",
        "--rejected",
        tmp_path / "r.jsonl",
    )
    assert result.exit_code == 0, result.stderr
    [rejected] = read_jsonl(tmp_path / "r.jsonl")
    assert "example_copy" in rejected["reasons"]


def test_a_yes_no_question_for_a_task_that_asks_for_something_else() -> None:
    from instraug.stages.s3_meaning import answer_changed

    root = "Find every region of the image that contains {P}."
    assert answer_changed("Is there any region of the image that contains {P}?", root) is not None
    assert answer_changed("Which regions of the image contain {P}?", root) is None
    assert answer_changed("Does the image support {P}?", "Decide whether the image supports {P}.") is None
    # options say what an answer may be, whatever the question's form
    assert answer_changed("Is {P} true?", "Which option is right for {P}?", options=True) is None


def test_new_content_counts_words_no_template_of_the_task_uses() -> None:
    from instraug.stages.s3_meaning import new_content, task_vocabulary

    vocabulary = task_vocabulary([display(t) for t in OVERLAP])
    assert vocabulary is not None and task_vocabulary([display(t) for t in OVERLAP[:2]]) is None
    root = display(OVERLAP[1])
    assert new_content("Which choice shares the smallest area with {P}?", root, vocabulary, 0) is None
    note = new_content("Which option has the least overlap with {P} on the chessboard?", root, vocabulary, 0)
    assert note == "1 words the task's templates never use: chessboard"
    assert (
        new_content("Which option has the least overlap with {P} on the chessboard?", root, vocabulary, 1)
        is None
    )
    assert new_content("Use a compass here.", root, None, 0) is None  # the task's words are not known


def test_max_new_words_auto_follows_the_backend(tmp_path: Path) -> None:
    from instraug.config import MAX_NEW_WORDS_LOCAL, MAX_NEW_WORDS_SERVER, load_config

    local = tmp_path / "local.yaml"
    local.write_text("llm:\n  backend: local\n")
    server = tmp_path / "server.yaml"
    server.write_text("llm:\n  backend: openai\n  model: m\n")
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text("llm:\n  backend: local\nfilters:\n  meaning:\n    max_new_words: 2\n")
    assert load_config(local).filters.meaning.max_new_words == MAX_NEW_WORDS_LOCAL
    assert load_config(server).filters.meaning.max_new_words == MAX_NEW_WORDS_SERVER
    assert load_config(explicit).filters.meaning.max_new_words == 2

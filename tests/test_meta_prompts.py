"""Stage 1: reading the LLM's list of rewriting strategies, merging it with the curated ones."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from helpers import read_jsonl
from typer.testing import Result

from instraug.config import MetaPromptConfig, SamplingConfig
from instraug.llm.base import ChatRequest
from instraug.records import MetaPrompt
from instraug.stages.s1_meta_prompts import (
    Seeds,
    Strategy,
    build_meta_prompts,
    default_directory,
    load_seeds,
    packaged_directory,
    parse_list,
    user_prompt,
)

# --------------------------------------------------------------------------------------------
# parse_list

NUMBERED = "1. Use synonyms.\n2) Reorder the clauses.\n(3) Make it shorter.\n10: Use the passive voice."
BULLETED = "- Use synonyms\n* Reorder the clauses\n• Make it shorter\n+ Use the passive voice"
LETTERED = "a. Use synonyms\nb) Reorder the clauses"
PLAIN = "Use synonyms\n\n   Reorder the clauses  \n"
CHATTY = (
    "Sure! Here are some ways to rewrite a sentence:\n\n"
    '1. "Use synonyms."\n'
    "2. `Reorder the clauses.`\n"
    "\n"
    "3. “Make it shorter.”\n"
)


@pytest.mark.parametrize(
    ("text", "items"),
    [
        (NUMBERED, ["Use synonyms.", "Reorder the clauses.", "Make it shorter.", "Use the passive voice."]),
        (BULLETED, ["Use synonyms", "Reorder the clauses", "Make it shorter", "Use the passive voice"]),
        (LETTERED, ["Use synonyms", "Reorder the clauses"]),
        (PLAIN, ["Use synonyms", "Reorder the clauses"]),
        (CHATTY, ["Use synonyms.", "Reorder the clauses.", "Make it shorter."]),
        ("Certainly.\nOkay:\n", []),
        ("", []),
    ],
    ids=["numbered", "bulleted", "lettered", "plain", "chatty", "only-chatter", "empty"],
)
def test_parse_list(text: str, items: list[str]) -> None:
    assert parse_list(text) == items


def test_parse_list_drops_a_closing_remark() -> None:
    text = (
        "Here you go:\n1. Use synonyms.\n2. Reorder the clauses.\n\nI hope this helps! Ask for more anytime."
    )
    assert parse_list(text) == ["Use synonyms.", "Reorder the clauses."]


def test_parse_list_removes_markdown_bold() -> None:
    text = "1. **Synonyms:** replace words with synonyms.\n**2.** Reorder the clauses."
    assert parse_list(text) == ["Synonyms: replace words with synonyms.", "Reorder the clauses."]


# --------------------------------------------------------------------------------------------
# build_meta_prompts

SEEDS = Seeds(
    direct="Rephrase the instruction in different words.",
    bootstrap="Give {n} ways to rewrite a sentence, one per line.",
    keep_tokens="Keep {tokens} as they are.",
    suffix="Reply with the rewrite only.",
    strategies=[
        Strategy(id="synonyms", text="Replace some of the words with synonyms."),
        Strategy(id="reorder", text="Reorder the phrases of the instruction."),
        Strategy(id="formal", text="Use a more formal tone throughout."),
    ],
)
CURATED = [s.text for s in SEEDS.strategies]
BOOTSTRAP_REPLY = (
    "Sure! Here are four ways:\n1. Use simpler words.\n2. Start with the verb.\n3. Say it in fewer words.\n"
)
BOOTSTRAPPED = ["Use simpler words.", "Start with the verb.", "Say it in fewer words."]
SAMPLING = SamplingConfig(temperatures=[0.9, 0.3], top_p=0.95, max_tokens=300)


class FakeSession:
    """Answers every request with one scripted text; remembers each batch it was given."""

    def __init__(self, reply: str) -> None:
        self.reply = reply
        self.batches: list[list[ChatRequest]] = []

    def run(self, requests: Iterable[ChatRequest]) -> Iterator[SimpleNamespace]:
        batch = list(requests)
        self.batches.append(batch)
        for request in batch:
            yield SimpleNamespace(request=request, text=self.reply)


class NoSession:
    """An LLM that must not be asked."""

    def run(self, requests: Iterable[ChatRequest]) -> Iterator[Any]:
        raise AssertionError("the LLM was asked")


def settings(**changes: Any) -> MetaPromptConfig:
    return MetaPromptConfig(**{"count": 50, "bootstrap_count": 4, **changes})


def texts(prompts: list[MetaPrompt]) -> list[str]:
    return [p.text for p in prompts]


def test_bootstrap_asks_the_llm_exactly_once() -> None:
    session = FakeSession(BOOTSTRAP_REPLY)
    result = build_meta_prompts(SEEDS, settings(), SAMPLING, session)
    assert len(session.batches) == 1 and len(session.batches[0]) == 1
    request = session.batches[0][0]
    assert request.messages == (("user", "Give 4 ways to rewrite a sentence, one per line."),)
    assert request.temperature == 0.9 and request.top_p == 0.95
    assert result.requests == 1
    assert result.bootstrapped == len(BOOTSTRAPPED)


def test_merge_puts_direct_then_bootstrapped_then_curated() -> None:
    result = build_meta_prompts(SEEDS, settings(merge="merge"), SAMPLING, FakeSession(BOOTSTRAP_REPLY))
    assert texts(result.prompts) == [SEEDS.direct, *BOOTSTRAPPED, *CURATED]
    assert [p.origin for p in result.prompts] == ["direct"] + ["bootstrap"] * 3 + ["curated"] * 3
    assert [p.id for p in result.prompts][4:] == ["synonyms", "reorder", "formal"]
    assert len({p.id for p in result.prompts}) == len(result.prompts)


def test_replace_uses_bootstrapped_instead_of_curated() -> None:
    result = build_meta_prompts(SEEDS, settings(merge="replace"), SAMPLING, FakeSession(BOOTSTRAP_REPLY))
    assert texts(result.prompts) == [SEEDS.direct, *BOOTSTRAPPED]


def test_replace_falls_back_to_curated_when_nothing_was_bootstrapped() -> None:
    result = build_meta_prompts(SEEDS, settings(merge="replace"), SAMPLING, FakeSession("Sure!\nOk."))
    assert result.bootstrapped == 0
    assert texts(result.prompts) == [SEEDS.direct, *CURATED]


@pytest.mark.parametrize("llm", [None, NoSession()], ids=["no-session", "session-unused"])
def test_curated_needs_no_llm(llm: Any) -> None:
    result = build_meta_prompts(SEEDS, settings(merge="curated"), SAMPLING, llm)
    assert texts(result.prompts) == [SEEDS.direct, *CURATED]
    assert result.requests == 0 and result.bootstrapped == 0


def test_no_bootstrap_needs_no_llm() -> None:
    result = build_meta_prompts(SEEDS, settings(merge="merge", bootstrap=False), SAMPLING, None)
    assert texts(result.prompts) == [SEEDS.direct, *CURATED]


def test_duplicates_are_dropped_first_one_kept() -> None:
    reply = (
        "1. Use simpler words.\n"
        "2. use SIMPLER words!\n"  # the same once case and punctuation are ignored
        "3. Rephrase the instruction, in different words.\n"  # the direct prompt again
        "4. Replace some of the words with synonyms\n"  # a curated strategy again
        "5. Start with the verb.\n"
    )
    result = build_meta_prompts(SEEDS, settings(), SAMPLING, FakeSession(reply))
    assert texts(result.prompts) == [
        SEEDS.direct,
        "Use simpler words.",
        "Replace some of the words with synonyms",
        "Start with the verb.",
        "Reorder the phrases of the instruction.",
        "Use a more formal tone throughout.",
    ]
    keys = [" ".join(re.sub(r"[^\w\s]", " ", t.lower()).split()) for t in texts(result.prompts)]
    assert len(keys) == len(set(keys))


def test_bootstrapped_items_that_cannot_be_meta_prompts_are_dropped() -> None:
    long_item = " ".join(["word"] * 41)
    reply = f"1. Shorter.\n2. Keep the {{A}} token in place.\n3. {long_item}\n4. Start with the verb.\n"
    result = build_meta_prompts(SEEDS, settings(merge="replace"), SAMPLING, FakeSession(reply))
    assert texts(result.prompts) == [SEEDS.direct, "Start with the verb."]


@pytest.mark.parametrize("count", [1, 2, 4, 7, 8, 20])
def test_count_keeps_the_first_k_direct_first(count: int) -> None:
    full = build_meta_prompts(SEEDS, settings(), SAMPLING, FakeSession(BOOTSTRAP_REPLY)).prompts
    assert len(full) == 7
    result = build_meta_prompts(SEEDS, settings(count=count), SAMPLING, FakeSession(BOOTSTRAP_REPLY))
    assert result.prompts == full[:count]
    assert result.prompts[0].id == "direct"


# --------------------------------------------------------------------------------------------
# The meta-prompts command

CLI = Callable[..., Result]


def write_config(path: Path, **meta_prompts: Any) -> Path:
    config = {
        "llm": {"backend": "openai", "model": "none", "base_url": "http://127.0.0.1:9/v1"},  # unreachable
        "meta_prompts": {"merge": "curated", "count": 4, **meta_prompts},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_curated_needs_no_llm(cli: CLI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_llm(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("open_llm was called")

    monkeypatch.setattr("instraug.llm.open_llm", no_llm)
    out = tmp_path / "meta_prompts.jsonl"
    result = cli("meta-prompts", "-c", write_config(tmp_path / "cfg.yaml"), "-o", out)
    assert result.exit_code == 0, result.stderr
    seeds = load_seeds()
    assert [MetaPrompt.model_validate(row) for row in read_jsonl(out)] == [
        MetaPrompt(id="direct", text=seeds.direct, origin="direct"),
        *[MetaPrompt(id=s.id, text=s.text, origin="curated") for s in seeds.strategies[:3]],
    ]
    assert "4 meta-prompts (0 bootstrapped)" in result.stderr


GOOD_SEEDS = {"direct": "d", "bootstrap": "b {n}", "keep_tokens": "k {tokens}", "suffix": "s"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (yaml.safe_dump({**GOOD_SEEDS, "surprise": 1}), ": surprise: Extra inputs are not permitted\n"),
        (
            yaml.safe_dump({k: v for k, v in GOOD_SEEDS.items() if k != "suffix"}),
            ": suffix: Field required\n",
        ),
        (
            yaml.safe_dump({**GOOD_SEEDS, "strategies": [{"id": "x y", "text": "t"}]}),
            ": strategies.0.id: String should match pattern '^[A-Za-z0-9_.-]+$'\n",
        ),
        (yaml.safe_dump({**GOOD_SEEDS, "direct": 5}), ": direct: must be a valid string\n"),
        (yaml.safe_dump(["direct"]), ": must be a valid dictionary or instance of Seeds\n"),
        (
            yaml.safe_dump({**GOOD_SEEDS, "user_turn": "Just {rules}"}),
            ": user_turn: must contain {instruction}, where the instruction to rephrase goes\n",
        ),
        ("direct: [unclosed\n", ":2: YAML syntax error: "),
    ],
    ids=[
        "unknown-key",
        "missing-key",
        "bad-strategy-id",
        "not-a-string",
        "not-a-mapping",
        "user-turn-without-instruction",
        "yaml-syntax",
    ],
)
def test_cli_bad_seeds_is_an_error_naming_the_file(
    cli: CLI, tmp_path: Path, content: str, message: str
) -> None:
    seeds_dir = tmp_path / "meta"
    seeds_dir.mkdir()
    (seeds_dir / "seeds.yaml").write_text(content)
    config = write_config(tmp_path / "cfg.yaml", directory=str(seeds_dir))
    result = cli("meta-prompts", "-c", config, "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 2
    expected = f"Error: {seeds_dir / 'seeds.yaml'}{message}"
    if message.endswith("\n"):
        assert result.stderr == expected
    else:
        assert result.stderr.startswith(expected)
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_missing_seeds_is_an_error_naming_the_file(cli: CLI, tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg.yaml", directory=str(tmp_path / "nowhere"))
    result = cli("meta-prompts", "-c", config, "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 2
    assert result.stderr.startswith(
        f"Error: {tmp_path / 'nowhere' / 'seeds.yaml'}: cannot read seed meta-prompts"
    )


# --------------------------------------------------------------------------------------------
# Where the seeds come from

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_a_checkout_reads_its_top_level_meta_instructions() -> None:
    assert default_directory() == REPO_ROOT / "meta_instructions"


@pytest.mark.parametrize("name", ["seeds.yaml", "examples.yaml"])
def test_packaged_seeds_are_the_top_level_seeds(name: str) -> None:
    """The copy the wheel ships is a link to the file in meta_instructions/, never a second version."""
    packaged = packaged_directory() / name
    assert packaged.parent != REPO_ROOT / "meta_instructions"
    assert packaged.is_symlink()
    assert packaged.resolve() == (REPO_ROOT / "meta_instructions" / name).resolve()
    assert packaged.read_bytes() == (REPO_ROOT / "meta_instructions" / name).read_bytes()


def test_every_file_of_meta_instructions_is_packaged() -> None:
    top = {p.name for p in (REPO_ROOT / "meta_instructions").glob("*.yaml")}
    assert {p.name for p in packaged_directory().glob("*.yaml")} == top


# --------------------------------------------------------------------------------------------
# The words of a rephrasing request


def test_the_user_turn_holds_the_rules_then_the_instruction() -> None:
    text = user_prompt(SEEDS, "Use synonyms.", ["{A}", "{B}"], "Compare {A} with {B}.")
    assert text == (
        "Use synonyms. Keep {A}, {B} as they are. Reply with the rewrite only.\n\n"
        "Instruction: Compare {A} with {B}.\nRewritten instruction:"
    )


def test_the_user_turn_fills_each_slot_once() -> None:
    """An instruction that shows {rules} or {instruction} itself is left as it is."""
    seeds = SEEDS.model_copy(update={"user_turn": "Q: {instruction} | {rules}"})
    assert user_prompt(seeds, "Go.", [], "Say {rules} and {instruction}.") == (
        "Q: Say {rules} and {instruction}. | Go. Reply with the rewrite only."
    )


def test_the_shipped_seeds_word_the_user_turn() -> None:
    seeds = load_seeds()
    assert seeds.user_turn.count("{rules}") == seeds.user_turn.count("{instruction}") == 1
    assert user_prompt(seeds, "M.", [], "I.").endswith("Instruction: I.\nRewritten instruction:")

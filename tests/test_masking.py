"""Masking placeholders for the LLM: {A}, {B}, ... go out, the exact placeholders come back.

Templates are built from parts (literal text, placeholders in any accepted spelling), so each
test knows independently what the masked text, the mapping and the restored template must be.
"""

from __future__ import annotations

import itertools
import json
import re
import string
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instraug.errors import TemplateError
from instraug.placeholders import (
    Core,
    Masked,
    Placeholder,
    canonical,
    escape_literal,
    literal_text,
    mask_placeholders,
    parse_template,
    placeholders_of,
    restore_core,
    restore_placeholders,
    split_core,
)
from instraug.stages.s3_rules import build_candidate


def examples(n: int) -> settings:
    """Hypothesis settings: n examples; building templates is slow on a busy machine, never an error."""
    return settings(max_examples=n, suppress_health_check=[HealthCheck.too_slow])


MASK_LIKE = re.compile(r"\{([A-Z]{1,2})\}")  # what the LLM is told to keep


def mask_letters() -> Iterator[str]:
    """A .. Z, then AA, AB, ... ZZ."""
    upper = string.ascii_uppercase
    yield from upper
    for first, second in itertools.product(upper, upper):
        yield first + second


# --------------------------------------------------------------------------------------------
# Strategies

SHOWN = st.one_of(st.sampled_from(["A", "B", "C", "AA", "AB"]), st.from_regex(r"[A-Z]{1,2}", fullmatch=True))
#: Literal text rich in braces and in things that look like mask tokens ({A}, {AB}).
LITERAL = st.lists(
    st.one_of(
        st.text(st.sampled_from("abc XYZ.,;:!?\"'|\n\té中"), max_size=8),
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=4),
        st.sampled_from(["{", "}", "{{", "}}", "{ A }", "{a}", "{ABC}"]),
        SHOWN.map(lambda letters: "{" + letters + "}"),
        SHOWN.map(lambda letters: "{{" + letters + "}}"),
    ),
    max_size=3,
).map("".join)

NAMES = st.one_of(
    st.sampled_from(["question", "options", "meta_data", "region", "text", "A", "B", "AA", "x1"]),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True),
)
SEPARATORS = st.one_of(st.sampled_from(["||||", ", ", "\n", '"', "{}", "\\"]), st.text(max_size=4))
PLACEHOLDERS = st.builds(
    Placeholder,
    NAMES,
    st.lists(st.one_of(NAMES, st.integers(-3, 3)), max_size=2).map(tuple),
    st.lists(SEPARATORS, max_size=2).map(tuple),
)


@st.composite
def spelling(draw: st.DrawFn, placeholder: Placeholder) -> str:
    """One accepted source spelling of a placeholder (not necessarily the canonical one)."""
    out = [draw(st.sampled_from(["", " ", "  "])), placeholder.root]
    for step in placeholder.steps:
        out.append(f"[{step}]" if isinstance(step, int) else f".{step}")
    for sep in placeholder.joins:
        quoted = json.dumps(sep, ensure_ascii=draw(st.booleans()))
        quoted = quoted.replace("{", "\\u007b").replace("}", "\\u007d")
        pad = draw(st.sampled_from(["", " "]))
        out.append(f"|{pad}join({pad}{quoted}{pad})")
    out.append(draw(st.sampled_from(["", " "])))
    return "{" + "".join(out) + "}"


@dataclass
class Built:
    """A template source and what it is made of (adjacent literals merged, as the parser sees them)."""

    source: str
    parts: list[str | Placeholder]

    @property
    def placeholders(self) -> list[Placeholder]:
        return [p for p in self.parts if isinstance(p, Placeholder)]

    @property
    def literals(self) -> list[str]:
        return [p for p in self.parts if isinstance(p, str)]

    @property
    def canonical(self) -> str:
        return "".join(escape_literal(p) if isinstance(p, str) else str(p) for p in self.parts)

    @property
    def shown_letters(self) -> set[str]:
        """Mask-like tokens the literal text shows once its braces are unescaped."""
        return {m for literal in self.literals for m in MASK_LIKE.findall(literal)}


@st.composite
def templates(draw: st.DrawFn, min_distinct: int = 0, max_distinct: int = 4) -> Built:
    """Literal text and placeholders, interleaved; placeholders repeat, in varied spellings."""
    distinct = draw(st.lists(PLACEHOLDERS, min_size=min_distinct, max_size=max_distinct, unique_by=str))
    uses = draw(st.lists(st.sampled_from(distinct), max_size=4)) if distinct else []
    uses = distinct + uses
    order = draw(st.permutations(uses))
    source: list[str] = []
    parts: list[str | Placeholder] = []
    many = len(order) > 8  # long templates: literal text now and then, to stay quick
    for i in range(len(order) + 1):
        literal = draw(LITERAL) if not many or i % 7 == 0 else " "
        source.append(escape_literal(literal))
        if literal:
            if parts and isinstance(parts[-1], str):
                parts[-1] += literal
            else:
                parts.append(literal)
        if i < len(order):
            source.append(draw(spelling(order[i])))
            parts.append(order[i])
    return Built("".join(source), parts)


def expected_letters(built: Built) -> list[str]:
    """The mask letters, in order: the first letters the literal text does not show."""
    distinct = list(dict.fromkeys(str(p) for p in built.placeholders))
    free = (letter for letter in mask_letters() if letter not in built.shown_letters)
    return list(itertools.islice(free, len(distinct)))


# --------------------------------------------------------------------------------------------
# The round trip


@given(templates())
@examples(100)
def test_restoring_the_masked_text_gives_the_canonical_template(built: Built) -> None:
    assert parse_template(built.source) == built.parts  # the strategy built what it meant to
    masked = mask_placeholders(built.source)
    restored, unknown = restore_placeholders(masked.text, masked)
    assert restored == canonical(built.source) == built.canonical
    assert unknown == []


# --------------------------------------------------------------------------------------------
# The mapping


@given(templates())
@examples(100)
def test_mapping_is_a_bijection_in_order_of_first_appearance(built: Built) -> None:
    masked = mask_placeholders(built.source)
    first_seen = list(dict.fromkeys(str(p) for p in built.placeholders))
    assert list(masked.mapping.values()) == first_seen  # one letter per distinct placeholder
    assert list(masked.mapping) == expected_letters(built)  # A, B, C ... skipping shown letters
    assert not built.shown_letters & set(masked.mapping)  # a shown {X} is never a mask
    letter_of = {source: letter for letter, source in masked.mapping.items()}
    expected = "".join(p if isinstance(p, str) else "{" + letter_of[str(p)] + "}" for p in built.parts)
    assert masked.text == expected  # literal text as is, each placeholder as its letter
    assert masked.tokens == ["{" + letter + "}" for letter in masked.mapping]


@given(templates())
@examples(60)
def test_repeated_placeholders_share_one_letter_and_all_come_back(built: Built) -> None:
    masked = mask_placeholders(built.source)
    uses = Counter(str(p) for p in built.placeholders)
    shown = Counter(MASK_LIKE.findall(masked.text))
    for letter, source in masked.mapping.items():
        assert shown[letter] == uses[source]  # every repeat is masked, none is lost
    restored, _ = restore_placeholders(masked.text, masked)
    assert Counter(str(p) for p in parse_template(restored) if isinstance(p, Placeholder)) == uses


def test_repeats_are_not_lost() -> None:
    """The official InstrAug code masks by a dict from token to placeholder and drops repeats."""
    masked = mask_placeholders('Is {q} the same as {q}? Compare {options|join(", ")} with {q}.')
    assert masked.text == "Is {A} the same as {A}? Compare {B} with {A}."
    assert masked.mapping == {"A": "{q}", "B": '{options|join(", ")}'}
    restored, unknown = restore_placeholders("Compare {B} and {A}; is {A} like {A}?", masked)
    assert restored == 'Compare {options|join(", ")} and {q}; is {q} like {q}?'
    assert unknown == []


def test_spellings_of_one_placeholder_share_a_letter() -> None:
    masked = mask_placeholders('{ q } then {q} then {options| join( "||||" )} and {options|join("||||")}')
    assert masked.text == "{A} then {A} then {B} and {B}"
    assert masked.mapping == {"A": "{q}", "B": '{options|join("||||")}'}


def test_literal_mask_like_tokens_stay_literal() -> None:
    masked = mask_placeholders("Fill {{A}} and {{C}} with {question} and {answer}.")
    assert masked.text == "Fill {A} and {C} with {B} and {D}."
    assert masked.mapping == {"B": "{question}", "D": "{answer}"}
    restored, unknown = restore_placeholders("With {B} and {D}, fill {C} and {A}.", masked)
    assert restored == "With {question} and {answer}, fill {{C}} and {{A}}."
    assert unknown == []


# --------------------------------------------------------------------------------------------
# LLM answers


@st.composite
def reordered_answer(draw: st.DrawFn, masked: Masked, shown: set[str]) -> tuple[str, str]:
    """An answer using the mask letters (and literal-shown letters) in any order, any number of
    times; and the template it must restore to."""
    letters = sorted(masked.mapping) + sorted(shown)
    used = draw(st.lists(st.sampled_from(letters), max_size=8)) if letters else []
    chunk = st.text(st.sampled_from("abc ,.?!{}é\n"), max_size=6).filter(lambda t: not MASK_LIKE.search(t))
    answer: list[str] = []
    expected: list[str] = []
    for letter in [*used, None]:
        text = draw(chunk)
        answer.append(text)
        expected.append(escape_literal(text))
        if letter is not None:
            answer.append("{" + letter + "}")
            expected.append(masked.mapping.get(letter) or escape_literal("{" + letter + "}"))
    return "".join(answer), "".join(expected)


@given(templates(), st.data())
@examples(60)
def test_reordered_tokens_restore_to_reordered_placeholders(built: Built, data: st.DataObject) -> None:
    masked = mask_placeholders(built.source)
    answer, expected = data.draw(reordered_answer(masked, built.shown_letters))
    restored, unknown = restore_placeholders(answer, masked)
    assert restored == expected
    assert unknown == []


@given(templates(), st.data())
@examples(40)
def test_an_invented_token_is_reported_unknown(built: Built, data: st.DataObject) -> None:
    masked = mask_placeholders(built.source)
    unused = [x for x in mask_letters() if x not in masked.mapping and x not in built.shown_letters]
    invented = "{" + data.draw(st.sampled_from(unused[:40])) + "}"
    answer = f"{masked.text} and also {invented}"
    restored, unknown = restore_placeholders(answer, masked)
    assert unknown == [invented]
    assert restored == built.canonical + " and also " + escape_literal(invented)


def test_z_is_unknown_for_a_two_placeholder_template() -> None:
    masked = mask_placeholders('Answer {question} using {options|join(", ")}.')
    restored, unknown = restore_placeholders("Use {B} to answer {A}; see {Z}.", masked)
    assert unknown == ["{Z}"]
    assert restored == 'Use {options|join(", ")} to answer {question}; see {{Z}}.'


# --------------------------------------------------------------------------------------------
# More than 26 placeholders


def test_more_than_26_placeholders_use_two_letters() -> None:
    names = [f"f{i}" for i in range(30)]
    template = " ".join("{" + n + "}" for n in names) + " and again {f27} {f0}"
    masked = mask_placeholders(template)
    assert list(masked.mapping) == [*string.ascii_uppercase, "AA", "AB", "AC", "AD"]
    assert masked.mapping["AB"] == "{f27}"
    assert masked.text.endswith("and again {AB} {A}")
    assert restore_placeholders(masked.text, masked) == (template, [])


def test_two_letter_tokens_shown_by_the_literal_text_are_skipped() -> None:
    names = [f"f{i}" for i in range(28)]
    template = "Keep {{AA}}: " + " ".join("{" + n + "}" for n in names)
    masked = mask_placeholders(template)
    assert list(masked.mapping)[25:] == ["Z", "AB", "AC"]
    assert masked.text.startswith("Keep {AA}: {A} {B}")
    assert restore_placeholders(masked.text, masked) == (template, [])


@given(templates(min_distinct=27, max_distinct=60))
@examples(8)
def test_many_placeholders_round_trip(built: Built) -> None:
    masked = mask_placeholders(built.source)
    assert list(masked.mapping) == expected_letters(built)
    assert restore_placeholders(masked.text, masked) == (built.canonical, [])


def test_literal_braces_around_a_placeholder_survive_the_candidate_builder() -> None:
    template = "Fill in the set {{{question}}} and nothing else."
    masked = mask_placeholders(template)
    assert masked.text == "Fill in the set {{A}} and nothing else."
    answer = "Please fill in the set {{A}} and nothing else."  # the LLM kept every brace
    _cleaned, candidate, reasons = build_candidate(answer, template, masked.text, masked.mapping)
    assert (candidate, reasons) == ("Please fill in the set {{{question}}} and nothing else.", [])


# --------------------------------------------------------------------------------------------
# The core: placeholder runs at the edges hidden from the LLM, put back verbatim

EDGE_LITERAL = st.sampled_from(
    ["", " ", ". ", "? ", ":", "\n\n", " (", ") ", '"', "Answer the question.", "x"]
)


@st.composite
def edged_templates(draw: st.DrawFn) -> str:
    """A template with runs of placeholders and punctuation at either edge around varied text."""
    built = draw(templates())
    run = st.lists(st.tuples(st.builds(str, PLACEHOLDERS).flatmap(spelling_of), EDGE_LITERAL), max_size=3)
    head = "".join(p + escape_literal(lit) for p, lit in draw(run))
    tail = "".join(escape_literal(lit) + p for p, lit in draw(run))
    return head + built.source + tail


def spelling_of(source: str) -> st.SearchStrategy[str]:
    return spelling(parse_template(source)[0])  # type: ignore[arg-type]


def words_outside_placeholders(template: str) -> bool:
    return any(c.isalnum() or c == "_" for c in literal_text(template))


@given(st.one_of(templates().map(lambda b: b.source), edged_templates()))
@examples(150)
def test_the_core_split_hides_only_placeholder_runs_and_loses_nothing(template: str) -> None:
    core = split_core(template)
    assert core.template == template  # byte for byte
    assert Core.of(template, core.prefix, core.suffix) == core
    for run in (core.prefix, core.suffix):
        if run:
            assert placeholders_of(run)  # something is hidden ...
            assert not words_outside_placeholders(run)  # ... and no word of the instruction
    if core.prefix or core.suffix:
        assert words_outside_placeholders(core.body)
    # the spaces between the body and a hidden run belong to the run
    assert not (core.prefix and core.body[:1].isspace()) and not (core.suffix and core.body[-1:].isspace())


@given(st.one_of(templates().map(lambda b: b.source), edged_templates()), st.text(max_size=30))
@examples(150)
def test_restoring_the_core_puts_the_hidden_runs_back_byte_identical(template: str, reply: str) -> None:
    core = split_core(template)
    restored = restore_core(reply, core)
    assert restored.startswith(core.prefix) and restored.endswith(core.suffix)
    assert len(restored) >= len(core.prefix) + len(core.suffix)
    assert restore_core(core.body, core) == template  # the body unchanged gives the template back


@given(st.one_of(templates().map(lambda b: b.source), edged_templates()))
@examples(100)
def test_masking_the_core_and_restoring_it_keeps_every_placeholder(template: str) -> None:
    core = split_core(template)
    masked = mask_placeholders(core.body)
    body, unknown = restore_placeholders(masked.text, masked)
    restored = restore_core(body, core)
    assert unknown == []
    assert restored == core.prefix + canonical(core.body) + core.suffix
    assert Counter(placeholders_of(restored)) == Counter(placeholders_of(template))


OPTIONS = '{options_token} {options|join("||||")}'


@pytest.mark.parametrize(
    ("template", "prefix", "suffix"),
    [
        (f"Answer the question. {{question}}{OPTIONS}", "", f" {{question}}{OPTIONS}"),
        (f"In this task, answer about an object.{{question}}{OPTIONS}", "", f"{{question}}{OPTIONS}"),
        (f"Question: {{question}}{OPTIONS}", "", f" {{question}}{OPTIONS}"),
        (f"Which option overlaps most with {{given_region}}?{OPTIONS}", "", OPTIONS),
        (f'Pick the color that answers "{{question}}".{OPTIONS}', "", OPTIONS),
        ('{region_info}\n\nWhy is "{answer}" the answer?{options_str}', "{region_info}\n\n", "{options_str}"),
        (f"{{question}} Decide if the object appears in the image.{OPTIONS}", "{question} ", OPTIONS),
        ("Look at the scene and answer the question.\n {question}", "", "\n {question}"),
        # a run inside a sentence stays shown: the LLM cannot rephrase "a caption for"
        ('Generate a caption for {region|join("||||")}.', "", ""),
        ('{region|join("||||")} marks a region. Describe it.', "", ""),
        (' "{text}" describes part of the image.', "", ""),
        ("Write a short caption.", "", ""),
        ('{question}{options_token} {options|join("||||")}', "", ""),
    ],
)
def test_which_runs_are_hidden(template: str, prefix: str, suffix: str) -> None:
    core = split_core(template)
    assert (core.prefix, core.suffix) == (prefix, suffix)
    assert core.template == template


def test_a_reply_joins_a_run_the_way_the_template_did() -> None:
    core = split_core(f"Answer a question about an object.{{question}}{OPTIONS}")
    assert core.suffix == f"{{question}}{OPTIONS}"
    # the reply dropped the period the template had before the run: it comes back
    assert restore_core("Answer about the object", core) == f"Answer about the object.{{question}}{OPTIONS}"
    assert restore_core("Answer about it! ", core) == f"Answer about it!{{question}}{OPTIONS}"
    spaced = split_core("Answer the question. {question}")
    # spaces at a hidden run's side are the run's; the other side is left as the reply has it
    assert restore_core("  Reply to the question  ", spaced) == "  Reply to the question {question}"


def test_a_row_s_edges_must_be_the_template_s() -> None:
    with pytest.raises(TemplateError, match="not the edges of the template"):
        Core.of("Describe {region}.", "", " {question}")
    with pytest.raises(TemplateError):
        Core.of("ab", "ab", "b")

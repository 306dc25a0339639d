"""The template syntax: parsing, canonical form, escaping, rendering by lookup only, masking."""

from __future__ import annotations

import builtins
import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from instraug.errors import TemplateError
from instraug.placeholders import (
    CompiledTemplate,
    Placeholder,
    RenderError,
    canonical,
    escape_literal,
    literal_text,
    mask_placeholders,
    parse_placeholder,
    parse_template,
    placeholders_of,
    restore_placeholders,
)

# --------------------------------------------------------------------------------------------
# Strategies

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
STEPS = st.lists(st.one_of(NAMES, st.integers(-30, 30)), max_size=3).map(tuple)
SEPARATORS = st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)
PLACEHOLDERS = st.builds(Placeholder, NAMES, STEPS, st.lists(SEPARATORS, max_size=2).map(tuple))
PARTS = st.lists(st.one_of(TEXT, PLACEHOLDERS), max_size=6)

#: Text close to a placeholder: a brace, a name, steps, a join with odd JSON, a brace.
NEAR_PLACEHOLDER = st.tuples(
    st.sampled_from(["{", "{", "{", "", "{{", "}"]),
    st.sampled_from(["a", "a", "meta_data", "", " ", "1x", "é"]),
    st.lists(st.sampled_from([".x", "[0]", "[-1]", "[07]", "[1:2]", ".", "[", "]", "()", " "]), max_size=2),
    st.lists(
        st.tuples(
            st.sampled_from(["|join(", "|join(", "| join( ", "|", "join(", "|upper"]),
            st.text(st.sampled_from(["\\", "q", "u", "1", "\t", "n", "0", "\n", " "]), max_size=5),
            st.sampled_from([")", ")", " )", "", "("]),
        ).map(lambda t: f'{t[0]}"{t[1]}"{t[2]}'),
        max_size=2,
    ),
    st.sampled_from(["}", "}", "}", "}}", "", "{"]),
).map(lambda t: t[0] + t[1] + "".join(t[2]) + "".join(t[3]) + t[4])
NEAR_GRAMMAR = st.lists(st.one_of(NEAR_PLACEHOLDER, TEXT), max_size=4).map("".join)
ANY_TEXT = st.one_of(TEXT, NEAR_GRAMMAR)


def source_of(parts: list[str | Placeholder]) -> str:
    return "".join(escape_literal(p) if isinstance(p, str) else str(p) for p in parts)


def normalized(parts: list[str | Placeholder]) -> list[str | Placeholder]:
    """Adjacent literals merged, empty literals dropped: what parse_template returns."""
    out: list[str | Placeholder] = []
    for part in parts:
        if isinstance(part, str):
            if not part:
                continue
            if out and isinstance(out[-1], str):
                out[-1] += part
                continue
        out.append(part)
    return out


@st.composite
def spelled(draw: st.DrawFn, placeholder: Placeholder) -> str:
    """Another accepted spelling of a placeholder: spaces, \\u escapes, leading zeros."""
    out = [draw(st.sampled_from(["", " ", "\t"])), placeholder.root]
    for step in placeholder.steps:
        if isinstance(step, int):
            zeros = "0" * draw(st.integers(0, 2))
            out.append(f"[-{zeros}{-step}]" if step < 0 else f"[{zeros}{step}]")
        else:
            out.append(f".{step}")
    for sep in placeholder.joins:
        quoted = json.dumps(sep, ensure_ascii=draw(st.booleans()))
        quoted = quoted.replace("{", "\\u007b").replace("}", "\\u007D")
        pad = draw(st.sampled_from(["", " "]))
        out.append(f"|{pad}join({pad}{quoted}{pad}){pad}")
    return "{" + "".join(out) + "}"


@st.composite
def value_for(draw: st.DrawFn, placeholder: Placeholder) -> tuple[Any, str]:
    """A field value that the placeholder's path reaches, and the text it must render as."""
    if placeholder.joins:
        items = draw(st.lists(st.one_of(TEXT, st.integers(), st.booleans()), max_size=4))
        value: Any = items
        text = placeholder.joins[0].join(i if isinstance(i, str) else str(i) for i in items)
    else:
        leaf = draw(st.one_of(TEXT, st.integers(), st.floats(allow_nan=False), st.none()))
        value, text = leaf, leaf if isinstance(leaf, str) else str(leaf)
    for step in reversed(placeholder.steps):
        if isinstance(step, int):
            size = max(step + 1, -step) + draw(st.integers(0, 2))
            items = [draw(TEXT) for _ in range(size)]
            items[step] = value
            value = items
        else:
            value = {"_noise": draw(TEXT), step: value}
    return value, text


# --------------------------------------------------------------------------------------------
# Parsing and the canonical form


@given(PARTS)
def test_parse_inverts_serialization(parts: list[str | Placeholder]) -> None:
    assert parse_template(source_of(parts)) == normalized(parts)


@given(PARTS)
def test_serialized_form_is_canonical(parts: list[str | Placeholder]) -> None:
    source = source_of(parts)
    assert canonical(source) == source


@given(PLACEHOLDERS, st.data())
def test_every_spelling_parses_to_the_same_placeholder(placeholder: Placeholder, data: st.DataObject) -> None:
    spelling = data.draw(spelled(placeholder))
    assert parse_template(spelling) == [placeholder]
    assert canonical(spelling) == str(placeholder)


@settings(max_examples=300)
@given(ANY_TEXT)
@example('{a|join("\\q")}')
@example("{a[" + "1" * 4301 + "]}")
def test_arbitrary_text_parses_or_raises_template_error(text: str) -> None:
    try:
        parts = parse_template(text)
    except TemplateError:
        return
    once = canonical(text)
    assert canonical(once) == once
    assert parse_template(once) == parts
    assert literal_text(text) == "".join(p for p in parts if isinstance(p, str))
    assert placeholders_of(text) == [str(p) for p in parts if isinstance(p, Placeholder)]


@pytest.mark.parametrize(
    "text",
    [
        '{a|join("\\q")}',  # invalid JSON escape
        '{a|join("\\u12")}',  # truncated \u escape
        '{a|join("\t")}',  # raw control character inside the JSON string
        "{a[" + "9" * 5000 + "]}",  # an index too long for int()
    ],
)
def test_bad_placeholder_is_a_template_error(text: str) -> None:
    with pytest.raises(TemplateError):
        parse_template(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a { b", "unmatched '{' at character 3 (write {{ for a literal brace)"),
        ("a } b", "single '}' at character 3 (write }} for a literal brace)"),
        ("{}", "placeholder {}: expected a field name"),
        ("{1x}", "placeholder {1x}: expected a field name"),
        ("{a.b()}", "placeholder {a.b()}: cannot read '()'"),
        ("{a|upper}", "placeholder {a|upper}: cannot read '|upper'"),
        ("{a[1:2]}", "placeholder {a[1:2]}: cannot read '[1:2]'"),
    ],
)
def test_template_error_says_what_and_where(text: str, message: str) -> None:
    with pytest.raises(TemplateError) as info:
        parse_template(text)
    assert str(info.value) == message


@given(TEXT)
def test_escape_literal_round_trip(text: str) -> None:
    escaped = escape_literal(text)
    assert parse_template(escaped) == ([text] if text else [])
    assert literal_text(escaped) == text
    assert placeholders_of(escaped) == []
    assert CompiledTemplate(escaped).render({}) == text


@given(st.lists(TEXT, max_size=5))
def test_literal_text_drops_only_placeholders(texts: list[str]) -> None:
    template = "{x}".join(escape_literal(t) for t in texts)
    assert literal_text(template) == "".join(texts)
    assert placeholders_of(template) == ["{x}"] * max(len(texts) - 1, 0)


# --------------------------------------------------------------------------------------------
# Rendering


@given(st.lists(st.one_of(TEXT, PLACEHOLDERS), max_size=6), st.data())
def test_render_follows_paths_and_joins(parts: list[Any], data: st.DataObject) -> None:
    fields: dict[str, Any] = {}
    expected: list[str] = []
    template: list[str | Placeholder] = []
    for index, part in enumerate(parts):
        if isinstance(part, str):
            template.append(part)
            expected.append(part)
            continue
        part = Placeholder(f"{part.root}_{index}", part.steps, part.joins[:1])  # one root per placeholder
        value, text = data.draw(value_for(part))
        fields[part.root] = value
        template.append(part)
        expected.append(text)
    assert CompiledTemplate(source_of(template)).render(fields) == "".join(expected)


@given(PLACEHOLDERS, st.dictionaries(NAMES, TEXT, max_size=3), st.data())
def test_constants_fold_to_the_same_result(
    placeholder: Placeholder, constants: dict[str, str], data: st.DataObject
) -> None:
    placeholder = Placeholder(placeholder.root, placeholder.steps, placeholder.joins[:1])
    value, text = data.draw(value_for(placeholder))
    template = f"<{placeholder}>" + "".join(f"[{{{name}}}]" for name in constants)
    fields = {placeholder.root: value}
    assume(placeholder.root not in constants)
    expected = f"<{text}>" + "".join(f"[{v}]" for v in constants.values())
    assert CompiledTemplate(template, constants).render(fields) == expected
    assert CompiledTemplate(template).render({**fields, **constants}) == expected


class Recorder(dict):
    """A field mapping that records which keys are looked up."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.looked_up: list[str] = []

    def __getitem__(self, key: str) -> Any:
        self.looked_up.append(key)
        return super().__getitem__(key)


class Trap:
    """A value whose methods must never be called by a renderer (str() is what f-strings do)."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"attribute {name} was read")

    def __call__(self, *args: Any) -> Any:
        raise AssertionError("called")

    def __format__(self, spec: str) -> str:
        raise AssertionError("formatted")

    def __str__(self) -> str:
        return "trap"


@contextlib.contextmanager
def code_execution_refused() -> Iterator[list[str]]:
    """Within the block, eval/exec/compile/__import__ record the attempt and fail."""
    names = ("eval", "exec", "compile", "__import__")
    saved = {name: getattr(builtins, name) for name in names}
    attempts: list[str] = []

    def refuse(name: str) -> Any:
        def refused(*args: Any, **kwargs: Any) -> Any:
            attempts.append(name)
            raise RuntimeError(f"{name} called")

        return refused

    try:
        for name in names:
            setattr(builtins, name, refuse(name))
        yield attempts
    finally:
        for name, original in saved.items():
            setattr(builtins, name, original)


def test_rendering_only_looks_values_up() -> None:
    fields = Recorder(a={"b": [Trap(), "x"]}, c=Trap(), __class__="k")
    with code_execution_refused() as attempts:
        template = CompiledTemplate("{a.b[0]} {a.b[-1]} {c} {__class__}")
        rendered = template.render(fields)
    assert attempts == []
    assert rendered == "trap x trap k"
    assert fields.looked_up == ["a", "a", "c", "__class__"]


@settings(max_examples=100)
@given(ANY_TEXT)
def test_parsing_arbitrary_text_executes_nothing(text: str) -> None:
    with code_execution_refused() as attempts:
        try:
            canonical(text)
        except Exception:
            pass
    assert attempts == []


@pytest.mark.parametrize(
    ("template", "fields", "message"),
    [
        ("{x}", {}, "missing field 'x' needed by {x}"),
        ("{m.k}", {"m": {}}, "missing key 'k' needed by {m.k}"),
        ("{m.upper}", {"m": "text"}, "{m.upper}: cannot take key 'upper' of a str"),
        ("{m.__class__}", {"m": Trap()}, "{m.__class__}: cannot take key '__class__' of a Trap"),
        ("{m[2]}", {"m": ["a", "b"]}, "{m[2]}: index 2 out of range for 2 items"),
        ("{m[-3]}", {"m": ["a", "b"]}, "{m[-3]}: index -3 out of range for 2 items"),
        ("{m[0]}", {"m": 5}, "{m[0]}: cannot index a int"),
        ('{m|join(",")}', {"m": "ab"}, '{m|join(",")}: cannot join a str, need a list'),
        ('{m|join(",")|join(";")}', {"m": ["a"]}, '{m|join(",")|join(";")}: cannot join a str, need a list'),
    ],
)
def test_render_error_names_the_placeholder(template: str, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(RenderError) as info:
        CompiledTemplate(template).render(fields)
    assert str(info.value) == message


def test_braces_in_values_are_not_template_syntax() -> None:
    rendered = CompiledTemplate("{q} {{lit}}").render({"q": "{evil} {{x}} {q}"})
    assert rendered == "{evil} {{x}} {q} {lit}"


def test_separator_with_braces_and_quotes_round_trips() -> None:
    placeholder = Placeholder("options", (), ('{"a"} \\ }',))
    assert parse_placeholder(placeholder.text) == placeholder
    assert CompiledTemplate(str(placeholder)).render({"options": ["x", "y"]}) == 'x{"a"} \\ }y'


# --------------------------------------------------------------------------------------------
# Masking for the LLM


@given(st.lists(st.one_of(TEXT, PLACEHOLDERS, st.sampled_from(["{{A}}", "{{B}}", "{{AB}}"])), max_size=8))
def test_mask_restore_round_trip(parts: list[Any]) -> None:
    template = "".join(p if isinstance(p, str) and p.startswith("{{") else source_of([p]) for p in parts)
    masked = mask_placeholders(template)
    assert sorted(masked.mapping.values()) == sorted(set(placeholders_of(template)))
    for letter, source in masked.mapping.items():
        assert masked.text.count("{" + letter + "}") == placeholders_of(template).count(source)
    restored, unknown = restore_placeholders(masked.text, masked)
    assert restored == canonical(template)
    assert unknown == []

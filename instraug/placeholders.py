"""instraug's template syntax: the one place that parses, renders, masks and restores placeholders.

A template is text with placeholders in braces; ``{{`` and ``}}`` are literal braces::

    placeholder := "{" path ("|" filter)* "}"
    path        := NAME ("." NAME | "[" INTEGER "]")*      # field, key, list index (may be < 0)
    filter      := "join(" JSON-STRING ")"                  # join a list with a separator

Examples: ``{question}``, ``{meta_data.method}``, ``{region[0]}``, ``{dial_history[-1]}``,
``{options|join("||||")}``. Parsing never evaluates anything; rendering only looks values up.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from instraug.errors import TemplateError

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_STEP = re.compile(rf"\.({_NAME})|\[(-?[0-9]{{1,18}})\]")
_NAME_RE = re.compile(_NAME)
_FILTER = re.compile(r'\|\s*join\(\s*("(?:[^"\\]|\\.)*")\s*\)')
_LBRACE, _RBRACE = "\\u007b", "\\u007d"  # braces inside a separator, escaped for the scanner
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


class RenderError(Exception):
    """A placeholder cannot be filled from the given fields; the message names it."""


@dataclass(frozen=True)
class Placeholder:
    """One parsed placeholder: a root name, key/index steps, an optional join separator."""

    root: str
    steps: tuple[str | int, ...] = ()
    joins: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """Canonical source, without braces."""
        out = [self.root]
        for step in self.steps:
            out.append(f"[{step}]" if isinstance(step, int) else f".{step}")
        for sep in self.joins:
            quoted = json.dumps(sep, ensure_ascii=False)
            out.append(f"|join({quoted.replace('{', _LBRACE).replace('}', _RBRACE)})")
        return "".join(out)

    def __str__(self) -> str:
        return "{" + self.text + "}"

    def resolve(self, fields: Mapping[str, Any]) -> str:
        try:
            value = fields[self.root]
        except KeyError:
            raise RenderError(f"missing field '{self.root}' needed by {self}") from None
        for step in self.steps:
            value = _step(value, step, self)
        for sep in self.joins:
            if not isinstance(value, list):
                raise RenderError(f"{self}: cannot join a {type(value).__name__}, need a list")
            value = sep.join(to_text(item) for item in value)
        return to_text(value)


def to_text(value: Any) -> str:
    """A value as MultiInstruct's f-strings show it: strings as is, anything else as Python's str()."""
    return value if isinstance(value, str) else str(value)


def _step(value: Any, step: str | int, where: Placeholder) -> Any:
    if isinstance(step, int):
        if not isinstance(value, (list, str)):
            raise RenderError(f"{where}: cannot index a {type(value).__name__}")
        if not -len(value) <= step < len(value):
            raise RenderError(f"{where}: index {step} out of range for {len(value)} items")
        return value[step]
    if not isinstance(value, dict):
        raise RenderError(f"{where}: cannot take key '{step}' of a {type(value).__name__}")
    if step not in value:
        raise RenderError(f"missing key '{step}' needed by {where}")
    return value[step]


def parse_placeholder(source: str) -> Placeholder:
    """Parse the text between braces; raise TemplateError if it is not in the grammar."""
    text = source.strip()
    match = _NAME_RE.match(text)
    if not match:
        raise TemplateError(f"placeholder {{{source}}}: expected a field name")
    root, pos = match.group(), match.end()
    steps: list[str | int] = []
    while (m := _STEP.match(text, pos)) is not None:
        steps.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        pos = m.end()
    joins: list[str] = []
    while pos < len(text):
        m = _FILTER.match(text, pos)
        if m is None:
            raise TemplateError(f"placeholder {{{source}}}: cannot read '{text[pos:]}'")
        try:
            joins.append(json.loads(m.group(1)))
        except ValueError as exc:
            raise TemplateError(f"placeholder {{{source}}}: bad separator string ({exc})") from None
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return Placeholder(root, tuple(steps), tuple(joins))


Part = str | Placeholder


def parse_template(template: str) -> list[Part]:
    """Split a template into literal text (braces unescaped) and placeholders."""
    parts: list[Part] = []
    text: list[str] = []
    pos = 0
    for m in _TOKEN.finditer(template):
        text.append(template[pos : m.start()])
        pos = m.end()
        token = m.group()
        if token in ("{{", "}}"):
            text.append(token[0])
        elif m.group(1) is not None:
            if literal := "".join(text):
                parts.append(literal)
            text = []
            parts.append(parse_placeholder(m.group(1)))
        else:
            what = "unmatched '{'" if token == "{" else "single '}'"
            raise TemplateError(
                f"{what} at character {m.start() + 1} (write {token}{token} for a literal brace)"
            )
    text.append(template[pos:])
    if literal := "".join(text):
        parts.append(literal)
    return parts


def escape_literal(text: str) -> str:
    """Literal text as template source (braces doubled)."""
    return text.replace("{", "{{").replace("}", "}}")


def placeholders_of(template: str) -> list[str]:
    """Canonical placeholder sources of a template, in order, repeats included."""
    return [str(p) for p in parse_template(template) if isinstance(p, Placeholder)]


def literal_text(template: str) -> str:
    """The template with every placeholder removed (what is left to rephrase)."""
    return "".join(p for p in parse_template(template) if isinstance(p, str))


def canonical(template: str) -> str:
    """The template re-serialized: placeholders in canonical form, braces escaped."""
    return "".join(escape_literal(p) if isinstance(p, str) else str(p) for p in parse_template(template))


class CompiledTemplate:
    """A template ready to render many times: constants folded, each placeholder a lookup function."""

    __slots__ = ("source", "fields", "render")

    def __init__(self, source: str, constants: Mapping[str, str] | None = None):
        self.source = source
        consts = constants or {}
        texts: list[str] = [""]  # literal text before, between and after the placeholders
        fields: list[Placeholder] = []
        for part in parse_template(source):
            if isinstance(part, Placeholder) and part.root in consts:
                if part.steps or part.joins:
                    raise TemplateError(f"{part}: {part.root} is a constant; it cannot be indexed or joined")
                part = part.resolve(consts)
            if isinstance(part, str):
                texts[-1] += part
            else:
                fields.append(part)
                texts.append("")
        self.fields = tuple(fields)
        self.render: Callable[[Mapping[str, Any]], str] = _renderer(texts, [_resolver(p) for p in fields])

    @property
    def roots(self) -> frozenset[str]:
        """The field names this template reads."""
        return frozenset(p.root for p in self.fields)


def _renderer(
    texts: list[str], resolvers: list[Callable[[Mapping[str, Any]], str]]
) -> Callable[[Mapping[str, Any]], str]:
    """A closure concatenating literals and looked-up values; fixed shapes for the common sizes
    (MultiInstruct templates have at most a handful of placeholders), a join for the rest."""
    if not resolvers:
        text = texts[0]
        return lambda _fields: text
    if len(resolvers) == 1:
        t0, t1 = texts
        (r0,) = resolvers
        return lambda f: t0 + r0(f) + t1
    if len(resolvers) == 2:
        t0, t1, t2 = texts
        r0, r1 = resolvers
        return lambda f: t0 + r0(f) + t1 + r1(f) + t2
    if len(resolvers) == 3:
        t0, t1, t2, t3 = texts
        r0, r1, r2 = resolvers
        return lambda f: t0 + r0(f) + t1 + r1(f) + t2 + r2(f) + t3
    pairs = list(zip(resolvers, texts[1:], strict=True))
    head = texts[0]

    def render(fields: Mapping[str, Any]) -> str:
        out = [head]
        for resolve, text in pairs:
            out.append(resolve(fields))
            out.append(text)
        return "".join(out)

    return render


def _resolver(placeholder: Placeholder) -> Callable[[Mapping[str, Any]], str]:
    """A fast lookup for the common shapes; the general path otherwise (same results)."""
    root = placeholder.root
    if placeholder.steps:
        return placeholder.resolve
    if not placeholder.joins:

        def field(fields: Mapping[str, Any]) -> str:
            try:
                value = fields[root]
            except KeyError:
                raise RenderError(f"missing field '{root}' needed by {placeholder}") from None
            return value if value.__class__ is str else to_text(value)

        return field
    if len(placeholder.joins) == 1:
        join = placeholder.joins[0].join

        def joined(fields: Mapping[str, Any]) -> str:
            value = fields.get(root)
            if value.__class__ is list:
                try:
                    return join(value)
                except TypeError:
                    pass  # non-string items: the general path formats them
            return placeholder.resolve(fields)

        return joined
    return placeholder.resolve


# --------------------------------------------------------------------------------------------
# Masking for the LLM: each distinct placeholder becomes {A}, {B}, ... and comes back exactly

_MASK_TOKEN = re.compile(r"\{([A-Z]{1,2})\}")


@dataclass(frozen=True)
class Masked:
    """A template as the LLM sees it, and the letter -> placeholder mapping to undo it."""

    text: str
    mapping: dict[str, str]

    @property
    def tokens(self) -> list[str]:
        return ["{" + letter + "}" for letter in self.mapping]


def _letters() -> Iterator[str]:
    alphabet = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    yield from alphabet
    for first in alphabet:
        for second in alphabet:
            yield first + second


def mask_placeholders(template: str) -> Masked:
    """Replace each distinct placeholder by one letter token, in order of first appearance.

    Letters that the literal text already shows as ``{X}`` are skipped, so they are never
    mistaken for masks when the answer comes back.
    """
    parts = parse_template(template)
    taken = {m.group(1) for p in parts if isinstance(p, str) for m in _MASK_TOKEN.finditer(p)}
    letters = (letter for letter in _letters() if letter not in taken)
    by_source: dict[str, str] = {}
    out: list[str] = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
            continue
        source = str(part)
        if source not in by_source:
            by_source[source] = next(letters)
        out.append("{" + by_source[source] + "}")
    return Masked("".join(out), {letter: source for source, letter in by_source.items()})


def restore_placeholders(text: str, masked: Masked) -> tuple[str, list[str]]:
    """An LLM answer back into template syntax: mask tokens become their placeholders, every other
    brace is literal. Also returns the mask-like tokens ({X}) that map to nothing."""
    literal_tokens = set(_MASK_TOKEN.findall(masked.text)) - set(masked.mapping)
    out: list[str] = []
    unknown: list[str] = []
    pos = 0
    for m in _MASK_TOKEN.finditer(text):
        out.append(escape_literal(text[pos : m.start()]))
        pos = m.end()
        letter = m.group(1)
        if letter in masked.mapping:
            out.append(masked.mapping[letter])
        else:
            if letter not in literal_tokens:
                unknown.append(m.group())
            out.append(escape_literal(m.group()))
    out.append(escape_literal(text[pos:]))
    return "".join(out), unknown


# --------------------------------------------------------------------------------------------
# The core of a template: the runs of placeholders at its edges hidden from the LLM, put back after

#: Punctuation that may close the core's text ("Question:", "the object." before "{question}").
_CLOSING = frozenset(".,;:!?)]’”…")
#: Punctuation that may open it ("(see", "“Describe").
_OPENING = frozenset("([‘“")


@dataclass(frozen=True)
class Core:
    """A template in three parts: a hidden run at the start, the body the LLM rephrases, a hidden
    run at the end. The runs are template source, byte for byte: ``prefix + body + suffix`` is the
    template."""

    prefix: str
    body: str
    suffix: str

    @classmethod
    def of(cls, template: str, prefix: str = "", suffix: str = "") -> Core:
        """The core of `template` between the hidden runs a generation row recorded."""
        if len(prefix) + len(suffix) > len(template) or not (
            template.startswith(prefix) and template.endswith(suffix)
        ):
            raise TemplateError("the hidden prefix and suffix are not the edges of the template")
        return cls(prefix, template[len(prefix) : len(template) - len(suffix)], suffix)

    @property
    def template(self) -> str:
        """The whole template again."""
        return self.prefix + self.body + self.suffix


def split_core(template: str) -> Core:
    """Hide the runs of placeholders at the start and the end of a template, where a sentence ends.

    A run is placeholders with only spaces and punctuation between and around them
    (``{question}{options_token} {options|join("||||")}`` at the end, ``{region_info}\\n\\n`` at
    the start). It is hidden from where the body before it ends a sentence (``.``, ``?``, ``!``,
    ``:``, ``;``, maybe followed by a closing quote or bracket) or a line break separates them; at the
    start, also where the body after it opens a sentence with a capital letter. A run in the middle
    of a sentence stays shown, masked: the LLM cannot rephrase a fragment such as "Which option
    overlaps most with". Punctuation attached to the body's first or last word stays in the body
    (``Question:``), a straight double quote only when it closes or opens a quotation of the body.
    A side with no placeholder to hide hides nothing.
    """
    literal: dict[int, str] = {}  # the literal characters by position ({{ and }} included)
    in_placeholder = [False] * len(template)
    inside = [False] * (len(template) + 1)  # strictly inside a placeholder or an escaped brace
    pos = 0
    for m in _TOKEN.finditer(template):
        literal.update((i, template[i]) for i in range(pos, m.start()))
        if m.group(1) is not None:
            in_placeholder[m.start() : m.end()] = [True] * (m.end() - m.start())
        else:
            literal.update((i, template[i]) for i in range(m.start(), m.end()))
        inside[m.start() + 1 : m.end()] = [True] * (m.end() - m.start() - 1)
        pos = m.end()
    literal.update((i, template[i]) for i in range(pos, len(template)))
    words = [i for i, char in literal.items() if char.isalnum() or char == "_"]
    if not words:
        return Core("", template, "")
    start, end = words[0], words[-1] + 1
    while end < len(template) and end in literal and _closes(literal[end], template[start:end]):
        end += 1
    while start > 0 and (start - 1) in literal and _opens(literal[start - 1], template[start:end]):
        start -= 1
    cut_end = len(template)
    for p in range(end, len(template)):
        if inside[p] or template[p - 1].isspace():
            continue
        if not any(in_placeholder[p:]):
            break
        if _ends_sentence(template[:p]) or "\n" in _leading_space(template[p:]):
            cut_end = p
            break
    cut_start = 0
    for q in range(start, 0, -1):
        if inside[q] or template[q].isspace():
            continue
        if not any(in_placeholder[:q]):
            break
        before = template[:q]
        if (
            _ends_sentence(before.rstrip())
            or "\n" in before[len(before.rstrip()) :]
            or template[q:].lstrip("".join(_OPENING) + '"')[:1].isupper()
        ):
            cut_start = q
            break
    return Core(template[:cut_start], template[cut_start:cut_end], template[cut_end:])


def _ends_sentence(text: str) -> bool:
    return text.rstrip("\"')]’”")[-1:] in (".", "?", "!", ":", ";")


def _leading_space(text: str) -> str:
    return text[: len(text) - len(text.lstrip())]


def _closes(char: str, body: str) -> bool:
    return char in _CLOSING or (char == '"' and body.count('"') % 2 == 1)


def _opens(char: str, body: str) -> bool:
    return char in _OPENING or (char == '"' and body.count('"') % 2 == 1)


def restore_core(text: str, core: Core) -> str:
    """A rephrased body (template syntax, placeholders restored) back between the hidden runs.

    The runs come back byte for byte. Where the template joins a run without a space
    (``the object.{question}``), a reply ending in a word or a placeholder gets the body's own
    closing punctuation back, so its last word never runs into the placeholder's value; likewise
    at the start.
    """
    if core.prefix:
        text = text.lstrip()
    if core.suffix:
        text = text.rstrip()
    if text and core.suffix and not core.suffix[0].isspace() and _ends_in_word(text):
        text += _edge_punctuation(core.body, last=True)
    if text and core.prefix and not core.prefix[-1].isspace() and _starts_in_word(text):
        text = _edge_punctuation(core.body, last=False) + text
    return core.prefix + text + core.suffix


def _edge_punctuation(body: str, *, last: bool) -> str:
    """The run of punctuation (no spaces, no words, no placeholders) at one end of the body."""
    chars = reversed(body) if last else iter(body)
    run: list[str] = []
    for char in chars:
        if char.isalnum() or char == "_" or char.isspace() or char in "{}":
            break
        run.append(char)
    return "".join(reversed(run)) if last else "".join(run)


def _ends_in_word(text: str) -> bool:
    last = text[-1]
    return last.isalnum() or last == "_" or (last == "}" and not text.endswith("}}"))


def _starts_in_word(text: str) -> bool:
    first = text[0]
    return first.isalnum() or first == "_" or (first == "{" and not text.startswith("{{"))

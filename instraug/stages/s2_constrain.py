"""Constrained decoding for stage 2: the replies a server may give to a rephrasing request.

One line, each mask token of the instruction exactly as often as the instruction holds it, and no
other brace: as a llama.cpp GBNF grammar (`sampling.constrain: grammar`) or as a regular expression
for vLLM's structured outputs (`guided`). The tokens may come in any order while there are at most
`MAX_ORDERS` distinct orders; beyond that, in the instruction's own order.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from instraug.placeholders import Masked

if TYPE_CHECKING:
    from instraug.config import Config
    from instraug.llm.base import Constraint

#: Most token orders a grammar lists (4 distinct tokens have 24).
MAX_ORDERS = 24
_MASK_TOKEN = re.compile(r"\{([A-Z]{1,2})\}")
#: The text between tokens: anything but a brace or a line break.
_GBNF_TEXT = r"[^{}\n]*"
_REGEX_TEXT = r"[^{}\n]*"


def mask_tokens(masked: Masked) -> list[str]:
    """The mask tokens of the shown text in reading order, repeats included."""
    return [m.group() for m in _MASK_TOKEN.finditer(masked.text) if m.group(1) in masked.mapping]


def token_orders(tokens: Sequence[str]) -> list[tuple[str, ...]]:
    """The orders a reply may hold the tokens in: every distinct order when there are at most
    MAX_ORDERS of them, else the given order only."""
    orders: list[tuple[str, ...]] = []
    for order in itertools.permutations(tokens):
        if order not in orders:
            orders.append(order)
            if len(orders) > MAX_ORDERS:
                return [tuple(tokens)]
    return orders


def gbnf(tokens: Sequence[str]) -> str:
    """A GBNF grammar: one line holding each token as often as `tokens` does, then an optional
    line break (after which the server can only stop)."""
    alternatives = [
        " ".join(["text", *(f"{_gbnf_string(t)} text" for t in order)]) for order in token_orders(tokens)
    ]
    return f'root ::= ({" | ".join(alternatives)}) "\\n"?\ntext ::= {_GBNF_TEXT}\n'


def regex(tokens: Sequence[str]) -> str:
    """The same replies as a regular expression (vLLM's structured outputs)."""
    alternatives = [
        _REGEX_TEXT + "".join(re.escape(t) + _REGEX_TEXT for t in order) for order in token_orders(tokens)
    ]
    return f"(?:{'|'.join(alternatives)})\\n?"


def constraint_for(config: Config, masked: Masked | None) -> Constraint | None:
    """The constraint `sampling.constrain` asks for on this request, if any: only for masked
    instructions (protect_placeholders) whose shown text has no brace besides the mask tokens."""
    from instraug.llm.base import Constraint

    kind = config.sampling.constrain
    if kind == "auto":
        kind = "grammar" if config.llm.backend == "local" else "none"
    if kind == "none" or masked is None:
        return None
    tokens = mask_tokens(masked)
    rest = _MASK_TOKEN.sub("", masked.text)
    if "{" in rest or "}" in rest:
        return None  # literal braces the reply would have to repeat: leave the reply free
    if kind == "grammar":
        return Constraint("grammar", gbnf(tokens))
    return Constraint("regex", regex(tokens))


def _gbnf_string(text: str) -> str:
    """A GBNF string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'

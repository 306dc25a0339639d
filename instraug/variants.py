"""Variant conditions of a template set (visual_dialog's `if`/`else`): a tiny whitelisted reading of
the upstream `if` test as a syntax tree, never evaluated as Python."""

from __future__ import annotations

import ast
from collections.abc import Callable, Mapping
from typing import Any

from instraug.errors import TemplateError
from instraug.placeholders import RenderError

#: The longest condition read (characters) and the deepest syntax tree accepted. Upstream's one
#: condition, `len(dial_history) > 0`, has 21 characters and 4 levels; the limits keep a hostile
#: pool row from exhausting the parser's stack or memory.
MAX_CONDITION_LENGTH = 500
MAX_CONDITION_DEPTH = 50


def _condition_node(variant: str, task: str, name: str = "") -> ast.expr:
    try:
        return _parse_variant(variant)
    except TemplateError as exc:
        raise TemplateError(f"task {task}: {exc.reason}", name) from None


def _parse_variant(variant: Any) -> ast.expr:
    """The syntax tree of a variant's condition, within the length and depth limits."""
    if not isinstance(variant, str):
        raise TemplateError(f"variant must be a string 'if: COND' or 'else: COND', got {_kind_of(variant)}")
    kind, sep, cond = variant.partition(": ")
    if kind not in ("if", "else") or not sep:
        raise TemplateError("variant must be 'if: COND' or 'else: COND'")
    if len(cond) > MAX_CONDITION_LENGTH:
        raise TemplateError(
            f"condition is {len(cond)} characters long; at most {MAX_CONDITION_LENGTH} are read"
        )
    try:
        node = ast.parse(cond, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        shown = repr(cond) if len(cond) <= 80 else repr(cond[:77] + "...")
        raise TemplateError(f"cannot read condition {shown}") from None
    if _deeper_than(node, MAX_CONDITION_DEPTH):
        raise TemplateError(f"condition is nested more than {MAX_CONDITION_DEPTH} levels deep")
    return node


def _deeper_than(node: ast.AST, limit: int) -> bool:
    stack = [(node, 1)]
    while stack:
        current, depth = stack.pop()
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(current))
    return False


def _check_condition(node: ast.expr, task: str, name: str) -> None:
    """Raise TemplateError unless the interpreter reads the condition and it can hold."""
    try:
        if _deeper_than(node, MAX_CONDITION_DEPTH):
            raise TemplateError(f"condition is nested more than {MAX_CONDITION_DEPTH} levels deep")
        _condition_kind(node)
    except TemplateError as exc:
        raise TemplateError(f"task {task}: {exc.reason}", name, getattr(node, "lineno", None)) from None


_COMPARE: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: lambda a, b: a == b,
    ast.NotEq: lambda a, b: a != b,
    ast.Gt: lambda a, b: a > b,
    ast.GtE: lambda a, b: a >= b,
    ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b,
}
_ORDERING = (ast.Gt, ast.GtE, ast.Lt, ast.LtE)


def _is_len(node: ast.Call) -> bool:
    return (
        isinstance(node.func, ast.Name)
        and node.func.id == "len"
        and len(node.args) == 1
        and not node.keywords
    )


def _condition_kind(node: ast.expr) -> str:
    """What a condition yields: 'number', 'string' or 'any' (a field's value)."""
    # Raises TemplateError for what the interpreter does not read, and for a comparison that
    # fails whatever the instance holds (a number ordered against a string, the length of a number).
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool)):
        return "string" if isinstance(node.value, str) else "number"
    if isinstance(node, ast.Name):
        return "any"
    if isinstance(node, ast.Call) and _is_len(node):
        if _condition_kind(node.args[0]) == "number":
            raise TemplateError(f"condition {ast.unparse(node)} takes the length of a number")
        return "number"
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE:
        kinds = {_condition_kind(node.left), _condition_kind(node.comparators[0])}
        if isinstance(node.ops[0], _ORDERING) and kinds == {"number", "string"}:
            raise TemplateError(f"condition {ast.unparse(node)} orders a number against a string")
        return "number"
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        _condition_kind(node.operand)
        return "number"
    if isinstance(node, ast.BoolOp):
        for value in node.values:
            _condition_kind(value)
        return "number"
    raise TemplateError(f"unsupported condition {ast.unparse(node)}")


def _condition_value(node: ast.expr, fields: Mapping[str, Any]) -> Any:
    """Interpret a condition that _condition_kind accepted over an instance's fields."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in fields:
            raise RenderError(f"missing field '{node.id}'")
        return fields[node.id]
    if isinstance(node, ast.Call):  # len(x), the only call _condition_kind accepts
        value = _condition_value(node.args[0], fields)
        if not isinstance(value, (str, list, dict)):
            raise RenderError(f"{ast.unparse(node.args[0])} is {_kind_of(value)}, which has no length")
        return len(value)
    if isinstance(node, ast.Compare):
        left = _condition_value(node.left, fields)
        right = _condition_value(node.comparators[0], fields)
        try:
            return _COMPARE[type(node.ops[0])](left, right)
        except TypeError:
            raise RenderError(f"cannot compare {_kind_of(left)} with {_kind_of(right)}") from None
    if isinstance(node, ast.UnaryOp):
        return not _condition_value(node.operand, fields)
    if isinstance(node, ast.BoolOp):  # short-circuits, as upstream's Python does
        values = (_condition_value(v, fields) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    raise TemplateError(f"unsupported condition {ast.unparse(node)}")


def _kind_of(value: Any) -> str:
    """A JSON value for a message: its kind, and a short form of it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    if isinstance(value, (int, float)):
        return f"a number ({shown})"
    if isinstance(value, str):
        return f"a string ({shown})"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else f"a {type(value).__name__}"


class VariantSelector:
    """Decides which template set of a task applies to an instance."""

    def __init__(self, variant: str, task: str):
        """Read `variant` ('if: COND' or 'else: COND'); a TemplateError says what is wrong with it."""
        self.node = _parse_variant(variant)
        _condition_kind(self.node)
        self.variant = variant
        self.task = task
        self.negate = variant.startswith("else")
        self.condition = variant.partition(": ")[2]

    def matches(self, fields: Mapping[str, Any]) -> bool:
        """Whether the instance gets this set; a RenderError names the condition and the problem."""
        try:
            return bool(_condition_value(self.node, fields)) != self.negate
        except (RenderError, TypeError, ValueError) as exc:  # the last two: never a traceback
            raise RenderError(f"variant condition {self.condition}: {exc}") from None

"""Reading a MultiInstruct checkout: templates by syntax tree only, instances, derived fields."""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from instraug.errors import InputError, TemplateError
from instraug.placeholders import (
    Placeholder,
    RenderError,
    escape_literal,
    parse_template,
    placeholders_of,
)
from instraug.records import Template

#: The string constants MultiInstruct's build_instruction defines, by name.
CONSTANTS: dict[str, str] = {
    "options_token": "\n\n[Options]:",
    "split_token": "||||",
    "region_split_token": "||||",
    "image_token": "image",
    "region_token": "Regions: ",
}
SPLIT = CONSTANTS["split_token"]
OPTIONS_TOKEN = CONSTANTS["options_token"]

# --------------------------------------------------------------------------------------------
# Upstream Python expressions -> instraug placeholders (syntax tree only, never evaluated)


def convert_expression(node: ast.expr, constants: Mapping[str, str] = CONSTANTS) -> Placeholder:
    """Map one upstream f-string expression into a placeholder, or raise TemplateError."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "join"
        and len(node.args) == 1
        and not node.keywords
    ):
        sep = _string_value(node.func.value, constants)
        inner = _path(node.args[0])
        if sep is not None and inner is not None:
            return Placeholder(inner.root, inner.steps, (*inner.joins, sep))
    path = _path(node)
    if path is None:
        raise TemplateError(f"unsupported expression {{{ast.unparse(node)}}}")
    return path


def _string_value(node: ast.expr, constants: Mapping[str, str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    return None


def _path(node: ast.expr) -> Placeholder | None:
    """name, name['key'], name[0], name[-1] and chains of these."""
    steps: list[str | int] = []
    while isinstance(node, ast.Subscript):
        key = node.slice
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.value):
                return None
            steps.append(key.value)
        elif isinstance(key, ast.Constant) and type(key.value) is int:
            steps.append(key.value)
        elif (
            isinstance(key, ast.UnaryOp)
            and isinstance(key.op, ast.USub)
            and isinstance(key.operand, ast.Constant)
            and type(key.operand.value) is int
        ):
            steps.append(-key.operand.value)
        else:
            return None
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return Placeholder(node.id, tuple(reversed(steps)))


def convert_fstring_body(body: str, constants: Mapping[str, str] = CONSTANTS) -> str:
    """An f-string body as stored in MultiInstruct's templates.json -> instraug template."""
    out: list[str] = []
    pos = 0
    for m in re.finditer(r"\{\{|\}\}|\{([^{}]*)\}|[{}]", body):
        out.append(escape_literal(body[pos : m.start()]))
        pos = m.end()
        token = m.group()
        if token in ("{{", "}}"):
            out.append(token)
        elif m.group(1) is not None:
            out.append(str(_convert_source(m.group(1), constants)))
        else:
            raise TemplateError(f"unbalanced '{token}' at character {m.start() + 1}")
    out.append(escape_literal(body[pos:]))
    return "".join(out)


def _convert_source(expr: str, constants: Mapping[str, str]) -> Placeholder:
    try:
        node = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError:
        raise TemplateError(f"unsupported expression {{{expr}}}") from None
    return convert_expression(node, constants)


# --------------------------------------------------------------------------------------------
# instruction_templates.py -> template rows


def import_templates(path: str | Path) -> list[Template]:
    """Every template of build_instruction, read from the file's syntax tree; `-` reads stdin.

    A templates.json (by its name, or on stdin by its opening `[` or `{`) is read as JSON instead.
    """
    import sys

    name = str(path)
    try:
        if name == "-":
            name = "<stdin>"
            source = sys.stdin.buffer.read().decode("utf-8")
        else:
            source = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read: {getattr(exc, 'strerror', None) or exc}", name) from None
    if name.endswith(".json") or (name == "<stdin>" and source.lstrip().startswith(("[", "{"))):
        return _import_json(source, name)
    try:
        tree = ast.parse(source, filename=name)
    except SyntaxError as exc:
        raise InputError(f"not valid Python: {exc.msg}", name, exc.lineno) from None
    func = next(
        (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build_instruction"),
        None,
    )
    if func is None:
        raise InputError("no top-level function build_instruction", name)
    if not func.args.args:
        raise InputError("build_instruction takes no task argument", name, func.lineno)
    task_arg = func.args.args[0].arg
    constants = dict(CONSTANTS)
    for stmt in func.body:
        _read_constant(stmt, constants, name)
    rows: list[Template] = []
    for stmt in func.body:
        if not isinstance(stmt, ast.If):
            continue
        if _branch_tasks(stmt.test, task_arg) is None:
            # a preamble such as `if options: random.shuffle(options)`: no templates, nothing to read
            if _holds_instructs(stmt):
                raise InputError(f"cannot read branch condition: {ast.unparse(stmt.test)}", name, stmt.lineno)
            continue
        node: ast.stmt | None = stmt
        while isinstance(node, ast.If):
            tasks = _branch_tasks(node.test, task_arg)
            if tasks is None:
                raise InputError(f"cannot read branch condition: {ast.unparse(node.test)}", name, node.lineno)
            for task in tasks:
                rows.extend(_branch_templates(task, node.body, constants, name))
            node = node.orelse[0] if len(node.orelse) == 1 else None
    if not rows:
        raise InputError("build_instruction has no task branches with templates", name)
    return rows


def _read_constant(stmt: ast.stmt, constants: dict[str, str], name: str) -> None:
    if not (
        isinstance(stmt, ast.Assign)
        and len(stmt.targets) == 1
        and isinstance(stmt.targets[0], ast.Name)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    ):
        return
    key, value = stmt.targets[0].id, stmt.value.value
    if key in CONSTANTS and CONSTANTS[key] != value:
        raise InputError(
            f"constant {key} is {value!r}; instraug renders it as {CONSTANTS[key]!r}",
            name,
            stmt.lineno,
        )
    constants[key] = value


def _branch_tasks(test: ast.expr, task_arg: str) -> list[str] | None:
    if isinstance(test, ast.Compare) and len(test.ops) == 1:
        left, op, right = test.left, test.ops[0], test.comparators[0]
        if isinstance(op, ast.Eq):
            if isinstance(right, ast.Name) and right.id == task_arg:
                left, right = right, left
            if isinstance(left, ast.Name) and left.id == task_arg:
                if isinstance(right, ast.Constant) and isinstance(right.value, str):
                    return [right.value]
        if isinstance(op, ast.In) and isinstance(left, ast.Name) and left.id == task_arg:
            if isinstance(right, (ast.List, ast.Tuple, ast.Set)) and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in right.elts
            ):
                return [e.value for e in right.elts]  # type: ignore[attr-defined]
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.Or):
        tasks: list[str] = []
        for value in test.values:
            part = _branch_tasks(value, task_arg)
            if part is None:
                return None
            tasks.extend(part)
        return tasks
    return None


def _branch_templates(
    task: str, body: list[ast.stmt], constants: Mapping[str, str], name: str
) -> list[Template]:
    derived = _assigned_names(body) - {"instructs"}
    lists: list[tuple[str | None, ast.List, int]] = []
    for stmt in body:
        if (target := _instructs_list(stmt, name, task)) is not None:
            lists.append((None, target, stmt.lineno))
        elif isinstance(stmt, ast.If) and _holds_instructs(stmt):
            cond = ast.unparse(stmt.test)
            _check_condition(stmt.test, task, name)
            for variant, block in ((f"if: {cond}", stmt.body), (f"else: {cond}", stmt.orelse)):
                for inner in block:
                    if isinstance(inner, ast.If):
                        raise InputError(
                            f"task {task}: nested conditions are not supported", name, inner.lineno
                        )
                    if (target := _instructs_list(inner, name, task)) is not None:
                        lists.append((variant, target, inner.lineno))
    rows: list[Template] = []
    for selected, node, _line in lists:
        for element in node.elts:
            index = len(rows)
            template_id = f"{task}/{index}"
            try:
                template = _template_source(element, constants)
                for placeholder in parse_template(template):
                    if isinstance(placeholder, Placeholder):
                        _check_derived(task, placeholder, derived)
            except TemplateError as exc:
                raise TemplateError(
                    f"task {task}, template {index}: {exc.reason}", name, element.lineno
                ) from None
            rows.append(
                Template(
                    task=task,
                    variant=selected,
                    template_id=template_id,
                    instruction_id=template_id,
                    template=template,
                    placeholders=placeholders_of(template),
                    origin="original",
                    parent_id=None,
                    root_id=template_id,
                )
            )
    return rows


def _assigned_names(body: list[ast.stmt]) -> set[str]:
    """Names a block always assigns: at its top level, or in both arms of an if/else."""
    names: set[str] = set()
    for stmt in body:
        if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(stmt, ast.If) and stmt.orelse:
            names |= _assigned_names(stmt.body) & _assigned_names(stmt.orelse)
    return names


def _holds_instructs(stmt: ast.stmt) -> bool:
    return any(
        isinstance(n, ast.Name) and n.id == "instructs" and isinstance(n.ctx, ast.Store)
        for n in ast.walk(stmt)
    )


def _instructs_list(stmt: ast.stmt, name: str, task: str) -> ast.List | None:
    if (
        isinstance(stmt, ast.Assign)
        and len(stmt.targets) == 1
        and isinstance(stmt.targets[0], ast.Name)
        and stmt.targets[0].id == "instructs"
    ):
        if isinstance(stmt.value, ast.List):
            return stmt.value
        raise TemplateError(f"task {task}: instructs is not a list literal", name, stmt.lineno)
    return None


def _template_source(node: ast.expr, constants: Mapping[str, str]) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return escape_literal(node.value)
    if isinstance(node, ast.JoinedStr):
        out: list[str] = []
        for value in node.values:
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                out.append(escape_literal(value.value))
            elif isinstance(value, ast.FormattedValue):
                if value.conversion != -1 or value.format_spec is not None:
                    source = ast.unparse(ast.JoinedStr(values=[value]))[2:-1]
                    raise TemplateError(f"unsupported expression {source}")
                out.append(str(convert_expression(value.value, constants)))
            else:  # pragma: no cover - JoinedStr holds only these two
                raise TemplateError(f"unsupported f-string part {ast.unparse(value)}")
        return "".join(out)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _template_source(node.left, constants) + _template_source(node.right, constants)
    raise TemplateError(f"not a string literal: {ast.unparse(node)}")


def _check_derived(task: str, placeholder: Placeholder, derived: set[str]) -> None:
    """A name the branch computes must be one instraug knows how to compute for that task."""
    root = placeholder.root
    if root in derived and root not in CONSTANTS and root not in derived_names(task):
        raise TemplateError(
            f"{placeholder} uses '{root}', which this branch computes with code instraug "
            "does not run and does not know how to derive"
        )


_IMPORT_JSON_HINT = "a list of {task, variant, templates} objects"


def _import_json(source: str, name: str) -> list[Template]:
    import orjson

    try:
        sets = orjson.loads(source)
    except orjson.JSONDecodeError as exc:
        raise InputError(f"malformed JSON: {exc}", name) from None
    if not isinstance(sets, list):
        raise InputError(f"expected {_IMPORT_JSON_HINT}", name)
    rows: list[Template] = []
    counts: dict[str, int] = {}
    for entry in sets:
        if not isinstance(entry, dict) or not isinstance(entry.get("templates"), list):
            raise InputError(f"expected {_IMPORT_JSON_HINT}", name)
        task, variant = entry["task"], entry.get("variant")
        if variant is not None:
            _check_condition(_condition_node(variant, task, name), task, name)
        for body in entry["templates"]:
            index = counts.get(task, 0)
            counts[task] = index + 1
            try:
                template = convert_fstring_body(body)
            except TemplateError as exc:
                raise TemplateError(f"task {task}, template {index}: {exc.reason}", name) from None
            template_id = f"{task}/{index}"
            rows.append(
                Template(
                    task=task,
                    variant=variant,
                    template_id=template_id,
                    instruction_id=template_id,
                    template=template,
                    placeholders=placeholders_of(template),
                    root_id=template_id,
                )
            )
    return rows


# --------------------------------------------------------------------------------------------
# Variant conditions: a tiny whitelisted reading of the upstream `if` test, never evaluated

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


# --------------------------------------------------------------------------------------------
# Task-specific derived fields (what build_instruction computes before choosing a template)


def _object_regions(instance: Mapping[str, Any], key: str) -> list[Any]:
    meta = instance.get("meta_data")
    regions = meta.get("object_regions") if isinstance(meta, dict) else None
    if not isinstance(regions, dict) or key not in regions:
        raise RenderError(f"missing meta_data.object_regions.{key}")
    value = regions[key]
    if not isinstance(value, list):
        raise RenderError(f"meta_data.object_regions.{key} is not a list")
    return value


def _join_regions(key: str) -> Callable[[Mapping[str, Any], random.Random], Any]:
    return lambda instance, _rng: SPLIT.join(map(str, _object_regions(instance, key)))


def _wikihow_context(instance: Mapping[str, Any], _rng: random.Random) -> str:
    context = instance.get("context")
    if not isinstance(context, list):
        raise RenderError("field 'context' must be a list of steps")
    return "\n".join(map(str, context)) if context else '"nothing"'


def _step_order_options(_instance: Mapping[str, Any], rng: random.Random) -> list[str]:
    options = ["next", "previous"]
    rng.shuffle(options)
    return options


def _region_info(instance: Mapping[str, Any], _rng: random.Random) -> str:
    meta = instance.get("meta_data")
    regions = meta.get("object_regions") if isinstance(meta, dict) else None
    if not isinstance(regions, dict):
        raise RenderError("missing meta_data.object_regions")
    parts = []
    for key, value in regions.items():
        if not isinstance(value, list) or not value:
            raise RenderError(f"meta_data.object_regions.{key} must be a non-empty list of regions")
        parts.append(f"{key} is in {value[0]}.")
    return " ".join(parts)


def _dial_history(instance: Mapping[str, Any], _rng: random.Random) -> list[str]:
    meta = instance.get("meta_data")
    turns = meta.get("dialog_hist") if isinstance(meta, dict) else None
    if not isinstance(turns, list):
        raise RenderError("missing meta_data.dialog_hist")
    out = []
    for turn in turns:
        if not isinstance(turn, dict) or "q" not in turn or "a" not in turn:
            raise RenderError("meta_data.dialog_hist turns need 'q' and 'a'")
        out.append(f"{turn['q']}, {turn['a']};")
    return out


Deriver = Callable[[Mapping[str, Any], random.Random], Any]

#: task -> {field name: how to compute it from the instance}
DERIVED: dict[str, dict[str, Deriver]] = {
    "visual_object_region": {"region": _join_regions("subject")},
    "visual_subject_region": {"region": _join_regions("object")},
    "wikihow_next_step": {"context": _wikihow_context},
    "wikihow_text_image_step_order": {"options": _step_order_options},
    "wikihow_image_text_step_order": {"options": _step_order_options},
    "commonsense_VQA": {"region_info": _region_info},
    "visual_answer_justification": {"region_info": _region_info},
    "visual_dialog": {"dial_history": _dial_history},
    **{
        task: {"given_region": _join_regions("given_region")}
        for task in (
            "select_overlap_most_region",
            "select_overlap_least_region",
            "select_overlaped_region",
            "select_nonoverlaped_region",
            "if_region_overlap",
        )
    },
}


def derived_names(task: str) -> set[str]:
    return {"options_str", *DERIVED.get(task, {})}


def render_fields(
    task: str, instance: dict[str, Any], rng: random.Random, needs: frozenset[str] | None = None
) -> dict[str, Any]:
    """The instance's fields as the templates of its task see them (derived values included).

    `needs` limits the derived values to those some template reads; None derives them all.
    The instance itself is never modified.
    """
    derivers = DERIVED.get(task)
    wants_options_str = needs is None or "options_str" in needs
    if derivers is None and not (wants_options_str and instance.get("options").__class__ is list):
        return instance
    fields = dict(instance)
    if derivers:
        for key, derive in derivers.items():
            if needs is None or key in needs:
                fields[key] = derive(instance, rng)
    options = fields.get("options")
    if wants_options_str and isinstance(options, list):
        fields["options_str"] = f"{OPTIONS_TOKEN} {SPLIT.join(map(str, options))}"
    return fields


# Instances are read by instraug.instances (upstream's build steps included); kept importable here.
from instraug.instances import instance_files, read_instances  # noqa: E402, F401

"""Reading a MultiInstruct checkout's instruction_templates.py (or templates.json): the templates,
by syntax tree only, never imported or run. Derived fields live in derived.py, variant conditions
in variants.py, instances in instances.py."""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from pathlib import Path

from instraug.derived import CONSTANTS, derived_names
from instraug.errors import InputError, TemplateError
from instraug.placeholders import (
    Placeholder,
    escape_literal,
    parse_template,
    placeholders_of,
)
from instraug.records import Template
from instraug.variants import _check_condition, _condition_node

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

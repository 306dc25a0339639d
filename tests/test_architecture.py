"""The shape of the house: imports flow one way, and the README's commands run as written."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from instraug.cli import app

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "instraug"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the instraug modules it imports (at any depth of its body, lazily or not)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                target = target.strip(".")
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("instraug"):
                    found.add(target)
        graph[name] = found
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


# Package __init__ modules that only mount or re-export their children are not an upward edge.
_MOUNTS = {"instraug", "instraug.cli", "instraug.stages"}


def test_the_import_graph_has_no_circle() -> None:
    graph = {name: {t for t in targets if t not in _MOUNTS} for name, targets in import_graph().items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_circle() -> None:
    """The check above can fail: a made-up circle is found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize(
    "lower", ["instraug.stages", "instraug.report", "instraug.run_facts", "instraug.report_plots"]
)
def test_stages_and_the_report_never_import_upward(lower: str) -> None:
    upward = ("instraug.cli", "instraug.expand", "instraug.pipeline")
    offenders = {
        name: sorted(t for t in targets if t.startswith(upward))
        for name, targets in import_graph().items()
        if name == lower or name.startswith(lower + ".")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("module", ["instraug.report", "instraug.run_facts", "instraug.report_plots"])
def test_the_report_imports_no_stage(module: str) -> None:
    assert not {t for t in import_graph()[module] if t.startswith("instraug.stages")}


# --------------------------------------------------------------------------------------------
# The README's commands parse as written


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines: list[str] = []
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, re.S):
        for raw in block.replace("\\\n", " ").splitlines():
            line = raw.split("  #")[0].strip().removeprefix("$ ").strip()
            if line.startswith("instraug ") and line not in lines:
                lines.append(line.split(" | ")[0])
    return lines


def test_the_readme_shows_every_command() -> None:
    shown = {shlex.split(line)[1] for line in readme_commands()}
    registered = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert registered - shown == set()


@pytest.mark.parametrize("line", readme_commands())
def test_every_readme_command_parses(line: str) -> None:
    """Each `instraug ...` line of the README, with --help appended: options are still parsed."""
    result = CliRunner().invoke(app, [*shlex.split(line)[1:], "--help"])
    assert result.exit_code == 0, f"{line}\n{result.output}"

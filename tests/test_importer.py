"""Importing MultiInstruct's instruction_templates.py by syntax tree (and templates.json).

The fixture file is our own, so these tests may run it as an oracle: what upstream's
build_instruction would show for an instance must equal what instraug renders from the
imported templates, character for character.
"""

from __future__ import annotations

import copy
import inspect
import json
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instraug.derived import render_fields
from instraug.errors import InputError, TemplateError
from instraug.multiinstruct import import_templates
from instraug.placeholders import parse_template, placeholders_of
from instraug.pool import InstructionPool
from instraug.records import Template

MINI_TASKS = [
    "image_caption",
    "VQA",
    "VG",
    "object_match",
    "text_legibility",
    "visual_object_identification",
    "visual_object_region",
    "wikihow_next_step",
    "wikihow_text_image_step_order",
    "select_overlap_most_region",
    "if_region_overlap",
    "visual_nli",
    "commonsense_VQA",
    "visual_dialog",
    "hateful_content_detection",
]

DIALOG = {"dialog_hist": [{"q": "is it sunny", "a": "yes"}, {"q": "any {people}", "a": 'no "one"'}]}

#: One instance per task of the fixture (two for tasks whose templates depend on the data).
INSTANCES: list[tuple[str, dict[str, Any]]] = [
    ("image_caption", {}),
    ("VQA", {"question": "What is {this}?", "options": ["a cat", 'a "dog"']}),
    ("VG", {"text": "the man's 'hat' {left}"}),
    ("object_match", {"region": ["<bin_1> <bin_2>", "<bin_3>"], "options": ["yes", "no"]}),
    ("text_legibility", {"region": ["<bin_4>", "<bin_5>"], "options": ["legible", "illegible"]}),
    ("visual_object_identification", {"region": ["<bin_1>", "<bin_2>"], "meta_data": {"relation": "on"}}),
    (
        "visual_object_region",
        {
            "region": ["ignored"],
            "meta_data": {
                "relation": "holding",
                "object_regions": {"subject": ["<s1>", "<s2>"], "object": ["<o1>"]},
            },
        },
    ),
    ("wikihow_next_step", {"text": "Cut.", "context": ["Fold.", "Glue."], "meta_data": {"method": "Kite"}}),
    ("wikihow_next_step", {"text": "Cut.", "context": [], "meta_data": {"method": "Kite"}}),
    (
        "wikihow_text_image_step_order",
        {"text": "Cut.", "options": ["x", "y"], "meta_data": {"method": 'Make a "kite"'}},
    ),
    (
        "select_overlap_most_region",
        {"options": ["<r1>", "<r2>"], "meta_data": {"object_regions": {"given_region": ["<g1>", "<g2>"]}}},
    ),
    (
        "if_region_overlap",
        {
            "region": ["<r0>", "<r1>"],
            "options": ["yes", "no"],
            "meta_data": {"object_regions": {"given_region": ["<g>"]}},
        },
    ),
    ("visual_nli", {"text": "Two dogs.", "options": ["yes", "no", "maybe"]}),
    (
        "commonsense_VQA",
        {
            "question": "Why is person0 smiling?",
            "options": ["joy", "pain"],
            "meta_data": {"object_regions": {"person0": ["<p>", "<q>"], "dog1": ["<d>"]}},
        },
    ),
    ("visual_dialog", {"question": "what color is it", "meta_data": DIALOG}),
    ("visual_dialog", {"question": "what color is it", "meta_data": {"dialog_hist": []}}),
    ("hateful_content_detection", {"options": ["hateful", "not hateful"]}),
]


class NoShuffle(random.Random):
    """An rng whose shuffle keeps the order, so upstream and instraug agree on options."""

    def shuffle(self, x: Any) -> None:  # type: ignore[override]
        return None


@pytest.fixture(scope="module")
def mini_rows() -> list[Template]:
    return import_templates(Path(__file__).parent / "fixtures/multiinstruct_mini/instruction_templates.py")


@pytest.fixture(scope="module")
def upstream() -> Any:
    """The fixture's build_instruction, run with a `random` that returns every template."""
    path = Path(__file__).parent / "fixtures/multiinstruct_mini/instruction_templates.py"
    namespace: dict[str, Any] = {}
    exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), namespace)  # our own fixture
    namespace["random"] = SimpleNamespace(choice=list, shuffle=lambda xs: None)
    build = namespace["build_instruction"]
    params = set(inspect.signature(build).parameters) - {"task"}

    def instructs(task: str, instance: dict[str, Any]) -> list[str]:
        kwargs = {k: copy.deepcopy(v) for k, v in instance.items() if k in params}
        prompts, _target = build(task, **kwargs)
        return prompts

    return instructs


def rendered(rows: list[Template], task: str, instance: dict[str, Any]) -> list[str]:
    pool = InstructionPool(("mini", i, row) for i, row in enumerate(rows))
    fields = render_fields(task, instance, NoShuffle())
    template_set = pool.sets_for(task, fields)
    assert template_set is not None, f"no template set of {task} applies"
    return [entry.compiled.render(fields) for entry in template_set.all]


# --------------------------------------------------------------------------------------------
# The fixture file


def test_every_task_branch_is_imported_in_file_order(mini_rows: list[Template]) -> None:
    tasks = list(dict.fromkeys(row.task for row in mini_rows))
    assert tasks == MINI_TASKS  # ok_vqa only raises: it has no templates


def test_rows_are_originals_with_stable_ids(mini_rows: list[Template]) -> None:
    for task in MINI_TASKS:
        rows = [row for row in mini_rows if row.task == task]
        assert [row.instruction_id for row in rows] == [f"{task}/{i}" for i in range(len(rows))]
        for row in rows:
            assert row.template_id == row.instruction_id == row.root_id
            assert row.origin == "original"
            assert row.parent_id is None
            assert row.placeholders == placeholders_of(row.template)
            assert Template.model_validate(json.loads(row.model_dump_json())) == row


@pytest.mark.parametrize(
    ("instruction_id", "template"),
    [
        # a plain string (no f prefix) among f-strings; its braces are literal
        ("image_caption/2", "Look at image and tell me what is the content."),
        # `split_token. join(options)` with a space, as upstream writes it in VQA
        ("VQA/0", '{question}{options_token} {options|join("||||")}'),
        # escaped quotes in a triple-quoted string, one right before the closing quotes
        ("VG/0", 'The region in image that "{text}" describes is'),
        ("VG/1", 'The goal of this task is to find the part of the image with the description: "{text}"'),
        ("VG/2", "Find the region that '{text}' describes."),
        (
            "object_match/0",
            "Are the object in {region[0]} and object in {region[1]} the same type? "
            '{options_token} {options|join("||||")}',
        ),
        (
            "object_match/1",
            'Do objects in {region|join("||||")} have the same type? {options_token} {options|join("||||")}',
        ),
        # implicit concatenation of two f-strings on two lines is one template
        (
            "text_legibility/1",
            'Decide if the text in {region|join("||||")} is clear and complete. '
            '{options_token} {options|join("||||")}',
        ),
        # literal braces: {{ }} in an f-string, { } in a plain string joined with + to an f-string
        (
            "text_legibility/2",
            'Is the text {{legible}}? Answer with {{yes}} or {{no}}.{options_token} {options|join("||||")}',
        ),
        ("text_legibility/3", 'Reply {{"legible": true}} or {{"legible": false}} for {region|join("||||")}.'),
        (
            "visual_object_identification/0",
            "Given the image, the subject in {region[0]} {meta_data.relation} what?",
        ),
        (
            "visual_object_identification/1",
            'Given the subject in {region[0]} and relationship "{meta_data.relation}". What is the object?',
        ),
        (
            "if_region_overlap/1",
            'Does {given_region} share common area with {region[-1]}?{options_token} {options|join("||||")}',
        ),
        (
            "visual_dialog/0",
            'Dialogue history: {dial_history|join(" ")}\nBased on the image and dialogue '
            "history, answer: {question}?",
        ),
        ("visual_dialog/1", "Context: {dial_history[-1]}\n\nBased on the image, answer {question}?"),
    ],
)
def test_template_source(mini_rows: list[Template], instruction_id: str, template: str) -> None:
    row = next(row for row in mini_rows if row.instruction_id == instruction_id)
    assert row.template == template


def test_implicit_concatenation_without_comma_merges_two_templates(mini_rows: list[Template]) -> None:
    rows = [row for row in mini_rows if row.task == "hateful_content_detection"]
    assert len(rows) == 2  # three literals, one missing comma, as in upstream
    assert rows[0].template.count("{options_str}") == 2


def test_visual_dialog_variants_follow_the_nested_condition(mini_rows: list[Template]) -> None:
    rows = [row for row in mini_rows if row.task == "visual_dialog"]
    assert [row.variant for row in rows] == ["if: len(dial_history) > 0"] * 3 + [
        "else: len(dial_history) > 0"
    ] * 2
    assert [row.instruction_id for row in rows] == [f"visual_dialog/{i}" for i in range(5)]


@pytest.mark.parametrize(
    ("task", "instance"), INSTANCES, ids=[f"{t}-{i}" for i, (t, _) in enumerate(INSTANCES)]
)
def test_rendering_matches_upstream_build_instruction(
    mini_rows: list[Template], upstream: Any, task: str, instance: dict[str, Any]
) -> None:
    assert rendered(mini_rows, task, instance) == upstream(task, instance)


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    question=_TEXT,
    options=st.lists(_TEXT, min_size=1, max_size=4),
    turns=st.lists(st.tuples(_TEXT, _TEXT), max_size=3),
    relation=_TEXT,
    region=st.lists(_TEXT, min_size=2, max_size=3),
)
def test_rendering_matches_upstream_on_any_text(
    mini_rows: list[Template],
    upstream: Any,
    question: str,
    options: list[str],
    turns: list[tuple[str, str]],
    relation: str,
    region: list[str],
) -> None:
    hist = [{"q": q, "a": a} for q, a in turns]
    cases = {
        "VQA": {"question": question, "options": options},
        "visual_dialog": {"question": question, "meta_data": {"dialog_hist": hist}},
        "visual_object_identification": {"region": region, "meta_data": {"relation": relation}},
        "text_legibility": {"region": region, "options": options},
        "if_region_overlap": {
            "region": region,
            "options": options,
            "meta_data": {"object_regions": {"given_region": options}},
        },
    }
    for task, instance in cases.items():
        assert rendered(mini_rows, task, instance) == upstream(task, instance), task


def test_the_file_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    source = tmp_path / "instruction_templates.py"
    source.write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "def build_instruction(task, question=None, flag=open(" + repr(str(marker)) + ", 'w')):\n"
        f"    open({str(marker)!r}, 'w').close()\n"
        "    if task == 'VQA':\n"
        "        instructs = [f'{question}']\n",
        encoding="utf-8",
    )
    rows = import_templates(source)
    assert [row.template for row in rows] == ["{question}"]
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# Files instraug must refuse, with an error that names where and what


def branch_file(tmp_path: Path, body: str, *, preamble: str = "") -> Path:
    """A build_instruction with the upstream constants and one VQA branch whose body is `body`."""
    path = tmp_path / "instruction_templates.py"
    path.write_text(
        "def build_instruction(task, text=None, options=None, region=None, question=None, "
        "meta_data=None, instruction_id=-1):\n"
        "    options_token = '\\n\\n[Options]:'\n"
        "    split_token = '||||'\n"
        f"{preamble}"
        "    if task == 'VQA':\n"
        f"{body}",
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize(
    "expression",
    [
        "{question.upper()}",
        "{len(options)}",
        "{region[1:2]}",
        "{meta_data.method}",
        "{options[0] + options[1]}",
        "{__import__('os').getcwd()}",
    ],
)
def test_unsupported_expression_names_task_index_and_expression(tmp_path: Path, expression: str) -> None:
    path = branch_file(
        tmp_path, f'        instructs = [f"ok {{question}}",\n            f"x {expression} y"]\n'
    )
    with pytest.raises(TemplateError) as info:
        import_templates(path)
    assert str(info.value) == f"{path}:6: task VQA, template 1: unsupported expression {expression}"


@pytest.mark.parametrize("expression", ["{question!r}", "{question!s}", "{question:>10}", "{question!r:^9}"])
def test_conversion_or_format_spec_is_refused_and_named(tmp_path: Path, expression: str) -> None:
    path = branch_file(tmp_path, f'        instructs = [f"x {expression} y"]\n')
    with pytest.raises(TemplateError) as info:
        import_templates(path)
    assert str(info.value) == f"{path}:5: task VQA, template 0: unsupported expression {expression}"


def test_value_computed_by_unknown_code_is_refused(tmp_path: Path) -> None:
    path = branch_file(
        tmp_path, "        shout = question.upper()\n        instructs = [f'{shout}?', f'{question}']\n"
    )
    with pytest.raises(TemplateError) as info:
        import_templates(path)
    message = str(info.value)
    assert message.startswith(f"{path}:6: task VQA, template 0: {{shout}} uses 'shout'")


def test_changed_constant_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "instruction_templates.py"
    path.write_text(
        "def build_instruction(task, options=None):\n"
        "    split_token = ', '\n"
        "    if task == 'VQA':\n"
        "        instructs = [f'{split_token.join(options)}']\n",
        encoding="utf-8",
    )
    with pytest.raises(InputError) as info:
        import_templates(path)
    assert str(info.value) == f"{path}:2: constant split_token is ', '; instraug renders it as '||||'"


def test_instructs_that_is_not_a_list_literal_is_located(tmp_path: Path) -> None:
    path = branch_file(tmp_path, "        instructs = [f'{question}'] * 5\n")
    with pytest.raises(TemplateError) as info:
        import_templates(path)
    message = str(info.value)
    assert message.startswith(f"{path}:5: ") and "VQA" in message
    assert message.endswith("instructs is not a list literal")


def test_syntax_error_is_located(tmp_path: Path) -> None:
    path = branch_file(tmp_path, "        instructs = [f'{question}'\n")
    with pytest.raises(InputError) as info:
        import_templates(path)
    assert str(info.value).startswith(f"{path}:5: not valid Python: ")


def test_file_without_build_instruction(tmp_path: Path) -> None:
    path = tmp_path / "instruction_templates.py"
    path.write_text("def other(task):\n    return task\n", encoding="utf-8")
    with pytest.raises(InputError) as info:
        import_templates(path)
    assert str(info.value) == f"{path}: no top-level function build_instruction"


# --------------------------------------------------------------------------------------------
# Structures of the real upstream file


def test_options_preamble_before_the_task_chain_is_allowed(tmp_path: Path) -> None:
    """Upstream shuffles options and builds options_str in an `if options:` block before the chain."""
    preamble = (
        "    if options:\n"
        "        random.shuffle(options)\n"
        "        if use_natural == 'use_natural':\n"
        "            options_str = 'numbered'\n"
        "        else:\n"
        "            options_str = f'{options_token} {split_token.join(options)}'\n"
        "\n"
    )
    path = branch_file(tmp_path, "        instructs = [f'{question}{options_str}']\n", preamble=preamble)
    rows = import_templates(path)
    assert [(row.task, row.template) for row in rows] == [("VQA", "{question}{options_str}")]


def test_question_rewritten_only_for_numbered_instructions_is_allowed(tmp_path: Path) -> None:
    """Upstream commonsense_VQA rewrites `question` only when instruction_id >= 2 (never by default)."""
    path = tmp_path / "instruction_templates.py"
    path.write_text(
        "def build_instruction(task, options=None, question=None, meta_data=None, instruction_id=-1):\n"
        "    options_token = '\\n\\n[Options]:'\n"
        "    split_token = '||||'\n"
        "    if task == 'commonsense_VQA':\n"
        "        options_str = f'{options_token} {split_token.join(options)}'\n"
        "        region_info= ' '.join([ f\"{k} is in {v[0]}.\"  for k, v in "
        "meta_data['object_regions'].items()])\n"
        "        if instruction_id >=2:\n"
        "            for k, v in meta_data['object_regions'].items():\n"
        "                if k in question:\n"
        "                    question = question.replace(k, f\"the {k} in {' '.join(v)}\")\n"
        "        instructs = [\n"
        '            f"""{question} {region_info}{options_str}""",\n'
        '            f"""{question}{options_str}""",\n'
        "        ]\n",
        encoding="utf-8",
    )
    rows = import_templates(path)
    assert [row.template for row in rows] == [
        "{question} {region_info}{options_str}",
        "{question}{options_str}",
    ]


# --------------------------------------------------------------------------------------------
# templates.json: the same conversion as the syntax-tree reading


def _python_source_of(sets: list[dict[str, Any]]) -> str:
    """templates.json written back as an upstream-style build_instruction."""
    lines = [
        "def build_instruction(task, text=None, options=None, region=None, context=None,",
        "                      question=None, answer=None, meta_data=None):",
        "    image_token = 'image'",
        "    options_token = '\\n\\n[Options]:'",
        "    region_token = 'Regions: '",
        "    split_token = '||||'",
        "    region_split_token = '||||'",
    ]

    def f_string(body: str) -> str:
        return 'f"""' + body.replace("\\", "\\\\").replace('"', '\\"') + '"""'

    keyword = "if"
    by_task: dict[str, list[dict[str, Any]]] = {}
    for entry in sets:
        by_task.setdefault(entry["task"], []).append(entry)
    for task, entries in by_task.items():
        lines.append(f"    {keyword} task == {task!r}:")
        keyword = "elif"
        if entries[0]["variant"] is None:
            items = ", ".join(f_string(b) for b in entries[0]["templates"])
            lines.append(f"        instructs = [{items}]")
            continue
        for entry in entries:
            kind, _, cond = entry["variant"].partition(": ")
            lines.append(f"        if {cond}:" if kind == "if" else "        else:")
            items = ", ".join(f_string(b) for b in entry["templates"])
            lines.append(f"            instructs = [{items}]")
    return "\n".join(lines) + "\n"


def test_templates_json_and_python_source_import_alike(shared: Path, tmp_path: Path) -> None:
    sets = json.loads((shared / "templates.json").read_text(encoding="utf-8"))
    source = tmp_path / "instruction_templates.py"
    source.write_text(_python_source_of(sets), encoding="utf-8")
    from_json = import_templates(shared / "templates.json")
    from_python = import_templates(source)
    assert len(from_json) == sum(len(entry["templates"]) for entry in sets)
    assert [r.model_dump() for r in from_python] == [r.model_dump() for r in from_json]


def test_templates_json_keeps_the_literal_text(shared: Path) -> None:
    """Every converted template, rendered with each placeholder shown as its upstream expression,
    gives back the upstream body: only placeholders changed, never the text around them."""
    sets = json.loads((shared / "templates.json").read_text(encoding="utf-8"))
    rows = iter(import_templates(shared / "templates.json"))
    for entry in sets:
        for body in entry["templates"]:
            row = next(rows)
            parts = parse_template(row.template)
            text = "".join(p if isinstance(p, str) else "\0" for p in parts)
            expected = _strip_expressions(body)
            assert text == expected, row.instruction_id


def _strip_expressions(body: str) -> str:
    """An f-string body with each {expression} replaced by NUL and {{ }} unescaped."""
    out, i = [], 0
    while i < len(body):
        if body.startswith(("{{", "}}"), i):
            out.append(body[i])
            i += 2
        elif body[i] == "{":
            i = body.index("}", i) + 1
            out.append("\0")
        else:
            out.append(body[i])
            i += 1
    return "".join(out)

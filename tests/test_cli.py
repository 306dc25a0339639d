"""The command line: exit codes and the full text of every error a user can meet."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from helpers import pool_row, read_jsonl, write_jsonl
from typer.testing import Result

from instraug.cli import app
from instraug.config import Config, ExpansionConfig, load_config
from instraug.errors import InstraugError

REPO = Path(__file__).resolve().parent.parent
Cli = Callable[..., Result]

POOL = [
    pool_row("VQA", 0, '{question}{options_token} {options|join("||||")}'),
    pool_row("VQA", 1, "Question: {question}"),
    pool_row("VQA", 0, "Rephrased: {question}", origin="generated"),
    pool_row("image_caption", 0, "Describe the image."),
]


def vqa(i: int, **extra: Any) -> dict[str, Any]:
    fields = {"unique_id": f"u{i}", "task_name": "VQA", "question": f"q{i}?", "options": ["a", "b"]}
    return {**fields, "target_txt": "a", **extra}


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder with a pool; paths in messages are relative to it."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "pool.jsonl", POOL)
    return tmp_path


def error_of(result: Result) -> str:
    """The one line a failed command prints; nothing else on stdout or stderr, no traceback."""
    assert result.stdout == ""
    assert result.stderr.endswith("\n")
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.stderr.rstrip("\n")


def leftovers(folder: Path) -> list[str]:
    """Temporary files a writer may have left behind."""
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp"))


# --------------------------------------------------------------------------------------------
# Input errors: path:line and what is wrong


def test_malformed_json_line(cli: Cli, files: Path) -> None:
    (files / "train.jsonl").write_text(
        '{"task_name": "VQA", "question": "q", "target_txt": "a"}\n\n{"task_name": "VQA", "question": }\n',
        encoding="utf-8",
    )
    result = cli("assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-o", "out.jsonl")
    assert result.exit_code == 2
    assert error_of(result) == (
        "Error: train.jsonl:3: malformed JSON: unexpected character, expected a JSON value at column 34"
    )
    assert not (files / "out.jsonl").exists()


def test_malformed_json_in_the_pool(cli: Cli, files: Path) -> None:
    (files / "pool.jsonl").write_text('{"task": "VQA", "template": "x"\n', encoding="utf-8")
    write_jsonl(files / "train.jsonl", [vqa(0)])
    result = cli("assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-o", "out.jsonl")
    assert result.exit_code == 2
    assert error_of(result).startswith("Error: pool.jsonl:1: malformed JSON: ")


def test_line_that_is_not_an_object(cli: Cli, files: Path) -> None:
    write_jsonl(files / "train.jsonl", [vqa(0)])
    with open(files / "train.jsonl", "a", encoding="utf-8") as fp:
        fp.write('["VQA"]\n')
    result = cli("assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-o", "out.jsonl")
    assert result.exit_code == 2
    assert error_of(result) == "Error: train.jsonl:2: expected a JSON object, got list"


def test_missing_field_a_template_needs(cli: Cli, files: Path) -> None:
    bad = vqa(1)
    del bad["question"]
    write_jsonl(files / "train.jsonl", [vqa(0), bad])
    result = cli("assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-o", "out.jsonl", "--epsilon", "1")
    assert result.exit_code == 2
    assert error_of(result) == "Error: train.jsonl:2: task VQA: missing field 'question' needed by {question}"


def test_missing_field_in_render(cli: Cli, files: Path) -> None:
    bad = vqa(0)
    del bad["options"]
    write_jsonl(files / "train.jsonl", [bad])
    result = cli("render", "-t", "pool.jsonl", "-i", "train.jsonl", "-o", "out.jsonl")
    assert result.exit_code == 2
    assert error_of(result) == "Error: train.jsonl:1: task VQA: missing field 'options' needed by " + (
        '{options|join("||||")}'
    )


def test_task_with_no_templates(cli: Cli, files: Path) -> None:
    write_jsonl(files / "train.jsonl", [vqa(0), {"task_name": "GC", "region": ["r"], "target_txt": "t"}])
    result = cli("assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-o", "out.jsonl")
    assert result.exit_code == 2
    assert error_of(result) == "Error: train.jsonl:2: task 'GC' has no templates in the pool"


def test_instance_without_task_name(cli: Cli, files: Path) -> None:
    write_jsonl(files / "train.jsonl", [{"question": "q", "target_txt": "a"}])
    result = cli("assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-o", "out.jsonl")
    assert result.exit_code == 2
    assert error_of(result) == "Error: train.jsonl:1: instance has no task_name"


def test_pool_row_missing_a_field(cli: Cli, files: Path) -> None:
    rows = [POOL[0], {k: v for k, v in POOL[1].items() if k != "root_id"}]
    write_jsonl(files / "pool.jsonl", rows)
    write_jsonl(files / "train.jsonl", [vqa(0)])
    result = cli("assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-o", "out.jsonl")
    assert result.exit_code == 2
    assert error_of(result) == (
        "Error: pool.jsonl:2: root_id: missing "
        "(a pool row needs task, instruction_id, template, origin, root_id)"
    )


def test_pool_row_with_a_bad_template(cli: Cli, files: Path) -> None:
    write_jsonl(files / "pool.jsonl", [POOL[0], pool_row("VQA", 1, "Question: {question")])
    write_jsonl(files / "train.jsonl", [vqa(0)])
    result = cli("assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-o", "out.jsonl")
    assert result.exit_code == 2
    assert error_of(result) == (
        "Error: pool.jsonl:2: VQA/1: unmatched '{' at character 11 (write {{ for a literal brace)"
    )


def test_pool_template_joining_a_constant_is_an_error_not_a_crash(cli: Cli, files: Path) -> None:
    write_jsonl(files / "pool.jsonl", [pool_row("VQA", 0, '{question} {split_token|join(",")}')])
    write_jsonl(files / "train.jsonl", [vqa(0)])
    result = cli("assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-o", "out.jsonl")
    assert result.exit_code == 2
    assert error_of(result).startswith("Error: pool.jsonl:1: VQA/0: ")


def test_region_info_with_an_empty_region_list_is_an_error_not_a_crash(cli: Cli, files: Path) -> None:
    task = "visual_answer_justification"
    write_jsonl(files / "pool.jsonl", [pool_row(task, 0, "{region_info} {question}")])
    instance = {
        "task_name": task,
        "question": "q",
        "meta_data": {"object_regions": {"dog": []}},
        "target_txt": "a",
    }
    write_jsonl(files / "train.jsonl", [instance])
    result = cli("assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-o", "out.jsonl")
    assert result.exit_code == 2
    assert error_of(result).startswith(f"Error: train.jsonl:1: task {task}: ")


def test_duplicate_instruction_id(cli: Cli, files: Path) -> None:
    write_jsonl(files / "pool.jsonl", [POOL[0], POOL[1], POOL[0]])
    write_jsonl(files / "train.jsonl", [vqa(0)])
    result = cli("assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-o", "out.jsonl")
    assert result.exit_code == 2
    assert error_of(result) == "Error: pool.jsonl:3: duplicate instruction_id 'VQA/0' (first at pool.jsonl:1)"


# --------------------------------------------------------------------------------------------
# The importer


def test_import_unsupported_expression(cli: Cli, files: Path) -> None:
    (files / "instruction_templates.py").write_text(
        "def build_instruction(task, options=None, question=None):\n"
        "    options_token = '\\n\\n[Options]:'\n"
        "    if task == 'image_caption':\n"
        "        instructs = [f'Describe the image.']\n"
        "    elif task == 'VQA':\n"
        "        instructs = [\n"
        "            f'{question}',\n"
        "            f'{question} ({len(options)} options){options_token}',\n"
        "        ]\n",
        encoding="utf-8",
    )
    result = cli("import-templates", "instruction_templates.py", "-o", "templates.jsonl")
    assert result.exit_code == 2
    assert error_of(result) == (
        "Error: instruction_templates.py:8: task VQA, template 1: unsupported expression {len(options)}"
    )
    assert not (files / "templates.jsonl").exists()


def test_import_fixture_writes_the_pool(cli: Cli, files: Path, mini_templates: Path) -> None:
    result = cli("import-templates", mini_templates, "-o", "templates.jsonl")
    assert result.exit_code == 0, result.stderr
    rows = read_jsonl(files / "templates.jsonl")
    tasks = {row["task"] for row in rows}
    assert result.stderr == f"{len(rows)} templates of {len(tasks)} tasks -> templates.jsonl\n"
    assert result.stdout == ""


def test_import_to_stdout(cli: Cli, mini_templates: Path) -> None:
    result = cli("import-templates", mini_templates, "-q")
    assert result.exit_code == 0
    assert result.stderr == ""
    assert result.stdout.count("\n") == len(result.stdout.splitlines()) > 10


# --------------------------------------------------------------------------------------------
# Paths that cannot be read or written


NO_FILE = "cannot read: No such file or directory"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["assemble", "-p", "nope.jsonl", "-i", "train.jsonl"], f"Error: nope.jsonl: {NO_FILE}"),
        (
            ["assemble", "-p", "pool.jsonl", "-i", "nope.jsonl"],
            "Error: nope.jsonl: no such file or directory",
        ),
        (["assemble", "-p", "folder", "-i", "train.jsonl"], "Error: folder: cannot read: Is a directory"),
        (["render", "-t", "nope.jsonl", "-i", "train.jsonl"], f"Error: nope.jsonl: {NO_FILE}"),
        (["import-templates", "nope.py"], f"Error: nope.py: {NO_FILE}"),
        (["config", "check", "nope.yaml"], f"Error: nope.yaml: {NO_FILE}"),
        (
            ["assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-c", "nope.yaml"],
            f"Error: nope.yaml: {NO_FILE}",
        ),
    ],
)
def test_unreadable_path(cli: Cli, files: Path, args: list[str], message: str) -> None:
    write_jsonl(files / "train.jsonl", [vqa(0)])
    (files / "folder").mkdir()
    result = cli(*args, "-o", "out.jsonl") if args[0] != "config" else cli(*args)
    assert result.exit_code == 2
    assert error_of(result) == message
    assert not (files / "out.jsonl").exists()


def test_directory_without_instances(cli: Cli, files: Path) -> None:
    (files / "checkout").mkdir()
    result = cli("assemble", "-p", "pool.jsonl", "-i", "checkout", "-o", "out.jsonl")
    assert result.exit_code == 2
    assert error_of(result) == (
        "Error: checkout: no instances: expected training_data/*/train.jsonl or train.jsonl"
    )


def test_output_under_a_file(cli: Cli, files: Path) -> None:
    write_jsonl(files / "train.jsonl", [vqa(0)])
    (files / "afile").write_text("x", encoding="utf-8")
    result = cli("assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-o", "afile/out.jsonl")
    assert result.exit_code == 2
    assert error_of(result).startswith("Error: afile/out.jsonl: cannot write: ")


def test_output_that_is_a_directory(cli: Cli, files: Path) -> None:
    write_jsonl(files / "train.jsonl", [vqa(0)])
    (files / "outdir").mkdir()
    result = cli("assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-o", "outdir")
    assert result.exit_code == 2
    assert error_of(result).startswith("Error: outdir: cannot write: ")
    assert leftovers(files) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not stop root")
def test_output_in_a_read_only_folder(cli: Cli, files: Path) -> None:
    write_jsonl(files / "train.jsonl", [vqa(0)])
    (files / "ro").mkdir()
    (files / "ro").chmod(0o500)
    try:
        result = cli("assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-o", "ro/out.jsonl")
    finally:
        (files / "ro").chmod(0o700)
    assert result.exit_code == 2
    assert error_of(result) == "Error: ro/out.jsonl: cannot write: Permission denied"


# --------------------------------------------------------------------------------------------
# Atomic writes: a failed run leaves no output behind


def test_failure_mid_stream_writes_nothing(cli: Cli, files: Path) -> None:
    rows = [vqa(i) for i in range(5000)]
    del rows[4321]["question"]
    write_jsonl(files / "train.jsonl", rows)
    result = cli(
        "assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-o", "out/train.jsonl", "--epsilon", "1"
    )
    assert result.exit_code == 2
    assert (
        error_of(result) == "Error: train.jsonl:4322: task VQA: missing field 'question' needed by {question}"
    )
    assert not (files / "out" / "train.jsonl").exists()
    assert leftovers(files) == []


def test_failure_keeps_the_previous_output(cli: Cli, files: Path) -> None:
    write_jsonl(files / "train.jsonl", [vqa(0)])
    (files / "out.jsonl").write_text("previous\n", encoding="utf-8")
    with open(files / "train.jsonl", "a", encoding="utf-8") as fp:
        fp.write("{oops\n")
    result = cli("assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-o", "out.jsonl")
    assert result.exit_code == 2
    assert (files / "out.jsonl").read_text(encoding="utf-8") == "previous\n"
    assert leftovers(files) == []


def test_import_failure_writes_nothing(cli: Cli, files: Path) -> None:
    (files / "t.py").write_text(
        "def build_instruction(task, question=None):\n"
        "    if task == 'a':\n"
        "        instructs = [f'{question}']\n"
        "    elif task == 'b':\n"
        "        instructs = [f'{question!r}']\n",
        encoding="utf-8",
    )
    result = cli("import-templates", "t.py", "-o", "templates.jsonl")
    assert result.exit_code == 2
    assert not (files / "templates.jsonl").exists()
    assert leftovers(files) == []


# --------------------------------------------------------------------------------------------
# stdin / stdout, config and flags


def test_stdin_to_stdout(cli: Cli, files: Path) -> None:
    line = '{"task_name": "VQA", "question": "q", "options": ["a"], "target_txt": "a"}\n'
    lines = line * 3
    result = cli("assemble", "-p", "pool.jsonl", "-i", "-", "-q", input=lines)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert len(result.stdout.splitlines()) == 3


def test_config_supplies_epsilon_and_the_flag_overrides_it(cli: Cli, files: Path) -> None:
    write_jsonl(files / "train.jsonl", [vqa(i) for i in range(200)])
    (files / "c.yaml").write_text("assembly:\n  epsilon: 1.0\n  seed: 3\n", encoding="utf-8")
    result = cli("assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-o", "a.jsonl", "-c", "c.yaml")
    assert result.exit_code == 0, result.stderr
    assert {row["instruction_origin"] for row in read_jsonl(files / "a.jsonl")} == {"original"}
    args = ("assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-o", "b.jsonl", "-c", "c.yaml")
    result = cli(*args, "--epsilon", "0")
    assert result.exit_code == 0, result.stderr
    assert {row["instruction_origin"] for row in read_jsonl(files / "b.jsonl")} == {"generated"}
    assert result.stderr == "200 instances of 1 tasks -> b.jsonl (200 generated)\n"


def test_epsilon_out_of_range_is_a_usage_error(cli: Cli, files: Path) -> None:
    result = cli("assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-o", "out.jsonl", "--epsilon", "1.5")
    assert result.exit_code == 2
    assert result.stderr.startswith("Usage: instraug assemble [OPTIONS]")
    assert "'--epsilon'" in result.stderr
    assert not (files / "out.jsonl").exists()


def test_debug_reraises(cli: Cli, files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSTRAUG_DEBUG", "1")
    result = cli("assemble", "-p", "nope.jsonl", "-i", "train.jsonl")
    assert isinstance(result.exception, InstraugError)
    assert str(result.exception) == "nope.jsonl: cannot read: No such file or directory"


# --------------------------------------------------------------------------------------------
# Config errors


def write_config(folder: Path, text: str) -> str:
    (folder / "configs").mkdir(exist_ok=True)
    (folder / "configs" / "x.yaml").write_text(text, encoding="utf-8")
    return "configs/x.yaml"


def test_config_bound(cli: Cli, files: Path) -> None:
    path = write_config(files, "llm:\n  backend: local\nexpansion:\n  iterations: 2\n  factor: 0\n")
    result = cli("config", "check", path)
    assert result.exit_code == 2
    assert error_of(result) == "Error: configs/x.yaml:5: expansion.factor: must be ≥ 1"


def test_config_unknown_key(cli: Cli, files: Path) -> None:
    path = write_config(files, "# tuned\nexpansion:\n  factr: 2\n")
    result = cli("config", "check", path)
    assert result.exit_code == 2
    known = ", ".join(ExpansionConfig.model_fields)
    assert error_of(result) == (
        f"Error: configs/x.yaml:3: expansion.factr: unknown key (did you mean 'factor'?); known keys: {known}"
    )


def test_config_unknown_section(cli: Cli, files: Path) -> None:
    path = write_config(files, "assembly:\n  seed: 1\nassmbly:\n  seed: 2\n")
    result = cli("config", "check", path)
    assert result.exit_code == 2
    known = ", ".join(Config.model_fields)
    assert error_of(result) == (
        f"Error: configs/x.yaml:3: assmbly: unknown key (did you mean 'assembly'?); known keys: {known}"
    )


def test_bad_config_stops_assemble_before_writing(cli: Cli, files: Path) -> None:
    write_jsonl(files / "train.jsonl", [vqa(0)])
    path = write_config(files, "assembly:\n  epsilon: 2\n")
    result = cli("assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-o", "out.jsonl", "-c", path)
    assert result.exit_code == 2
    assert error_of(result) == "Error: configs/x.yaml:2: assembly.epsilon: must be ≤ 1.0"
    assert not (files / "out.jsonl").exists()


def test_config_check_prints_every_section_resolved(cli: Cli) -> None:
    path = REPO / "configs" / "default.yaml"
    result = cli("config", "check", path)
    assert result.exit_code == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert list(printed) == list(Config.model_fields)
    for section, field in Config.model_fields.items():
        assert list(printed[section]) == list(field.annotation.model_fields), section  # type: ignore[union-attr]
    assert Config.model_validate(printed) == load_config(path)


# --------------------------------------------------------------------------------------------
# Help


def command_paths() -> list[list[str]]:
    """Every command and group of the app, as the words that invoke it."""
    paths: list[list[str]] = []

    def walk(command: Any, prefix: list[str]) -> None:
        paths.append(prefix)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*prefix, name])

    walk(typer.main.get_command(app), [])
    return paths


def test_the_app_has_the_foundation_commands() -> None:
    names = {" ".join(p) for p in command_paths()}
    assert {"import-templates", "render", "assemble", "config", "config check"} <= names


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "instraug")
def test_every_command_has_help(cli: Cli, path: list[str]) -> None:
    result = cli(*path, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout
    assert result.stderr == ""


def test_version(cli: Cli) -> None:
    from instraug import __version__

    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout == f"instraug {__version__}\n"


def test_checkout_directory_reads_every_task_folder(cli: Cli, files: Path) -> None:
    """A MultiInstruct checkout: training_data/<task>/train.jsonl, task from the folder name."""
    for task, rows in (("VQA", [vqa(0), vqa(1)]), ("image_caption", [{"target_txt": "a cat"}])):
        folder = files / "checkout" / "training_data" / task
        folder.mkdir(parents=True)
        write_jsonl(folder / "train.jsonl", [{k: v for k, v in r.items() if k != "task_name"} for r in rows])
    result = cli("assemble", "-p", "pool.jsonl", "-i", "checkout", "-o", "out.jsonl")
    assert result.exit_code == 0, result.stderr
    out = read_jsonl(files / "out.jsonl")
    assert sorted(row["instruction_id"].split("/")[0] for row in out) == ["VQA", "VQA", "image_caption"]
    origins = Counter(row["instruction_origin"] for row in out)
    shown = ", ".join(f"{n} {k}" for k, n in sorted(origins.items()))
    assert result.stderr == f"3 instances of 2 tasks -> out.jsonl ({shown})\n"

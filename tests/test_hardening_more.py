"""More hardening: stage 1 with the server down, an empty or bad meta-prompts file, pydantic errors
worded once, and the temporary folders a killed `export --format hf` leaves."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fake_openai_server import Reply, ScriptedOpenAIServer, chat_body
from helpers import read_jsonl, write_jsonl
from llm_fixtures import child_env
from processes import Spawner, spawn_fixture  # noqa: F401 - the spawn fixture is found by its name
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from test_hardening_runs import EXAMPLE, closed_url, instraug, write_config
from typer.testing import Result

from instraug.errors import validation_reason

# --------------------------------------------------------------------------------------------
# instraug meta-prompts with the server down


def test_meta_prompts_with_the_server_down_is_exit_3_and_writes_nothing(tmp_path: Path) -> None:
    url, out = closed_url(), tmp_path / "meta_prompts.jsonl"
    out.write_text("precious\n")
    config, cache = write_config(tmp_path / "c.yaml", url), tmp_path / "c.sqlite"
    result = instraug("meta-prompts", "-c", config, "-o", out, "--cache", cache, "-q")
    assert result.exit_code == 3, result.stderr
    error = (
        rf"cannot reach {re.escape(url)}: 1 of 1 requests failed to connect \(connection after 2 attempts: "
        r"cannot reach the server: [^()]+\); start the server or check llm.base_url, then run again "
        r"\(answers so far are cached\)"
    )
    assert re.fullmatch(f"Error: {error}\n", result.stderr), result.stderr
    assert out.read_text() == "precious\n"  # no curated-only file that looks bootstrapped


def test_meta_prompts_with_the_server_up_bootstraps(tmp_path: Path) -> None:
    out = tmp_path / "meta_prompts.jsonl"
    with ScriptedOpenAIServer() as server:
        server.push(Reply(body=chat_body(["1. Use simpler words.\n2. Start with the verb."])))
        config = write_config(tmp_path / "c.yaml", server.url, meta_prompts={"merge": "replace"})
        result = instraug("meta-prompts", "-c", config, "-o", out, "--cache", tmp_path / "c.sqlite")
        assert len(server.requests) == 1
    assert result.exit_code == 0, result.stderr
    rows = read_jsonl(out)
    assert [(row["origin"], row["text"]) for row in rows] == [
        ("direct", rows[0]["text"]),
        ("bootstrap", "Use simpler words."),
        ("bootstrap", "Start with the verb."),
    ]
    assert f"3 meta-prompts (2 bootstrapped) -> {out}\n" in result.stderr


# --------------------------------------------------------------------------------------------
# instraug generate with no meta-prompts, or a bad one

EMPTY = "no meta-prompts: the file is empty; write it with `instraug meta-prompts`"


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    path = tmp_path / "templates.jsonl"
    assert instraug("import-templates", EXAMPLE / "instruction_templates.py", "-o", path).exit_code == 0
    return path


def generate(tmp_path: Path, templates: Path, metas: str | Path, input: str | None = None) -> Result:
    config = write_config(tmp_path / "c.yaml", closed_url())
    options = ["-t", templates, "-m", metas, "-c", config, "--cache", tmp_path / "c.sqlite"]
    return instraug("generate", *options, "-o", tmp_path / "generations.jsonl", input=input)


@pytest.mark.parametrize("content", ["", "\n  \n"], ids=["empty", "blank-lines"])
def test_generate_with_no_meta_prompts_is_exit_2_naming_the_file(
    tmp_path: Path, templates: Path, content: str
) -> None:
    metas = tmp_path / "meta_prompts.jsonl"
    metas.write_text(content)
    result = generate(tmp_path, templates, metas)
    assert result.exit_code == 2
    assert result.stderr == f"Error: {metas}: {EMPTY}\n"
    assert not (tmp_path / "generations.jsonl").exists()


def test_generate_with_no_meta_prompts_on_stdin(tmp_path: Path, templates: Path) -> None:
    result = generate(tmp_path, templates, "-", input="")
    assert result.exit_code == 2
    assert result.stderr == f"Error: <stdin>: {EMPTY}\n"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"id": "direct", "text": "Rewrite it."},
            "origin: missing (a meta-prompt row needs id, text, origin)",
        ),
        (
            {"id": "direct", "text": "Rewrite it.", "origin": "mine"},
            "origin: must be 'direct', 'bootstrap' or 'curated'",
        ),
        ({"id": "direct", "text": 7, "origin": "direct"}, "text: must be a valid string"),
        (
            {"id": "direct", "text": "Rewrite it.", "origin": "direct", "x": 1},
            "x: Extra inputs are not permitted",
        ),
    ],
    ids=["missing", "unknown-origin", "not-a-string", "unknown-key"],
)
def test_generate_with_a_bad_meta_prompt_row_names_the_line(
    tmp_path: Path, templates: Path, row: dict[str, Any], message: str
) -> None:
    good = {"id": "direct", "text": "Rewrite the instruction.", "origin": "direct"}
    metas = write_jsonl(tmp_path / "meta_prompts.jsonl", [good, row])
    result = generate(tmp_path, templates, metas)
    assert result.exit_code == 2
    assert result.stderr == f"Error: {metas}:2: {message}\n"
    assert not (tmp_path / "generations.jsonl").exists()


# --------------------------------------------------------------------------------------------
# validation_reason: pydantic's first error as `key.path: reason`


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^[a-z]+$")


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    count: int = 0
    items: list[Inner] = Field(default_factory=list)

    @model_validator(mode="after")
    def _not_both_empty(self) -> Outer:
        if not self.name and not self.items:
            raise ValueError("a name or an item is needed")
        return self


def reason(data: Any, missing: str | None = None) -> str:
    with pytest.raises(ValidationError) as error:
        Outer.model_validate(data)
    return validation_reason(error.value, missing)


@pytest.mark.parametrize(
    ("data", "missing", "expected"),
    [
        (
            {"name": "n", "items": [{"id": "ok"}, {"id": "Not OK"}]},
            None,
            "items.1.id: String should match pattern '^[a-z]+$'",
        ),
        (
            {"name": "n", "count": "many"},
            None,
            "count: must be a valid integer, unable to parse string as an integer",
        ),
        ({}, None, "name: Field required"),
        ({}, "missing (a row needs a name)", "name: missing (a row needs a name)"),
        ({"name": "n", "surprise": 1}, "missing (unused)", "surprise: Extra inputs are not permitted"),
        ({"name": ""}, None, "a name or an item is needed"),
    ],
    ids=[
        "nested-key-path",
        "must-be",
        "missing",
        "missing-worded",
        "other-errors-keep-their-words",
        "no-key",
    ],
)
def test_validation_reason(data: Any, missing: str | None, expected: str) -> None:
    assert reason(data, missing) == expected


# --------------------------------------------------------------------------------------------
# Temporary folders of a killed `instraug export --format hf`

needs_datasets = pytest.mark.skipif(
    importlib.util.find_spec("datasets") is None or importlib.util.find_spec("pyarrow") is None,
    reason="datasets is not installed (pip install 'instraug[hf]')",
)

#: An export that has started writing its folder and waits: prints the folder, then sleeps.
WRITER = """
import sys, time
from pathlib import Path
from instraug.export import _atomic_folder
with _atomic_folder(Path(sys.argv[1])) as tmp:
    (tmp / "part.arrow").write_bytes(b"half")
    print(tmp, flush=True)
    time.sleep(600)
"""

TRAIN_ROW = {"unique_id": "a", "task_name": "t", "prompt": "Say yes.", "target": "yes"}


def start_writer(spawn: Spawner, out: Path) -> tuple[subprocess.Popen[str], Path]:
    process = spawn(
        [sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE, text=True, env=child_env()
    )
    line = process.stdout.readline() if process.stdout else ""
    assert line, "the writer did not start"
    return process, Path(line.strip())


def leftovers(run: Path) -> set[str]:
    return {p.name for p in run.iterdir() if p.name.startswith(".train_hf.")}


@needs_datasets
def test_export_removes_the_temporary_folders_of_killed_exports_only(tmp_path: Path, spawn: Spawner) -> None:
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "train.jsonl", [TRAIN_ROW])
    out = run / "train_hf"
    killed, killed_folder = start_writer(spawn, out)
    running, running_folder = start_writer(spawn, out)
    killed.kill()
    assert killed.wait(timeout=30) < 0
    assert killed_folder.is_dir() and running_folder.is_dir()
    lock_of = {folder: folder.with_suffix("") for folder in (killed_folder, running_folder)}
    assert all(lock.is_file() for lock in lock_of.values())
    # Killed between moving the previous export aside and moving the new one in: its lock, unheld.
    swap_lock = run / ".train_hf.swapped0.tmp"
    swap_lock.touch()
    (run / ".train_hf.swapped0.tmp.old").mkdir()
    (run / ".train_hf.orphaned.tmp.d").mkdir()  # its lock file already removed
    # Earlier versions named the folder after the writer's pid: one gone, one still running.
    gone = spawn([sys.executable, "-c", "pass"])
    gone.wait(timeout=30)
    (run / f".train_hf.{gone.pid}.0123abcd.tmp").mkdir()
    (run / f".train_hf.{running.pid}.0123abcd.tmp").mkdir()

    result = instraug("export", run, "--format", "hf", "-q")
    assert result.exit_code == 0, result.stderr
    assert (out / "dataset_info.json").is_file()
    assert leftovers(run) == {
        running_folder.name,
        lock_of[running_folder].name,
        f".train_hf.{running.pid}.0123abcd.tmp",
    }
    assert (running_folder / "part.arrow").read_bytes() == b"half"
    assert running.poll() is None

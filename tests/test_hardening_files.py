"""Files a user can trust: no input destroyed, one stdin, exact JSON columns, modes, a closed stdout."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from helpers import pool_row, write_jsonl
from typer.testing import Result

from instraug.llm.cache import ResponseCache

Cli = Callable[..., Result]
REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "multiinstruct-mini"

POOL = [
    pool_row("VQA", 0, "{question}"),
    pool_row("VQA", 1, "Question: {question}"),
    pool_row("VQA", 0, "Please answer: {question}", origin="generated"),
]
GENERATION = {
    "template_id": "VQA/0",
    "task": "VQA",
    "root_id": "VQA/0",
    "parent_template": "Question: {question}",
    "root_template": "Question: {question}",
    "raw": "Answer this question: {A}",
}


def vqa(i: int) -> dict[str, str]:
    return {"unique_id": f"u{i}", "task_name": "VQA", "question": f"q{i}?", "target_txt": "a"}


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with a pool, instances, generations, a config and a cache; messages name paths in it."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "pool.jsonl", POOL)
    write_jsonl(tmp_path / "train.jsonl", [vqa(i) for i in range(3)])
    write_jsonl(tmp_path / "gen.jsonl", [GENERATION])
    write_jsonl(tmp_path / "meta.jsonl", [{"id": "direct", "text": "Rewrite it.", "origin": "direct"}])
    (tmp_path / "c.yaml").write_text("assembly:\n  seed: 3\n", encoding="utf-8")
    with ResponseCache(tmp_path / "c.sqlite"):
        pass
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "train.jsonl", [{**vqa(0), "prompt": "q0?"}])
    shutil.copy(EXAMPLE / "instruction_templates.py", tmp_path / "instruction_templates.py")
    return tmp_path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (symlinks by their target name)."""
    return {
        str(p.relative_to(folder)): os.readlink(p).encode() if p.is_symlink() else p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() or p.is_symlink()
    }


def error_of(result: Result) -> str:
    """The one line a refused command prints; nothing on stdout, no traceback."""
    assert result.stdout == ""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr.rstrip("\n")


# --------------------------------------------------------------------------------------------
# An output that is an input is refused before anything is written


CLASH = "the output is an input of this command"

CLASHES = [
    (
        ["assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-o", "train.jsonl"],
        f"Error: train.jsonl: {CLASH} (train.jsonl); choose another -o",
    ),
    (
        ["assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-o", "pool.jsonl"],
        f"Error: pool.jsonl: {CLASH} (pool.jsonl); choose another -o",
    ),
    (
        ["assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-c", "c.yaml", "-o", "c.yaml"],
        f"Error: c.yaml: {CLASH} (c.yaml); choose another -o",
    ),
    (
        ["render", "-t", "pool.jsonl", "-i", "train.jsonl", "-o", "train.jsonl"],
        f"Error: train.jsonl: {CLASH} (train.jsonl); choose another -o",
    ),
    (
        ["render", "-t", "pool.jsonl", "-i", "train.jsonl", "-o", "./run/../pool.jsonl"],
        f"Error: ./run/../pool.jsonl: {CLASH} (pool.jsonl); choose another -o",
    ),
    (
        ["filter", "gen.jsonl", "-t", "pool.jsonl", "-o", "gen.jsonl"],
        f"Error: gen.jsonl: {CLASH} (gen.jsonl); choose another -o",
    ),
    (
        ["filter", "gen.jsonl", "-t", "pool.jsonl", "-i", "train.jsonl", "-o", "train.jsonl"],
        f"Error: train.jsonl: {CLASH} (train.jsonl); choose another -o",
    ),
    (
        ["filter", "gen.jsonl", "-t", "pool.jsonl", "-o", "out.jsonl", "--rejected", "pool.jsonl"],
        f"Error: pool.jsonl: {CLASH} (pool.jsonl); choose another --rejected",
    ),
    (
        ["filter", "gen.jsonl", "-t", "pool.jsonl", "-o", "out.jsonl", "--rejected", "out.jsonl"],
        "Error: out.jsonl: --output and --rejected are the same file; choose another --rejected",
    ),
    (
        ["generate", "-t", "pool.jsonl", "-m", "meta.jsonl", "--cache", "c.sqlite", "-o", "pool.jsonl"],
        f"Error: pool.jsonl: {CLASH} (pool.jsonl); choose another -o",
    ),
    (
        ["generate", "-t", "pool.jsonl", "-m", "meta.jsonl", "--cache", "c.sqlite", "-o", "meta.jsonl"],
        f"Error: meta.jsonl: {CLASH} (meta.jsonl); choose another -o",
    ),
    (
        ["generate", "-t", "pool.jsonl", "-m", "meta.jsonl", "--cache", "new.sqlite", "-o", "new.sqlite"],
        f"Error: new.sqlite: {CLASH} (new.sqlite); choose another -o",
    ),
    (
        ["meta-prompts", "-c", "c.yaml", "-o", "c.yaml"],
        f"Error: c.yaml: {CLASH} (c.yaml); choose another -o",
    ),
    (
        ["import-templates", "instruction_templates.py", "-o", "instruction_templates.py"],
        f"Error: instruction_templates.py: {CLASH} (instruction_templates.py); choose another -o",
    ),
    (
        ["export", "run", "--format", "llava", "-o", "run/train.jsonl"],
        f"Error: run/train.jsonl: {CLASH} (run/train.jsonl); choose another -o",
    ),
    (
        ["cache", "export", "c.sqlite", "--cache", "c.sqlite"],
        f"Error: c.sqlite: {CLASH} (c.sqlite); choose another OUTPUT",
    ),
    (
        ["cache", "import", "gen.jsonl", "--cache", "gen.jsonl"],
        f"Error: gen.jsonl: {CLASH} (gen.jsonl); choose another --cache",
    ),
]


@pytest.mark.parametrize(
    ("args", "message"), CLASHES, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_an_output_that_is_an_input_is_refused(cli: Cli, work: Path, args: list[str], message: str) -> None:
    before = snapshot(work)
    result = cli(*args)
    assert result.exit_code == 2
    assert error_of(result) == message
    assert snapshot(work) == before  # the input unchanged, nothing written, no temporary left


def test_a_symlink_to_an_input_is_that_input(cli: Cli, work: Path) -> None:
    (work / "link.jsonl").symlink_to("train.jsonl")
    before = snapshot(work)
    result = cli("render", "-t", "pool.jsonl", "-i", "train.jsonl", "-o", "link.jsonl")
    assert result.exit_code == 2
    assert error_of(result) == f"Error: link.jsonl: {CLASH} (train.jsonl); choose another -o"
    assert snapshot(work) == before


def test_a_hard_link_to_an_input_is_that_input(cli: Cli, work: Path) -> None:
    os.link(work / "pool.jsonl", work / "same.jsonl")
    before = snapshot(work)
    result = cli("assemble", "-p", "pool.jsonl", "-i", "train.jsonl", "-o", "same.jsonl")
    assert result.exit_code == 2
    assert error_of(result) == f"Error: same.jsonl: {CLASH} (pool.jsonl); choose another -o"
    assert snapshot(work) == before


def test_an_instance_file_of_an_input_directory_is_an_input(cli: Cli, work: Path) -> None:
    shutil.copytree(EXAMPLE, work / "mi")
    write_jsonl(work / "pool.jsonl", POOL + [pool_row("GC", 0, "Describe {region[0]}.")])
    before = snapshot(work)
    out = "mi/training_data/GC/train.jsonl"
    result = cli("assemble", "-p", "pool.jsonl", "-i", "mi", "-o", out)
    assert result.exit_code == 2
    assert error_of(result) == f"Error: {out}: {CLASH} ({out}); choose another -o"
    assert snapshot(work) == before


def test_stdin_and_stdout_never_clash(cli: Cli, work: Path) -> None:
    instances = (work / "train.jsonl").read_text(encoding="utf-8")
    result = cli("render", "-t", "pool.jsonl", "-i", "-", "-o", "-", input=instances)
    assert result.exit_code == 0, result.stderr
    assert [orjson.loads(line)["prompt"] for line in result.stdout.splitlines()][:3] == [
        "q0?",
        "Question: q0?",
        "Please answer: q0?",
    ]


def test_devices_are_written_through_not_replaced(cli: Cli, work: Path) -> None:
    result = cli("filter", "gen.jsonl", "-t", "pool.jsonl", "-o", os.devnull, "--rejected", os.devnull)
    assert result.exit_code == 0, result.stderr
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


# --------------------------------------------------------------------------------------------
# stdin is one input


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["render", "-t", "-", "-i", "-"],
            "Error: --templates and --instances are both stdin (-): only one input can be read from stdin",
        ),
        (
            ["assemble", "-p", "-", "-i", "-"],
            "Error: --pool and --instances are both stdin (-): only one input can be read from stdin",
        ),
        (
            ["generate", "-t", "-", "-m", "-", "-i", "-"],
            "Error: --templates, --meta-prompts and --instances are all stdin (-): only one input can be "
            "read from stdin",
        ),
        (
            ["filter", "-", "-t", "-"],
            "Error: GENERATIONS and --templates are both stdin (-): only one input can be read from stdin",
        ),
    ],
)
def test_only_one_input_can_be_stdin(cli: Cli, work: Path, args: list[str], message: str) -> None:
    result = cli(*args, input=(work / "pool.jsonl").read_bytes())
    assert result.exit_code == 2
    assert error_of(result) == message


def test_import_templates_reads_python_from_stdin(cli: Cli, work: Path) -> None:
    from_file = cli("import-templates", "instruction_templates.py", "-o", "-")
    source = (work / "instruction_templates.py").read_text(encoding="utf-8")
    from_stdin = cli("import-templates", "-", "-o", "-", input=source)
    assert from_stdin.exit_code == 0, from_stdin.stderr
    assert from_stdin.stdout == from_file.stdout
    assert len(from_stdin.stdout.splitlines()) == 34


def test_import_templates_reads_templates_json_from_stdin(cli: Cli, work: Path) -> None:
    sets = [{"task": "VQA", "variant": None, "templates": ["Answer {question}", "Q: {question}"]}]
    result = cli("import-templates", "-", input=orjson.dumps(sets))
    assert result.exit_code == 0, result.stderr
    rows = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert [(r["template_id"], r["template"]) for r in rows] == [
        ("VQA/0", "Answer {question}"),
        ("VQA/1", "Q: {question}"),
    ]


def test_import_templates_names_stdin_in_errors(cli: Cli, work: Path) -> None:
    result = cli("import-templates", "-", "-o", "t.jsonl", input="def build_instruction(task:\n")
    assert result.exit_code == 2
    assert error_of(result) == "Error: <stdin>:1: not valid Python: '(' was never closed"
    assert not (work / "t.jsonl").exists()


# --------------------------------------------------------------------------------------------
# A malformed line names its own column


@pytest.mark.parametrize(
    "line",
    [
        '{"unique_id": "u9", "task_name": "VQA", "question": ',  # between tokens
        '{"unique_id": "u9", "task_name": "VQA", "question": "wh',  # inside a string
    ],
)
def test_a_truncated_line_names_the_column_where_it_ends(cli: Cli, work: Path, line: str) -> None:
    with open(work / "train.jsonl", "a", encoding="utf-8") as fp:
        fp.write(line + "\n")
    result = cli("render", "-t", "pool.jsonl", "-i", "train.jsonl", "-o", "out.jsonl")
    assert result.exit_code == 2
    assert error_of(result) == (
        f"Error: train.jsonl:4: malformed JSON: unexpected end of data at column {len(line) + 1}"
    )
    assert not (work / "out.jsonl").exists()


# --------------------------------------------------------------------------------------------
# Modes as a shell redirection gives them


@pytest.fixture
def umask_027() -> Iterator[None]:
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def test_a_new_output_gets_the_umask_mode_and_a_replaced_one_keeps_its_mode(
    cli: Cli, work: Path, umask_027: None
) -> None:
    assert cli("render", "-t", "pool.jsonl", "-i", "train.jsonl", "-o", "new.jsonl").exit_code == 0
    assert stat.S_IMODE(os.stat(work / "new.jsonl").st_mode) == 0o640
    (work / "old.jsonl").write_text("old\n")
    os.chmod(work / "old.jsonl", 0o604)
    assert cli("render", "-t", "pool.jsonl", "-i", "train.jsonl", "-o", "old.jsonl").exit_code == 0
    assert stat.S_IMODE(os.stat(work / "old.jsonl").st_mode) == 0o604
    assert (work / "old.jsonl").read_bytes() == (work / "new.jsonl").read_bytes()


def test_the_next_run_removes_what_a_killed_run_left(cli: Cli, work: Path) -> None:
    stale = work / ".out.jsonl.k1lled_9.tmp"
    stale.write_bytes(b'{"partial": ')
    other = work / ".train.jsonl.k1lled_9.tmp"  # another output's leftover: not this run's to judge
    other.write_bytes(b"")
    assert cli("render", "-t", "pool.jsonl", "-i", "train.jsonl", "-o", "out.jsonl").exit_code == 0
    assert not stale.exists()
    assert other.exists()


# --------------------------------------------------------------------------------------------
# A closed stdout ends a stream quietly


@pytest.mark.parametrize(
    "args",
    [
        ["render", "-t", "pool.jsonl", "-i", "big.jsonl"],
        ["assemble", "-p", "pool.jsonl", "-i", "big.jsonl", "-o", "-"],
    ],
)
def test_a_reader_that_stops_early_ends_the_command_quietly(work: Path, args: list[str]) -> None:
    # 20,000 instances: megabytes of output, far more than a pipe buffers
    write_jsonl(work / "big.jsonl", [vqa(i) for i in range(20_000)])
    env = {k: v for k, v in os.environ.items() if k != "INSTRAUG_DEBUG"}
    process = subprocess.Popen(
        [sys.executable, "-m", "instraug", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=work,
        env=env,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        first = process.stdout.readline()
        process.stdout.close()  # what `| head -1` does
        stderr = process.stderr.read()
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()  # type: ignore[union-attr]
    assert orjson.loads(first)["unique_id"] == "u0"
    assert (code, stderr.decode()) == (0, "")

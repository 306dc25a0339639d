"""The response cache: keys, durable commits, deterministic export, idempotent import, the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

import orjson
import pytest
from llm_fixtures import chat
from typer.testing import CliRunner

from instraug.cli import app
from instraug.llm.base import ChatRequest, keyed_fields, request_key
from instraug.llm.cache import ResponseCache

runner = CliRunner()


def fill(path: Path, count: int, model: str = "m") -> ResponseCache:
    cache = ResponseCache(path)
    for i in range(count):
        request = chat(f"prompt {i}")
        fields = keyed_fields(model, request, seed=i)
        cache.put(request_key(model, request, i), fields, f"text {i}", "stop", 5, i)
    return cache


def test_the_key_is_the_sha256_of_the_canonical_request() -> None:
    request = ChatRequest(
        messages=(("system", "Be brief."), ("user", "Rephrase: «{question}»")),
        temperature=0.7,
        top_p=0.9,
        max_tokens=64,
        stop=("\n\n",),
        sample_index=2,
        tag="not part of the key",
    )
    expected = {
        "max_tokens": 64,
        "messages": [["system", "Be brief."], ["user", "Rephrase: «{question}»"]],
        "model": "smol",
        "sample_index": 2,
        "seed": 99,
        "stop": ["\n\n"],
        "temperature": 0.7,
        "top_p": 0.9,
    }
    canonical = json.dumps(expected, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert request_key("smol", request, 99) == hashlib.sha256(canonical.encode()).hexdigest()


@pytest.mark.parametrize(
    "change",
    [
        {"messages": (("user", "other"),)},
        {"temperature": 0.8},
        {"top_p": 0.95},
        {"max_tokens": 65},
        {"stop": ("###",)},
        {"sample_index": 1},
    ],
)
def test_every_keyed_field_changes_the_key_and_the_tag_does_not(change: dict) -> None:
    base = chat("hello", tag="a")
    fields = {
        "messages": base.messages,
        "temperature": base.temperature,
        "top_p": base.top_p,
        "max_tokens": base.max_tokens,
        "stop": base.stop,
        "sample_index": base.sample_index,
    }
    changed = ChatRequest(**{**fields, **change})
    assert request_key("m", changed, 0) != request_key("m", base, 0)
    assert request_key("m", ChatRequest(**fields, tag="b"), 0) == request_key("m", base, 0)
    assert request_key("other-model", base, 0) != request_key("m", base, 0)
    assert request_key("m", base, 1) != request_key("m", base, 0)


def test_each_put_is_committed_at_once(tmp_path: Path) -> None:
    cache = fill(tmp_path / "c.sqlite", 3)
    # Another connection (another process after a crash) sees every row without a close or checkpoint.
    with sqlite3.connect(tmp_path / "c.sqlite") as other:
        assert other.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 3
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    hit = cache.get(request_key("m", chat("prompt 1"), 1))
    assert hit is not None and (hit.text, hit.finish_reason, hit.completion_tokens) == ("text 1", "stop", 1)
    assert cache.get("0" * 64) is None
    cache.close()


def test_export_is_sorted_and_deterministic_and_import_is_idempotent(tmp_path: Path) -> None:
    with fill(tmp_path / "a.sqlite", 5) as cache:
        rows = list(cache.export_rows())
    assert [r["key"] for r in rows] == sorted(r["key"] for r in rows)
    assert rows[0].keys() == {"key", "request", "text", "finish_reason", "usage", "created"}
    with ResponseCache(tmp_path / "b.sqlite") as copy:
        numbered = list(enumerate(rows, 1))
        assert copy.import_rows(numbered, "x.jsonl") == (5, 0)
        assert copy.import_rows(numbered, "x.jsonl") == (0, 5)
        assert list(copy.export_rows()) == rows


def test_import_rejects_a_row_whose_key_does_not_match_its_request(tmp_path: Path) -> None:
    with fill(tmp_path / "a.sqlite", 2) as cache:
        rows = list(cache.export_rows())
    rows[1]["request"]["temperature"] = 1.5
    with ResponseCache(tmp_path / "b.sqlite") as copy:
        with pytest.raises(Exception, match=r"x.jsonl:2: not a cache export row: 'key' does not match"):
            copy.import_rows(enumerate(rows, 1), "x.jsonl")
        assert len(copy) == 0  # nothing of a rejected file is kept


def test_cli_stats_export_import_round_trip(tmp_path: Path) -> None:
    fill(tmp_path / "a.sqlite", 4).close()
    result = runner.invoke(app, ["cache", "stats", "--cache", str(tmp_path / "a.sqlite")])
    assert result.exit_code == 0, result.output
    assert f"{tmp_path / 'a.sqlite'}: 4 responses" in result.output
    assert "m: 4 responses, tokens in/out 20/6" in result.output

    export = tmp_path / "out" / "cache.jsonl"
    exports = []
    for _ in range(2):
        result = runner.invoke(app, ["cache", "export", str(export), "--cache", str(tmp_path / "a.sqlite")])
        assert result.exit_code == 0, result.output
        exports.append(export.read_bytes())
    first = exports[0]
    assert exports[1] == first and len(first.splitlines()) == 4

    target = tmp_path / "b.sqlite"
    result = runner.invoke(app, ["cache", "import", str(export), "--cache", str(target)])
    assert result.exit_code == 0, result.output
    assert f"4 responses added to {target}, 0 already there" in result.output
    result = runner.invoke(app, ["cache", "import", str(export), "--cache", str(target)])
    assert f"0 responses added to {target}, 4 already there" in result.output
    runner.invoke(app, ["cache", "export", str(tmp_path / "again.jsonl"), "--cache", str(target)])
    assert (tmp_path / "again.jsonl").read_bytes() == first

    result = runner.invoke(app, ["cache", "stats", "--json", "--cache", str(target)])
    assert orjson.loads(result.output)["entries"] == 4


def test_cli_uses_llm_cache_path_from_the_config(tmp_path: Path) -> None:
    fill(tmp_path / "from-config.sqlite", 1).close()
    config = tmp_path / "c.yaml"
    config.write_text(f"llm:\n  cache_path: {tmp_path / 'from-config.sqlite'}\n")
    result = runner.invoke(app, ["cache", "stats", "-c", str(config)])
    assert result.exit_code == 0 and ": 1 responses" in result.output


def test_cli_errors_name_the_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["cache", "stats", "--cache", str(tmp_path / "missing.sqlite")])
    assert result.exit_code == 2
    assert f"Error: {tmp_path / 'missing.sqlite'}: no LLM cache here" in result.output
    assert not (tmp_path / "missing.sqlite").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": "x"}\n')
    result = runner.invoke(app, ["cache", "import", str(bad), "--cache", str(tmp_path / "c.sqlite")])
    assert result.exit_code == 2
    assert f"Error: {bad}:1: not a cache export row: 'request' must be an object" in result.output


def test_one_writer_at_a_time_and_readers_are_not_blocked(tmp_path: Path) -> None:
    from instraug.errors import InputError

    path = tmp_path / "cache.sqlite"
    with ResponseCache(path, writer=True) as writer:
        with pytest.raises(InputError) as caught:
            ResponseCache(path, writer=True)
        assert str(caught.value) == (
            f"{path}: another instraug run is using this LLM cache (pid {os.getpid()}); "
            "wait for it or choose another --cache"
        )
        writer.put("k", {"model": "m"}, "text", "stop", 1, 1)
        with ResponseCache(path) as reader:
            assert reader.get("k") is not None
    with ResponseCache(path, writer=True) as again:  # closing let the next writer in
        assert len(again) == 1

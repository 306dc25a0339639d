"""The caches' SQLite files: embedding keys stay what they were (so existing caches stay valid), and
each cache refuses the other's file before anything in it changes."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from instraug.config import SemanticConfig
from instraug.embedding_backends import EmbeddingBackend
from instraug.embeddings import Embedder, EmbeddingCache, embedding_key, unit
from instraug.errors import InputError
from instraug.llm.cache import ResponseCache

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXT = 'Décris l’{image} en une phrase — "court".\n'


def previous_embedding_key(model: str, text: str) -> str:
    """How embedding keys were computed when the first caches were written."""
    canonical = json.dumps(
        {"model": model, "text": text}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class RefusingBackend(EmbeddingBackend):
    """Fails the test if anything has to be embedded."""

    model_id = MODEL

    def embed(self, texts: Sequence[str]) -> list[Sequence[float]]:
        raise AssertionError(f"embedded {list(texts)} although the cache holds it")


@pytest.mark.parametrize("text", [TEXT, "", "plain ascii", "tab\tand \\ backslash"])
def test_embedding_keys_are_unchanged(text: str) -> None:
    assert embedding_key(MODEL, text) == previous_embedding_key(MODEL, text)
    assert embedding_key("other-model", text) != embedding_key(MODEL, text)


def test_a_vector_stored_under_the_previous_key_is_found(tmp_path: Path) -> None:
    path = tmp_path / "embeddings.sqlite"
    stored = unit([3.0, 4.0])
    cache = EmbeddingCache(path)
    cache.put_many(MODEL, [(previous_embedding_key(MODEL, TEXT), stored)])
    cache.close()
    with Embedder(RefusingBackend(SemanticConfig()), EmbeddingCache(path)) as embedder:
        [vector] = embedder.embed([TEXT])
        assert (list(vector), embedder.cache_hits, embedder.computed) == (list(stored), 1, 0)


def tables(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return sorted(name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))


@pytest.mark.parametrize(
    ("made_by", "opened_by", "what", "table"),
    [
        (ResponseCache, EmbeddingCache, "the embedding cache", "responses"),
        (EmbeddingCache, ResponseCache, "the LLM cache", "embeddings"),
    ],
)
def test_each_cache_refuses_the_other_s_file(
    made_by: type, opened_by: type, what: str, table: str, tmp_path: Path
) -> None:
    path = tmp_path / "cache.sqlite"
    made_by(path).close()
    with pytest.raises(InputError) as caught:
        opened_by(path)
    assert str(caught.value) == (
        f"{path}: cannot use it as {what}: it is an SQLite database with other tables ({table})"
    )
    assert tables(path) == [table]

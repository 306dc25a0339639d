"""Sentence embeddings for the stage-3 semantic rules: a SQLite cache in front of a backend.

`open_embedder(config)` gives an `Embedder`: texts in, unit vectors out. Every vector is cached
under sha256 of (model, text), in memory and in SQLite, so a text is embedded once per model,
ever. The backends (`sentence-transformers`, `openai`) are in `instraug.embedding_backends`.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from instraug.embedding_backends import EMBEDDING_BACKENDS, EmbeddingBackend, EmbeddingError
from instraug.errors import InputError
from instraug.rundir import DEFAULT_CACHE_PATH
from instraug.sqlite import key_of, open_wal_database

if TYPE_CHECKING:
    from instraug.config import SemanticConfig

#: Where embeddings are cached when `filters.semantic.cache_path` does not say.
DEFAULT_EMBEDDING_CACHE = DEFAULT_CACHE_PATH.parent / "embeddings.sqlite"

Vector = array  # array("f"): float32, unit length


# --------------------------------------------------------------------------------------------
# The cache

_SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    dim INTEGER NOT NULL,
    vector BLOB NOT NULL,
    created REAL NOT NULL
) WITHOUT ROWID
"""


def embedding_key(model: str, text: str) -> str:
    """sha256 of the canonical JSON of {model, text}."""
    return key_of({"model": model, "text": text})


class EmbeddingCache:
    """Unit vectors by key, float32, in SQLite (WAL); every put is its own committed transaction."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = open_wal_database(self.path, _SCHEMA, "the embedding cache")
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get_many(self, keys: Sequence[str]) -> dict[str, Vector]:
        found: dict[str, Vector] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                marks = ",".join("?" * len(chunk))
                for key, blob in self._db.execute(
                    f"SELECT key, vector FROM embeddings WHERE key IN ({marks})", chunk
                ):
                    vector = array("f")
                    vector.frombytes(blob)
                    found[key] = vector
        return found

    def put_many(self, model: str, items: Sequence[tuple[str, Vector]]) -> None:
        now = time.time()
        rows = [(key, model, len(vector), vector.tobytes(), now) for key, vector in items]
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("INSERT OR IGNORE INTO embeddings VALUES (?, ?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise InputError(f"cannot write to the embedding cache: {exc}", self.path) from None

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0])


# --------------------------------------------------------------------------------------------
# The front


def unit(values: Sequence[float]) -> Vector:
    """float32 copy scaled to length 1 (a zero vector stays zero)."""
    norm = math.sqrt(math.fsum(v * v for v in values))
    return array("f", (v / norm for v in values) if norm else values)


class Embedder:
    """Texts -> unit vectors through memory, then the SQLite cache, then the backend (in batches)."""

    def __init__(self, backend: EmbeddingBackend, cache: EmbeddingCache | None, batch_size: int = 64) -> None:
        self.backend = backend
        self.cache = cache
        self.batch_size = batch_size
        self.computed = 0  # texts the backend embedded
        self.cache_hits = 0  # texts found in the SQLite cache
        self._memory: dict[str, Vector] = {}

    @property
    def model(self) -> str:
        return self.backend.model_id

    def embed(self, texts: Sequence[str]) -> list[Vector]:
        """One unit vector per text, in order."""
        keys = [embedding_key(self.model, text) for text in texts]
        missing = list(dict.fromkeys(k for k in keys if k not in self._memory))
        if missing and self.cache is not None:
            found = self.cache.get_many(missing)
            self.cache_hits += len(found)
            self._memory.update(found)
            missing = [k for k in missing if k not in found]
        if missing:
            text_of = dict(zip(keys, texts, strict=True))
            for start in range(0, len(missing), self.batch_size):
                chunk = missing[start : start + self.batch_size]
                vectors = [unit(v) for v in self.backend.embed([text_of[k] for k in chunk])]
                self.computed += len(chunk)
                pairs = list(zip(chunk, vectors, strict=True))
                if self.cache is not None:
                    self.cache.put_many(self.model, pairs)
                self._memory.update(pairs)
        return [self._memory[k] for k in keys]

    def close(self) -> None:
        self.backend.close()
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_embedder(config: SemanticConfig, cache_path: str | Path | None = None) -> Embedder:
    """The embedder `filters.semantic` describes; cache: `cache_path`, else the config's, else the default."""
    try:
        backend_class = EMBEDDING_BACKENDS[config.backend]
    except KeyError:
        known = ", ".join(sorted(EMBEDDING_BACKENDS))
        raise EmbeddingError(
            f"filters.semantic.backend: unknown backend {config.backend!r} (known: {known})"
        ) from None
    backend = backend_class(config)
    path = cache_path or config.cache_path or DEFAULT_EMBEDDING_CACHE
    return Embedder(backend, EmbeddingCache(path), config.batch_size)

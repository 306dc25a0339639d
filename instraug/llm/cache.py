"""Content-addressed response cache: SQLite in WAL mode, one committed row per successful response."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instraug.errors import InputError

if TYPE_CHECKING:
    from instraug.llm.base import ChatRequest
    from instraug.locks import WriterLock


_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    request TEXT NOT NULL,
    text TEXT NOT NULL,
    finish_reason TEXT,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    created REAL NOT NULL
) WITHOUT ROWID
"""


def keyed_fields(model: str, request: ChatRequest, seed: int) -> dict[str, Any]:
    """Everything that determines a response, and nothing else."""
    return {
        "model": model,
        "messages": [[role, content] for role, content in request.messages],
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_tokens": request.max_tokens,
        "stop": list(request.stop),
        "seed": seed,
        "sample_index": request.sample_index,
    }


def canonical_json(fields: dict[str, Any]) -> str:
    """Sorted keys, no spaces, UTF-8 kept: the same request always gives the same bytes."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def key_of(fields: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of the keyed fields."""
    return hashlib.sha256(canonical_json(fields).encode("utf-8")).hexdigest()


def request_key(model: str, request: ChatRequest, seed: int) -> str:
    """The cache key of one request sent to `model` with `seed`."""
    return key_of(keyed_fields(model, request, seed))


@dataclass(frozen=True)
class CachedResponse:
    """A stored answer."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    created: float


def open_wal_database(path: Path, schema: str, what: str) -> sqlite3.Connection:
    """A SQLite file in WAL mode, autocommit, usable from several threads (callers lock).

    A database that holds other tables (another program's, or another instraug cache) is refused
    before anything in it changes.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA busy_timeout = 10000")
        _check_schema(db, schema, what, path)
        db.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode survives a killed process; only a power cut may lose the last commits.
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute(schema)
    except (OSError, sqlite3.Error) as exc:
        raise InputError(f"cannot open {what}: {exc}", path) from None
    return db


def _columns(db: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in db.execute(f"PRAGMA table_info({table!r})")]


def _check_schema(db: sqlite3.Connection, schema: str, what: str, path: Path) -> None:
    """Refuse a non-empty database whose table is missing or has other columns than `schema` makes."""
    tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    if not tables:
        return  # a new (or empty) file
    model = sqlite3.connect(":memory:")
    try:
        model.execute(schema)
        [table] = [name for (name,) in model.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        expected = _columns(model, table)
    finally:
        model.close()
    if table not in tables:
        raise InputError(
            f"cannot use it as {what}: it is an SQLite database with other tables "
            f"({', '.join(sorted(tables))})",
            path,
        )
    found = _columns(db, table)
    if found != expected:
        raise InputError(
            f"cannot use it as {what}: its table {table!r} has the columns ({', '.join(found)}), "
            f"not ({', '.join(expected)})",
            path,
        )


class ResponseCache:
    """Read and write cached responses; every put is its own committed transaction."""

    def __init__(self, path: str | Path, *, writer: bool = False) -> None:
        """Open the cache; a `writer` also holds CACHE.lock, so two runs never send a request twice."""
        self.path = Path(path)
        self._writer: WriterLock | None = None
        if writer:
            from instraug.locks import cache_lock

            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InputError(f"cannot open the LLM cache: {exc.strerror or exc}", self.path) from None
            self._writer = cache_lock(self.path)
            self._writer.acquire()
        try:
            # One connection shared by the caller's thread and the event-loop thread, behind a lock.
            self._db = open_wal_database(self.path, _SCHEMA, "the LLM cache")
        except BaseException:
            self._release()
            raise
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the database (and let the next writer in)."""
        with self._lock:
            self._db.close()
        self._release()

    def _release(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, key: str) -> CachedResponse | None:
        """The stored response for `key`, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT text, finish_reason, prompt_tokens, completion_tokens, created"
                " FROM responses WHERE key = ?",
                (key,),
            ).fetchone()
        return CachedResponse(*row) if row else None

    def get_many(self, keys: list[str]) -> dict[str, CachedResponse]:
        """The stored responses among `keys` (one query per few hundred keys)."""
        found: dict[str, CachedResponse] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    "SELECT key, text, finish_reason, prompt_tokens, completion_tokens, created"
                    f" FROM responses WHERE key IN ({marks})",
                    chunk,
                )
                found.update((key, CachedResponse(*rest)) for key, *rest in rows)
        return found

    def put(
        self,
        key: str,
        fields: dict[str, Any],
        text: str,
        finish_reason: str | None,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        """Store and commit one response (an existing entry is kept)."""
        row = (
            key,
            fields["model"],
            canonical_json(fields),
            text,
            finish_reason,
            prompt_tokens,
            completion_tokens,
            time.time(),
        )
        with self._lock:
            try:
                self._db.execute("INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
            except sqlite3.Error as exc:
                raise InputError(f"cannot write to the LLM cache: {exc}", self.path) from None

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def keys(self) -> set[str]:
        """Every stored key."""
        with self._lock:
            return {k for (k,) in self._db.execute("SELECT key FROM responses")}

    def stats(self) -> dict[str, Any]:
        """Entries, tokens and dates, overall and per model."""
        with self._lock:
            per_model = self._db.execute(
                "SELECT model, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), MIN(created),"
                " MAX(created) FROM responses GROUP BY model ORDER BY model"
            ).fetchall()
        models = {
            model: {"entries": n, "prompt_tokens": p or 0, "completion_tokens": c or 0}
            for model, n, p, c, _, _ in per_model
        }
        created = [t for row in per_model for t in row[4:6]]
        return {
            "path": str(self.path),
            "entries": sum(m["entries"] for m in models.values()),
            "prompt_tokens": sum(m["prompt_tokens"] for m in models.values()),
            "completion_tokens": sum(m["completion_tokens"] for m in models.values()),
            "oldest": min(created) if created else None,
            "newest": max(created) if created else None,
            "models": models,
        }

    def export_rows(self) -> Iterator[dict[str, Any]]:
        """Every entry as a JSON-ready row, in key order (the same cache always exports the same bytes)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, request, text, finish_reason, prompt_tokens, completion_tokens, created"
                " FROM responses ORDER BY key"
            ).fetchall()
        for key, request, text, finish_reason, prompt_tokens, completion_tokens, created in rows:
            yield {
                "key": key,
                "request": json.loads(request),
                "text": text,
                "finish_reason": finish_reason,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
                "created": created,
            }

    def import_rows(self, rows: Iterable[tuple[int, dict[str, Any]]], source: str) -> tuple[int, int]:
        """Add exported rows (numbered as read_jsonl yields them); return (added, already present)."""
        added = present = 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for line, row in rows:
                    values = _import_values(row, source, line)
                    cursor = self._db.execute(
                        "INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?)", values
                    )
                    if cursor.rowcount:
                        added += 1
                    else:
                        present += 1
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return added, present


def _import_values(row: dict[str, Any], source: str, line: int) -> tuple[Any, ...]:
    """Check one exported row (its key must match its request) and turn it into a table row."""

    def bad(reason: str) -> InputError:
        return InputError(f"not a cache export row: {reason}", source, line)

    request, usage = row.get("request"), row.get("usage")
    if not isinstance(request, dict) or not isinstance(request.get("model"), str):
        raise bad("'request' must be an object with a 'model'")
    if not isinstance(row.get("text"), str):
        raise bad("'text' must be a string")
    if not isinstance(usage, dict):
        raise bad("'usage' must be an object")
    tokens = (usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
    if not all(isinstance(t, int) and t >= 0 for t in tokens):
        raise bad("usage token counts must be non-negative integers")
    finish_reason = row.get("finish_reason")
    if finish_reason is not None and not isinstance(finish_reason, str):
        raise bad("'finish_reason' must be a string or null")
    created = row.get("created", time.time())
    if not isinstance(created, (int, float)):
        raise bad("'created' must be a number")
    key = key_of(request)
    if row.get("key") != key:
        raise bad(f"'key' does not match the request (expected {key})")
    return (key, request["model"], canonical_json(request), row["text"], finish_reason, *tokens, created)

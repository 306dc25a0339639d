"""Content-addressed response cache: SQLite in WAL mode, one committed row per successful response.

Storage only: a row is found by its key, the sha256 of the canonical JSON of the request it
answers; which fields make up a request, and so its key, is `instraug.llm.base`'s business.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instraug.errors import InputError
from instraug.sqlite import canonical_json, key_of, open_wal_database

if TYPE_CHECKING:
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


@dataclass(frozen=True)
class CachedResponse:
    """A stored answer."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    created: float


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
        """Store and commit one response to the request `fields` (an existing entry is kept)."""
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

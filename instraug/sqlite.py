"""The SQLite files of instraug's content-addressed caches (LLM responses, embeddings).

Both caches open their file the same way (WAL, autocommit, a foreign database refused) and key a
row by sha256 of the canonical JSON of what it answers.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from instraug.errors import InputError


def canonical_json(fields: dict[str, Any]) -> str:
    """Sorted keys, no spaces, UTF-8 kept: the same fields always give the same bytes."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def key_of(fields: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of `fields`."""
    return hashlib.sha256(canonical_json(fields).encode("utf-8")).hexdigest()


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

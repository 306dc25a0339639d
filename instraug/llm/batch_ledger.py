"""The ledger of submitted batches: CACHE.batches.json beside the response cache.

A batch is recorded before it is waited for and forgotten once its answers are cached, so a run
that was killed finds the batches it submitted and collects them instead of submitting anew.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from instraug.errors import InputError


def ledger_path(cache_path: str | Path) -> Path:
    """The batch ledger of a response cache: CACHE.batches.json beside it."""
    cache = Path(cache_path)
    return cache.with_name(cache.name + ".batches.json")


class BatchLedger:
    """The batches submitted and not yet collected, as JSON beside the response cache.

    Written (to a temporary file, then renamed) before a batch is waited for; the cache's writer lock
    (CACHE.lock), held by the session, keeps it to one run at a time. An entry holds the batch's
    custom_ids (the cache keys) so a later round can tell which of its requests it answers.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: list[dict[str, Any]] = []
        if path is not None and path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                self.entries = list(data["batches"])
                if not all(isinstance(e, dict) and isinstance(e.get("keys"), list) for e in self.entries):
                    raise ValueError
            except (OSError, ValueError, KeyError, TypeError):
                raise InputError(
                    "not an instraug batch ledger (a JSON object with a 'batches' list); "
                    "remove it to forget the batches it records",
                    path,
                ) from None

    def add(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)
        self._save()

    def update(self, entry: dict[str, Any], **values: Any) -> None:
        entry.update(values)
        self._save()

    def remove(self, entry: dict[str, Any]) -> None:
        if entry in self.entries:
            self.entries.remove(entry)
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        from instraug.jsonl import atomic_binary

        data = json.dumps({"batches": self.entries}, indent=1).encode("utf-8")
        with atomic_binary(self.path) as fp:
            fp.write(data)

"""The filter funnel: every reason code in funnel order, and the counts per code."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from instraug.records import Verdict

#: Every reason code, in the order the funnel reports them.
REASONS: tuple[str, ...] = (
    "failed_request",  # no reply: the request failed (raw is null or error is set)
    "duplicate_request",  # a second reply to a request already judged (same request_hash)
    "empty",  # nothing left once the chat around the reply is removed
    "bad_braces",  # braces that are neither mask tokens nor valid template syntax
    "mask_left",  # an {X} token that maps to no placeholder
    "placeholders",  # placeholders differ from the root template's (as a multiset)
    "length_ratio",  # not min_words <= words < max_length_ratio x words(parent)
    "identical",  # same as the root, the parent, an original of the task or an earlier keep
    "banned_pattern",  # a filters.banned_patterns regex matches
    "answer_like",  # an answer, a description or assistant talk instead of an instruction
    "render_fails",  # does not render on a sample instance of its task
    "semantic_drift",  # embedding similarity to the root below filters.semantic.min_similarity
    "near_copy",  # embedding similarity to the root at or above filters.semantic.max_similarity
    "near_duplicate",  # too close to an earlier kept rewrite of the same root (filters.near_duplicate)
)
REASON_ORDER: dict[str, int] = {reason: i for i, reason in enumerate(REASONS)}


@dataclass
class FilterSummary:
    """Counts for the funnel: each row is removed at its first reason, flagged by all of them."""

    generated: int = 0
    kept: int = 0
    flagged: Counter[str] = field(default_factory=Counter)
    removed: Counter[str] = field(default_factory=Counter)
    render_skipped: int = 0

    def add(self, verdict: Verdict) -> None:
        """Count one verdict."""
        self.generated += 1
        self.flagged.update(verdict.reasons)
        if verdict.reasons:
            self.removed[verdict.reasons[0]] += 1
        else:
            self.kept += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "generated": self.generated,
            "kept": self.kept,
            "removed": {r: self.removed[r] for r in REASONS if self.removed[r]},
            "flagged": {r: self.flagged[r] for r in REASONS if self.flagged[r]},
            "render_skipped": self.render_skipped,
        }

    def funnel(self) -> list[str]:
        """generated -> each rule -> kept, one line each."""
        lines = [f"{self.generated} generated"]
        left = self.generated
        width = max(len(r) for r in REASONS)
        for reason in REASONS:
            left -= self.removed[reason]
            removed, flagged = self.removed[reason], self.flagged[reason]
            lines.append(f"  {reason:<{width}}  -{removed:<6} -> {left:<6} (flagged {flagged})")
        share = f" ({100 * self.kept / self.generated:.1f}%)" if self.generated else ""
        lines.append(f"{self.kept} kept{share}")
        return lines

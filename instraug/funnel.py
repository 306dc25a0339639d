"""The filter funnel: every reason code in funnel order, the counts per code and task, the factor
achieved, and the cost formula: computed here once, rendered by the CLI, report.json and report.md."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instraug.errors import InputError
from instraug.jsonl import read_jsonl
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
    "control_token",  # a model's control token (<|im_end|>, <start_of_image>) in the reply
    "foreign_text",  # letters of another script, or words neither English nor the original's
    "example_copy",  # a run of words copied from the example turns of the request
    "meaning_flip",  # a contrast word of the original replaced by its opposite (least -> most)
    "answer_changed",  # a yes/no question where the original asks for something else
    "new_content",  # words the task's templates never use (filters.meaning.max_new_words)
    "content_lost",  # too few of the task's key words left (filters.meaning.min_key_words_kept)
    "render_fails",  # does not render on a sample instance of its task
    "semantic_drift",  # embedding similarity to the root below filters.semantic.min_similarity
    "near_copy",  # embedding similarity to the root at or above filters.semantic.max_similarity
    "near_duplicate",  # too close to an earlier kept rewrite of the same root (filters.near_duplicate)
    "judge",  # the LLM judge said the rewrite asks for another task (filters.judge)
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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FilterSummary:
        """The inverse of `as_dict`."""
        return cls(
            generated=int(data.get("generated", 0)),
            kept=int(data.get("kept", 0)),
            flagged=Counter(data.get("flagged") or {}),
            removed=Counter(data.get("removed") or {}),
            render_skipped=int(data.get("render_skipped", 0)),
        )


@dataclass
class RunFunnel:
    """The verdicts of a run, counted once: overall, per task, and the factor each task achieved.

    `instraug expand`'s summary, report.json and report.md all render this one object.
    """

    overall: FilterSummary = field(default_factory=FilterSummary)
    by_task: dict[str, FilterSummary] = field(default_factory=dict)
    roots: dict[str, set[str]] = field(default_factory=dict)  # task -> originals that were rephrased

    def add(self, task: str, root_id: str, verdict: Verdict) -> None:
        """Count one judged generation."""
        self.overall.add(verdict)
        self.by_task.setdefault(task, FilterSummary()).add(verdict)
        self.roots.setdefault(task, set()).add(root_id)

    @classmethod
    def read(cls, path: Path) -> RunFunnel:
        """Count the verdicts stage 2 recorded in a generations file (its `task`, `root_id`, `reasons`)."""
        funnel = cls()
        for line, row in read_jsonl(path):
            task, reasons = row.get("task"), row.get("reasons")
            if not isinstance(task, str) or not isinstance(reasons, list):
                raise InputError("a generation row needs a 'task' string and a 'reasons' list", path, line)
            unknown = [r for r in reasons if r not in REASON_ORDER]
            if unknown:
                known = ", ".join(REASONS)
                raise InputError(f"unknown reason code {unknown[0]!r} (known: {known})", path, line)
            verdict = Verdict(sorted(reasons, key=REASON_ORDER.__getitem__))
            funnel.add(task, str(row.get("root_id")), verdict)
        return funnel

    def achieved(self, target: int | None) -> dict[str, dict[str, Any]]:
        """Per rephrased task: originals rephrased, rewrites kept, kept per original, short of `target`."""
        out: dict[str, dict[str, Any]] = {}
        for task, summary in sorted(self.by_task.items()):
            roots = len(self.roots.get(task, ()))
            out[task] = {
                "templates_augmented": roots,
                "kept": summary.kept,
                "achieved_factor": round(summary.kept / roots, 3) if roots else 0.0,
                "target_factor": target,
                "short": target is not None and summary.kept < target * roots,
            }
        return out

    def as_dict(self) -> dict[str, Any]:
        """report.json's funnel, per-task funnel (first reason removes, every reason flags)."""
        return {
            "funnel": self.overall.as_dict(),
            "funnel_by_task": {task: s.as_dict() for task, s in sorted(self.by_task.items())},
        }


def cost(
    prompt_tokens: float, completion_tokens: float, price_in: float | None, price_out: float | None
) -> float | None:
    """USD for the tokens at the configured prices per 1,000 (None when no price is configured)."""
    if price_in is None and price_out is None:
        return None
    return prompt_tokens / 1000 * (price_in or 0.0) + completion_tokens / 1000 * (price_out or 0.0)

"""The labeled trial of the request shape `core` on the embedded model (tests/data/filter_trial.jsonl).

Every reply the filters without the meaning rules accepted (the paper's rules and the cleanup) was
read and labeled by hand: `faithful` when it asks for the same task, on the same inputs, with the
same expected answer, else `unfaithful`. Rows of set `tune` (two runs) chose the meaning rules and
filters.meaning.max_new_words; rows of set `fresh` come from a third run, on templates and a seed
none of the tuning runs used, labeled before being judged and never used to tune. Rows of source
`shared` are rephrasings of the upstream templates (../shared/multiinstruct/templates.json).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from instraug.config import MAX_NEW_WORDS_LOCAL, FilterConfig, MeaningConfig
from instraug.multiinstruct import import_templates
from instraug.stages.s1_meta_prompts import example_texts
from instraug.stages.s3_rules import RuleChain

HERE = Path(__file__).resolve().parent
ROWS = [json.loads(line) for line in (HERE / "data" / "filter_trial.jsonl").read_text().splitlines()]
MINI = HERE.parent / "examples" / "multiinstruct-mini" / "instruction_templates.py"
WITHOUT_MEANING = MeaningConfig(
    control_token=False,
    foreign_text=False,
    example_copy=False,
    meaning_flip=False,
    answer_changed=False,
    new_content=False,
    content_lost=False,
)
WITH_MEANING = MeaningConfig(max_new_words=MAX_NEW_WORDS_LOCAL)  # the embedded model's setting


@dataclass
class Score:
    kept: int
    faithful_kept: int
    faithful: int

    @property
    def precision(self) -> float:
        return self.faithful_kept / self.kept if self.kept else 0.0

    @property
    def recall(self) -> float:
        return self.faithful_kept / self.faithful


@pytest.fixture(scope="module")
def originals(shared: Path) -> dict[str, list[dict[str, Any]]]:
    return {
        "mini": [t.as_row() for t in import_templates(MINI)],
        "shared": [t.as_row() for t in import_templates(shared / "templates.json")],
    }


def score(rows: list[dict[str, Any]], meaning: MeaningConfig, originals: dict[str, Any]) -> Score:
    kept = faithful_kept = 0
    for source, templates in originals.items():
        chain = RuleChain(FilterConfig(meaning=meaning), originals=templates, examples=example_texts())
        for row in (r for r in rows if r["source"] == source):
            generation = {k: v for k, v in row.items() if k not in ("set", "run", "label", "source", "shape")}
            if chain.judge(generation).kept:
                kept += 1
                faithful_kept += row["label"] == "faithful"
    return Score(kept, faithful_kept, sum(r["label"] == "faithful" for r in rows))


def test_the_rows_the_filters_now_refuse_without_meaning_rules_are_all_unfaithful(
    originals: dict[str, Any],
) -> None:
    """Every labeled row passed the filters of its day; answer_like has grown since (first person,
    a stray leading label): what it now refuses must be junk."""
    assert {r["label"] for r in ROWS} == {"faithful", "unfaithful"}
    assert {r["set"] for r in ROWS} == {"tune", "fresh"}
    for name in ("tune", "fresh"):
        rows = [r for r in ROWS if r["set"] == name]
        now = score(rows, WITHOUT_MEANING, originals)
        assert now.faithful_kept == now.faithful  # nothing faithful refused
        assert now.kept <= len(rows)


@pytest.mark.parametrize("name", ["tune", "fresh"])
def test_the_meaning_rules_raise_precision(name: str, originals: dict[str, Any]) -> None:
    rows = [r for r in ROWS if r["set"] == name]
    as_labeled = Score(len(rows), *(sum(r["label"] == "faithful" for r in rows),) * 2)
    after = score(rows, WITH_MEANING, originals)
    assert after.precision > as_labeled.precision
    assert after.kept < as_labeled.kept


def test_on_the_tuning_set_every_faithful_reply_is_kept(originals: dict[str, Any]) -> None:
    """How max_new_words was chosen: the highest precision that keeps ≥ 0.9 of the faithful replies."""
    rows = [r for r in ROWS if r["set"] == "tune"]
    assert score(rows, WITH_MEANING, originals).recall >= 0.9
    stricter = MeaningConfig(max_new_words=MAX_NEW_WORDS_LOCAL - 1) if MAX_NEW_WORDS_LOCAL else None
    if stricter is not None:  # one word less would lose faithful replies
        assert score(rows, stricter, originals).recall < 0.9

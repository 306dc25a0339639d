"""`instraug report`: report.md numbers against a small hand-made run directory, with and without plots."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import read_jsonl, write_jsonl
from typer.testing import Result

from instraug import report_plots, run_facts
from instraug.errors import InputError
from instraug.funnel import REASONS
from instraug.llm.cache import ResponseCache
from instraug.report import write_report
from instraug.run_facts import (
    distinct_n,
    instruction_words,
    jaccard,
    length_histogram,
    mean_pairwise_jaccard,
    read_run,
)

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
needs_matplotlib = pytest.mark.skipif(
    not HAS_MATPLOTLIB, reason="matplotlib is not installed (pip install 'instraug[report]')"
)

ORIGINALS = [
    ("vqa", "vqa/0", "Answer the question {question} about the image."),
    ("vqa", "vqa/1", "{question} Look at the picture and answer."),
    ("caption", "caption/0", "Describe the image."),
    ("caption", "caption/1", "Write a short caption for this picture in one sentence please."),
    ("nli", "nli/0", "Does the image entail {text}?"),  # held out: never rephrased
]
KEPT = [  # (task, root, template)
    ("vqa", "vqa/0", "Look at the image and answer {question} now."),
    ("vqa", "vqa/0", "Please answer {question} using the image."),
    ("vqa", "vqa/1", "{question} Answer it from the picture."),
    ("caption", "caption/0", "Tell what the picture shows."),
]
REJECTED = [  # (task, root, reasons as the row stores them)
    ("vqa", "vqa/0", ["placeholders"]),
    ("vqa", "vqa/1", ["answer_like", "empty"]),  # out of rule order: removed by `empty`
    ("vqa", "vqa/1", ["identical"]),
    ("caption", "caption/0", ["empty"]),
    ("caption", "caption/1", ["length_ratio", "banned_pattern"]),
    ("caption", "caption/1", ["failed_request"]),
]


def generation(task: str, root: str, index: int, reasons: list[str], template: str | None) -> dict[str, Any]:
    return {
        "template_id": root,
        "task": task,
        "root_id": root,
        "parent_id": root,
        "iteration": 1,
        "raw": template,
        "candidate": template,
        "template": template,
        "request_hash": f"h{index}",
        "kept": not reasons,
        "reasons": reasons,
    }


def make_run(folder: Path, *, report_json: dict[str, Any] | None = None, train: bool = True) -> Path:
    """A run directory with every file `instraug expand` writes, except the cache."""
    folder.mkdir(parents=True, exist_ok=True)
    templates = [
        {"task": t, "instruction_id": i, "template": s, "origin": "original", "root_id": i, "parent_id": None}
        for t, i, s in ORIGINALS
    ]
    write_jsonl(folder / "templates.jsonl", templates)
    rows = [generation(t, r, n, [], s) for n, (t, r, s) in enumerate(KEPT)]
    rows += [generation(t, r, 100 + n, reasons, None) for n, (t, r, reasons) in enumerate(REJECTED)]
    write_jsonl(folder / "generations.jsonl", rows)
    generated = [
        {
            "task": t,
            "instruction_id": f"{t}/g{n}",
            "template": s,
            "origin": "generated",
            "root_id": r,
            "parent_id": r,
        }
        for n, (t, r, s) in enumerate(KEPT)
    ]
    write_jsonl(folder / "instructions.jsonl", templates + generated)
    if train:
        origins = ["original", "generated", "generated", "original", "generated"]
        write_jsonl(
            folder / "train.jsonl",
            [
                {"unique_id": f"u{n}", "prompt": "p", "target": "t", "instruction_origin": o}
                for n, o in enumerate(origins)
            ],
        )
    if report_json is not None:
        (folder / "report.json").write_text(json.dumps(report_json))
    return folder


LLM = {
    "requests": 12,
    "cache_hits": 2,
    "requests_sent": 10,
    "api_calls": 10,
    "retries": {"429": 3},
    "failures": 1,
    "truncated": 0,
    "prompt_tokens": 1234,
    "completion_tokens": 567,
    "cost": None,
}
REPORT_JSON = {"achieved_factor": {"vqa": {"target_factor": 2}}, "llm": LLM}


def table(markdown: str, heading: str, nth: int = 0) -> list[list[str]]:
    """The cells of the nth table after `heading` (header and rule rows dropped)."""
    section = markdown.split(heading + "\n", 1)[1].split("\n#", 1)[0]
    tables: list[list[list[str]]] = []
    previous = ""
    for line in section.splitlines():
        if line.startswith("|"):
            if not previous.startswith("|"):
                tables.append([])
            tables[-1].append([cell.strip() for cell in line.strip("|").split("|")])
        previous = line
    return tables[nth][2:]


def no_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every matplotlib import fail, as when the report extra is not installed."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)


# --------------------------------------------------------------------------------------------
# Measures


def test_instruction_words_count_each_placeholder_as_one_word() -> None:
    assert instruction_words("Answer {question} about the image's {meta_data.method}.") == [
        "answer",
        "{question}",
        "about",
        "the",
        "image's",
        "{meta_data.method}",
    ]
    assert instruction_words('{options|join(", ")}') == ['{options|join(", ")}']
    assert instruction_words("") == []


def test_distinct_n_by_hand() -> None:
    texts = [["a", "b", "a"], ["a", "b", "c"]]
    assert distinct_n(texts, 1) == 3 / 6  # a b c out of a b a a b c
    assert distinct_n(texts, 2) == 3 / 4  # (a b) (b a) (b c) out of (a b) (b a) (a b) (b c)
    assert distinct_n([["a"]], 2) is None
    assert distinct_n([], 1) is None


def test_pairwise_jaccard_by_hand() -> None:
    a, b, c = frozenset("xy"), frozenset("yz"), frozenset("xy")
    assert jaccard(a, b) == 1 / 3
    assert jaccard(frozenset(), frozenset()) == 1.0
    # pairs within a group only: (a, b) 1/3, (a, c) 1, (b, c) 1/3; the lone set forms no pair
    assert mean_pairwise_jaccard({"t": [a, b, c], "u": [a]}) == pytest.approx((1 / 3 + 1 + 1 / 3) / 3)
    assert mean_pairwise_jaccard({"u": [a]}) is None


def test_large_groups_are_sampled_with_a_fixed_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_facts, "MAX_PAIRS_PER_TASK", 10)
    sets = [frozenset({str(i), str(i % 3)}) for i in range(30)]
    first = mean_pairwise_jaccard({"t": sets})
    assert first == mean_pairwise_jaccard({"t": sets})
    assert first is not None and 0 <= first <= 1


# --------------------------------------------------------------------------------------------
# report.md against the run's files


def test_funnel_agrees_with_generations(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    markdown = write_report(run, plots=False).read_text()
    rows = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    first = Counter(min(r["reasons"], key=REASONS.index) for r in rows if r["reasons"])
    flagged = Counter(reason for r in rows for reason in r["reasons"])
    overall = table(markdown, "## Filter funnel")
    assert overall[0] == ["generated", "", str(len(rows)), ""]
    left = len(rows)
    for cells, reason in zip(overall[1:-1], REASONS, strict=True):
        left -= first[reason]
        assert cells == [reason, str(first[reason]), str(left), str(flagged[reason])]
    assert overall[-1] == ["kept", "", str(len(KEPT)), ""]
    assert left == len(KEPT)

    header = markdown.split("### Per task (removed by each rule)\n\n", 1)[1].splitlines()[0]
    used = [r for r in REASONS if first[r]]
    assert header == "| " + " | ".join(["task", "generated", *used, "kept", "kept %"]) + " |"
    per_task = {cells[0]: cells[1:] for cells in table(markdown, "### Per task (removed by each rule)")}
    assert set(per_task) == {"vqa", "caption"}  # nli has no generations
    for task, cells in per_task.items():
        of_task = [r for r in rows if r["task"] == task]
        removed = Counter(min(r["reasons"], key=REASONS.index) for r in of_task if r["reasons"])
        kept = sum(not r["reasons"] for r in of_task)
        assert cells == [
            str(len(of_task)),
            *(str(removed[r]) for r in used),
            str(kept),
            f"{100 * kept / len(of_task):.1f}%",
        ]
    idle = ", ".join(r for r in REASONS if not first[r])
    assert f"Rules that removed nothing: {idle}." in markdown


def test_expansion_factor_against_target(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", report_json=REPORT_JSON)
    markdown = write_report(run, plots=False).read_text()
    rows = {cells[0]: cells[1:] for cells in table(markdown, "## Expansion factor")}
    # originals, rephrased, kept, achieved, pool, status
    assert rows == {
        "caption": ["2", "2", "1", "0.50", "3", "short"],
        "nli": ["1", "0", "0", "", "1", "not rephrased"],
        "vqa": ["2", "2", "3", "1.50", "5", "short"],
    }
    assert "target: 2 kept rewrites per original template (expansion.factor)" in markdown


def test_target_factor_unknown_without_report_json(tmp_path: Path) -> None:
    markdown = write_report(make_run(tmp_path / "run"), plots=False).read_text()
    assert "Target expansion factor: unknown (report.json does not record expansion.factor)" in markdown
    statuses = {cells[0]: cells[-1] for cells in table(markdown, "## Expansion factor")}
    assert statuses == {"caption": "unknown", "nli": "not rephrased", "vqa": "unknown"}
    assert "No LLM use recorded in report.json" in markdown
    assert "No cache.sqlite in the run directory" in markdown


def test_length_histogram_counts(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    facts = read_run(run)
    original = [len(instruction_words(t)) for _task, _id, t in ORIGINALS]
    generated = [len(instruction_words(t)) for _task, _root, t in KEPT]
    assert sorted(facts.original.lengths) == sorted(original) == [3, 5, 7, 7, 11]
    assert sorted(facts.generated.lengths) == sorted(generated) == [5, 6, 6, 8]
    labels, counts = length_histogram(facts)
    assert labels == ["0–4", "5–9", "10–14"]
    assert counts == {"original": [1, 3, 1], "generated": [0, 4, 0]}
    markdown = write_report(run, plots=False).read_text()
    assert table(markdown, "## Instruction length (words)", 1) == [
        ["0–4", "1 (20.0%)", "0 (0.0%)"],
        ["5–9", "3 (60.0%)", "4 (100.0%)"],
        ["10–14", "1 (20.0%)", "0 (0.0%)"],
    ]
    stats = {cells[0]: cells[1:] for cells in table(markdown, "## Instruction length (words)")}
    assert stats == {"original": ["5", "6.6", "7", "3", "11"], "generated": ["4", "6.2", "6", "5", "8"]}


def test_diversity_table(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    markdown = write_report(run, plots=False).read_text()
    words = {
        "original": [instruction_words(t) for _task, _id, t in ORIGINALS],
        "generated": [instruction_words(t) for _task, _root, t in KEPT],
    }
    rows = {cells[0]: cells[1:] for cells in table(markdown, "## Lexical diversity")}
    for name, texts in words.items():
        count, total, d1, d2, _similarity = rows[name]
        assert (count, total) == (str(len(texts)), str(sum(map(len, texts))))
        assert (d1, d2) == (f"{distinct_n(texts, 1):.3f}", f"{distinct_n(texts, 2):.3f}")
    originals = {i: frozenset(instruction_words(t)) for _task, i, t in ORIGINALS}
    to_root = [jaccard(frozenset(instruction_words(t)), originals[root]) for _task, root, t in KEPT]
    assert f"Mean Jaccard of a generated instruction to its original: {sum(to_root) / 4:.3f}." in markdown


def test_llm_use_and_cache(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", report_json=REPORT_JSON)
    with ResponseCache(run / "cache.sqlite") as cache:
        for n in range(3):
            cache.put(f"k{n}", {"model": "m"}, "text", "stop", 10, 4)
    markdown = write_report(run, plots=False).read_text()
    llm = dict(table(markdown, "## LLM use"))
    assert llm["requests"] == "12" and llm["cache hits"] == "2" and llm["requests sent"] == "10"
    assert llm["retries"] == "429 3" and llm["failures"] == "1"
    assert llm["prompt tokens"] == "1234" and llm["completion tokens"] == "567"
    assert llm["cost"].startswith("not priced")
    assert table(markdown, "## LLM use", 1) == [["m", "3", "30", "12"], ["all", "3", "30", "12"]]


def test_summary_lines(tmp_path: Path) -> None:
    markdown = write_report(make_run(tmp_path / "run"), plots=False).read_text()
    assert "- Original templates: 5 in 3 tasks\n" in markdown
    assert "- LLM rewrites judged: 10; kept: 4 (40.0%)\n" in markdown
    assert "- Instruction pool: 5 original + 4 generated = 9\n" in markdown
    assert (
        "- Training instances: 5; instruction origin: generated 3 (60.0%), original 2 (40.0%)\n" in markdown
    )
    no_train = write_report(make_run(tmp_path / "bare", train=False), plots=False).read_text()
    assert "- Training set: no train.jsonl\n" in no_train


def test_complete_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_matplotlib(monkeypatch)
    run = make_run(tmp_path / "run", report_json=REPORT_JSON)
    markdown = write_report(run).read_text()
    assert (
        "Plots: not drawn, they need matplotlib, the report extra: `pip install 'instraug[report]'`."
        in markdown
    )
    assert "![" not in markdown
    assert not (run / "report").exists()
    for heading in (
        "## Summary",
        "## Filter funnel",
        "### Per task (removed by each rule)",
        "## Expansion factor",
        "## Instruction length (words)",
        "## Lexical diversity",
        "## LLM use",
    ):
        assert heading in markdown
    # the same tables as a run that may draw plots, only without the image links and with the note
    plain = write_report(run, plots=False).read_text()
    assert markdown.replace(markdown.split("\n\n")[3], "Plots: not drawn (turned off).") == plain


def test_same_run_directory_same_bytes(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", report_json=REPORT_JSON)
    first = write_report(run, plots=HAS_MATPLOTLIB).read_bytes()
    pngs = {p.name: p.read_bytes() for p in (run / "report").glob("*.png")}
    assert write_report(run, plots=HAS_MATPLOTLIB).read_bytes() == first
    assert {p.name: p.read_bytes() for p in (run / "report").glob("*.png")} == pngs
    assert str(tmp_path) not in first.decode()  # the run's name, not where it lives


@needs_matplotlib
def test_plots_are_drawn_and_linked(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", report_json=REPORT_JSON)
    markdown = write_report(run).read_text()
    for name in ("funnel", "factor", "lengths"):
        png = run / "report" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{name}](report/{name}.png)" in markdown
    assert "Plots: not drawn" not in markdown


@needs_matplotlib
def test_a_report_of_an_unchanged_run_redraws_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run(tmp_path / "run", report_json=REPORT_JSON)
    first = write_report(run).read_bytes()
    drawn: list[str] = []
    real = report_plots.draw_plots
    monkeypatch.setattr(
        report_plots, "draw_plots", lambda facts, folder: drawn.append("x") or real(facts, folder)
    )
    assert write_report(run).read_bytes() == first
    assert drawn == []  # nothing the plots show changed
    rows = read_jsonl(run / "generations.jsonl")
    write_jsonl(run / "generations.jsonl", rows[:-1])
    write_report(run)
    assert drawn == ["x"]  # the funnel changed: drawn again
    (run / "report" / "factor.png").unlink()
    write_jsonl(run / "generations.jsonl", rows[:-1])
    write_report(run)
    assert drawn == ["x", "x"] and (run / "report" / "factor.png").is_file()  # a plot went missing


def test_errors_name_the_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"not a run directory: no templates.jsonl"):
        write_report(tmp_path)
    run = make_run(tmp_path / "run")
    with open(run / "generations.jsonl", "a") as fp:
        fp.write(json.dumps(generation("vqa", "vqa/0", 999, ["too_long"], None)) + "\n")
    with pytest.raises(InputError) as error:
        write_report(run, plots=False)
    assert str(error.value) == (
        f"{run / 'generations.jsonl'}:11: unknown reason code 'too_long' (known: {', '.join(REASONS)})"
    )
    assert not (run / "report.md").exists()


def test_cli_report(tmp_path: Path, cli: Callable[..., Result], monkeypatch: pytest.MonkeyPatch) -> None:
    no_matplotlib(monkeypatch)
    run = make_run(tmp_path / "run")
    result = cli("report", run)
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith(f"report: {run / 'report.md'}\n")
    assert (run / "report.md").is_file()
    missing = cli("report", tmp_path / "nowhere")
    assert missing.exit_code == 2
    reason = "not a run directory: no templates.jsonl (run `instraug expand` first)"
    assert missing.stderr == f"Error: {tmp_path / 'nowhere'}: {reason}\n"


def drop_generated_instructions(run: Path) -> None:
    pool = [json.loads(line) for line in (run / "instructions.jsonl").read_text().splitlines()]
    write_jsonl(run / "instructions.jsonl", [row for row in pool if row["origin"] == "original"])


def test_a_run_that_kept_nothing_gets_a_complete_report(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    rows = [generation("vqa", "vqa/0", n, ["banned_pattern"], None) for n in range(3)]
    write_jsonl(run / "generations.jsonl", rows)
    drop_generated_instructions(run)
    markdown = write_report(run, plots=False).read_text()
    assert "- LLM rewrites judged: 3; kept: 0 (0.0%)\n" in markdown
    stats = {cells[0]: cells[1:] for cells in table(markdown, "## Instruction length (words)")}
    assert stats["generated"] == ["0", "n/a", "n/a", "n/a", "n/a"]
    rows_ = {cells[0]: cells[1:] for cells in table(markdown, "## Lexical diversity")}
    assert rows_["generated"] == ["0", "0", "n/a", "n/a", "n/a"]
    assert "Mean Jaccard of a generated instruction to its original: n/a." in markdown


def test_the_outcome_of_the_run_heads_the_report(tmp_path: Path) -> None:
    outcome = {"status": "completed", "exit_code": 0, "message": "No rephrasing was kept: all 3 rewrites"}
    run = make_run(tmp_path / "run", report_json={**REPORT_JSON, "outcome": outcome})
    markdown = write_report(run, plots=False).read_text()
    assert markdown.startswith(f"# instraug run report: run\n\nOutcome: {outcome['message']}\n\n## Summary\n")


def test_a_run_stopped_by_an_error_reports_what_each_stage_did(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    summary = {
        "outcome": {"status": "failed", "exit_code": 3, "message": "The LLM could not be used: it is down"},
        "stages": {"templates": "ran", "meta_prompts": "failed", "generations": "not run"},
        "llm": LLM,
    }
    markdown = write_report(run, plots=False, summary=summary).read_text()
    assert json.loads((run / "report.json").read_text()) == summary
    assert markdown.startswith(
        "# instraug run report: run\n\nOutcome: The LLM could not be used: it is down\n\n## Stages\n"
    )
    assert table(markdown, "## Stages") == [
        ["templates", "ran"],
        ["meta_prompts", "failed"],
        ["generations", "not run"],
    ]
    assert dict(table(markdown, "## LLM use"))["failures"] == "1"
    assert "## Filter funnel" not in markdown
    assert write_report(run, plots=False).read_text() == markdown  # `instraug report` says the same


def test_a_report_that_cannot_be_written_leaves_no_report_md_of_an_earlier_run(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", report_json=REPORT_JSON)
    write_report(run, plots=False)
    old_json = (run / "report.json").read_bytes()
    with open(run / "generations.jsonl", "a") as fp:
        fp.write("{not json\n")
    with pytest.raises(InputError):
        write_report(run, plots=False, summary={**REPORT_JSON, "outcome": {"status": "completed"}})
    assert not (run / "report.md").exists()
    assert (run / "report.json").read_bytes() == old_json  # neither file describes the new run


@needs_matplotlib
def test_plots_of_an_earlier_run_are_removed_when_not_drawn_again(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", report_json=REPORT_JSON)
    write_report(run)
    assert (run / "report" / "funnel.png").is_file()
    write_jsonl(run / "generations.jsonl", [])
    drop_generated_instructions(run)
    markdown = write_report(run).read_text()
    assert sorted(p.name for p in (run / "report").iterdir()) == ["lengths.png"]
    assert "![funnel]" not in markdown and "![lengths](report/lengths.png)" in markdown


def test_the_report_shows_kept_and_rejected_examples_per_task(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", report_json=REPORT_JSON)
    rows = read_jsonl(run / "generations.jsonl")
    odd = generation("vqa", "vqa/0", 900, ["placeholders", "answer_like"], "It is {A} | red\nok")
    write_jsonl(run / "generations.jsonl", [odd, *rows])
    markdown = write_report(run, plots=False).read_text()
    section = markdown.split("## Examples per task\n", 1)[1].split("\n## ", 1)[0]
    originals = {i: s for _t, i, s in ORIGINALS}
    for task in sorted({t for t, _r, _s in KEPT}):
        shown = [(r, s) for t, r, s in KEPT if t == task][:3]
        body = section.split(f"### {task}\n", 1)[1].split("\n### ", 1)[0]
        for root, text in shown:
            assert f"| {originals[root]} | {text} |" in body.replace("\\|", "|").replace("⏎", "\n")
    vqa = section.split("### vqa\n", 1)[1].split("\n### ", 1)[0]
    assert (
        "| It is {A} \\| red⏎ok | placeholders, answer_like |" in vqa
    )  # a pipe or line break stays in its cell
    assert "| (no reply) | placeholders |" in vqa  # a rejected row without text
    assert (
        len([line for line in vqa.splitlines() if line.startswith("| ") and "rewrite" not in line])
        == 2 + 3 + 3
    )

"""The PNG plots of report.md (funnel, factor, lengths), drawn with matplotlib (the report extra)
only when what they show changed."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from instraug.funnel import REASONS
from instraug.jsonl import atomic_binary
from instraug.run_facts import RunFacts, length_histogram
from instraug.rundir import PLOTS

PLOT_NAMES = ("funnel", "factor", "lengths")
PLOTS_DIR = PLOTS


# --------------------------------------------------------------------------------------------
# Plots (matplotlib, the report extra)


PLOTS_STAMP = ".instraug-plots.json"  # beside the plots folder: what its PNGs were drawn from


def draw_plots_once(facts: RunFacts, folder: Path) -> dict[str, str]:
    """The plots of `facts`, drawn only when what they show changed since they were last drawn.

    A re-run of an up-to-date run directory redraws nothing (drawing takes seconds).
    """
    from instraug import __version__

    lengths = facts.lengths()
    key = hashlib.sha256(
        orjson.dumps(
            [
                __version__,
                facts.verdicts.as_dict(),
                facts.verdicts.achieved(facts.target_factor),
                facts.target_factor,
                lengths,
            ],
            option=orjson.OPT_SORT_KEYS,
        )
    ).hexdigest()
    stamp = folder.parent / PLOTS_STAMP
    with contextlib.suppress(OSError, ValueError):
        recorded = json.loads(stamp.read_text(encoding="utf-8"))
        drawn = recorded.get("drawn") if recorded.get("key") == key else None
        if isinstance(drawn, dict) and all((folder.parent / str(p)).is_file() for p in drawn.values()):
            return {str(k): str(v) for k, v in drawn.items()}
    images = draw_plots(facts, folder)
    with atomic_binary(stamp) as fp:
        fp.write(orjson.dumps({"key": key, "drawn": images}, option=orjson.OPT_SORT_KEYS))
    return images


def draw_plots(facts: RunFacts, folder: Path) -> dict[str, str]:
    """funnel.png, factor.png and lengths.png in `folder`; name -> path relative to the run dir."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # ImportError without the extra
    from matplotlib.figure import Figure

    def figure(width: float, height: float) -> tuple[Figure, Any]:
        fig = Figure(figsize=(width, height))
        FigureCanvasAgg(fig)
        return fig, fig.add_subplot()

    def save(fig: Figure, name: str) -> str:
        fig.tight_layout()
        with atomic_binary(folder / f"{name}.png") as fp:
            fig.savefig(fp, format="png", dpi=100, metadata={"Software": None})
        return f"{PLOTS_DIR}/{name}.png"

    drawn: dict[str, str] = {}
    tasks = sorted(facts.funnel_by_task)
    if tasks:
        fig, ax = figure(9, 1.4 + 0.45 * len(tasks))
        segments = [("kept", [facts.funnel_by_task[t].kept for t in tasks])]
        segments += [(r, [facts.funnel_by_task[t].removed[r] for t in tasks]) for r in REASONS]
        left = [0] * len(tasks)
        for i, (label, values) in enumerate(segments):
            if any(values):
                ax.barh(tasks, values, left=left, label=label, color=_PALETTE[i % len(_PALETTE)])
                left = [a + b for a, b in zip(left, values, strict=True)]
        ax.invert_yaxis()
        ax.set_title("Filter funnel per task")
        ax.set_xlabel("LLM rewrites: kept, or removed at their first failing rule")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        drawn["funnel"] = save(fig, "funnel")

        fig, ax = figure(9, 1.4 + 0.45 * len(tasks))
        achieved = [facts.funnel_by_task[t].kept / max(len(facts.roots.get(t, ())), 1) for t in tasks]
        ax.barh(tasks, achieved, color=_PALETTE[0], label="achieved")
        if facts.target_factor is not None:
            ax.axvline(facts.target_factor, color="black", linestyle="--", label="target")
        ax.invert_yaxis()
        ax.set_title("Expansion factor per task")
        ax.set_xlabel("kept rewrites per original template rephrased")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        drawn["factor"] = save(fig, "factor")

    labels, counts = length_histogram(facts)
    if labels:
        fig, ax = figure(max(6, 0.5 * len(labels) + 2), 4)
        for i, (name, values) in enumerate(counts.items()):
            total = sum(values) or 1
            xs = [k + (i - 0.5) * 0.4 for k in range(len(labels))]
            ax.bar(
                xs,
                [100 * v / total for v in values],
                width=0.4,
                label=f"{name} ({sum(values)})",
                color=_PALETTE[9 if i else 2],
            )
        ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize="small")
        ax.set_title("Instruction length, original vs generated")
        ax.set_xlabel("words")
        ax.set_ylabel("% of the set")
        ax.legend()
        drawn["lengths"] = save(fig, "lengths")
    return drawn


def remove_plots(folder: Path, keep: Iterable[str]) -> None:
    """Delete the PNGs not drawn this time: they would show an earlier run."""
    for name in set(PLOT_NAMES) - set(keep):
        with contextlib.suppress(OSError):
            (folder / f"{name}.png").unlink()


_PALETTE = (
    "#2ca02c #d62728 #ff7f0e #9467bd #8c564b #e377c2 #7f7f7f #bcbd22 #17becf #1f77b4 #aec7e8 #ffbb78".split()
)

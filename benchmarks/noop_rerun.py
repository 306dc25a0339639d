"""The no-op re-run of `instraug expand`: how long an up-to-date run directory takes (goal ≤ 2 s).

    .venv/bin/python benchmarks/noop_rerun.py [--run runs/demo] [--repeats 5]

Runs the README's main job once if the run directory is not there yet (the embedded model, about 3
minutes), then times `instraug expand` again, as a separate process, `--repeats` times, and checks
that every stage was up to date and no plot was redrawn (the PNGs keep their bytes and times).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "multiinstruct-mini"
INSTRAUG = Path(sys.executable).parent / "instraug"


def expand(run: Path) -> float:
    started = time.perf_counter()
    subprocess.run([str(INSTRAUG), "expand", str(EXAMPLE), "-o", str(run), "-q"], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not (args.run / ".instraug-state.json").is_file():
        print(f"first run into {args.run} (the embedded model) ...", flush=True)
        print(f"  {expand(args.run):.1f} s")
    expand(args.run)  # settle: the report of an up-to-date run
    plots = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (args.run / "report").glob("*.png")}
    times = [expand(args.run) for _ in range(args.repeats)]
    stages = json.loads((args.run / "report.json").read_text())["stages"]
    redrawn = [p.name for p, seen in plots.items() if (p.stat().st_mtime_ns, p.read_bytes()) != seen]
    median, low, high = statistics.median(times), min(times), max(times)
    print(f"no-op re-run: median {median:.2f} s, min {low:.2f} s, max {high:.2f} s")
    print(f"stages: {sorted(set(stages.values()))}; plots redrawn: {redrawn or 'none'} of {len(plots)}")


if __name__ == "__main__":
    main()

"""Benchmark `instraug assemble` against bare JSONL read+write baselines.

Builds MultiInstruct-shaped instance files (the reference train.jsonl instances replicated
with new unique_ids) in a temporary folder, and a pool of the expert templates plus synthetic
generated rephrasings for every task, so both branches of the epsilon draw run. Each command
runs as its own process; wall time is the best of --repeat runs, peak RSS is that process's
own ru_maxrss (os.wait4), so one run's memory never shows up in another's figure.

    .venv/bin/python benchmarks/assemble.py                 # 56K and 564K instances
    .venv/bin/python benchmarks/assemble.py --profile       # plus cProfile hot spots at the largest size

Goals: assemble faster than the stdlib-json read+write of the same file; peak RSS <= 200 MB
and flat in the number of instances.
"""

from __future__ import annotations

import argparse
import os
import pstats
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SHARED = Path(os.environ.get("INSTRAUG_SHARED") or REPO.parent / "shared" / "multiinstruct")
RSS_LIMIT_MB = 200.0
GENERATED_PER_TEMPLATE = 3

STDLIB_COPY = """
import json, sys
with open(sys.argv[1], encoding="utf-8") as src, open(sys.argv[2], "w", encoding="utf-8") as dst:
    for line in src:
        if line.strip():
            dst.write(json.dumps(json.loads(line)) + "\\n")
"""

ORJSON_COPY = """
import orjson, sys
with open(sys.argv[1], "rb") as src, open(sys.argv[2], "wb") as dst:
    for line in src:
        if line.strip():
            dst.write(orjson.dumps(orjson.loads(line), option=orjson.OPT_APPEND_NEWLINE))
"""


@dataclass
class Measurement:
    size: int
    name: str
    seconds: float
    cpu_seconds: float
    rss_mb: float

    @property
    def per_second(self) -> float:
        return self.size / self.seconds


def run_measured(argv: list[str]) -> tuple[float, float, float]:
    """Run a command; return (wall seconds, CPU seconds, its own peak RSS in MB)."""
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errors)
        _pid, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            errors.seek(0)
            message = errors.read().decode(errors="replace")
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{message}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # KiB on Linux


def build_instances(shared: Path, size: int, path: Path) -> None:
    """`size` raw instances: the reference lines in turn, each with a new unique_id."""
    with open(shared / "train.jsonl", "rb") as fp:
        lines = [orjson.loads(line) for line in fp if line.strip()]
    for line in lines:  # raw instances carry no rendered prompt
        line.pop("prompt", None)
        line.pop("target", None)
    dumps, newline = orjson.dumps, orjson.OPT_APPEND_NEWLINE
    with open(path, "wb") as out:
        for i in range(size):
            row = dict(lines[i % len(lines)])
            row["unique_id"] = f"{row['unique_id']}#{i}"
            out.write(dumps(row, option=newline))


def build_pool(shared: Path, folder: Path) -> Path:
    """The expert templates (imported by instraug) plus generated rephrasings of each."""
    originals = folder / "originals.jsonl"
    run_measured(
        [
            sys.executable,
            "-m",
            "instraug",
            "import-templates",
            str(shared / "templates.json"),
            "-o",
            str(originals),
            "-q",
        ]
    )
    pool = folder / "pool.jsonl"
    with open(originals, "rb") as src, open(pool, "wb") as dst:
        for line in src:
            row = orjson.loads(line)
            dst.write(line)
            for k in range(GENERATED_PER_TEMPLATE):
                generated = {
                    "task": row["task"],
                    "variant": row["variant"],
                    "instruction_id": f"{row['instruction_id']}/g{k}",
                    "template": f"Rephrasing {k}. " + row["template"],
                    "origin": "generated",
                    "parent_id": row["instruction_id"],
                    "root_id": row["instruction_id"],
                }
                dst.write(orjson.dumps(generated, option=orjson.OPT_APPEND_NEWLINE))
    return pool


def count_lines(path: Path) -> int:
    with open(path, "rb") as fp:
        return sum(1 for _ in fp)


def commands(pool: Path, src: Path, dst: Path, epsilon: float) -> dict[str, list[str]]:
    python = sys.executable
    return {
        "stdlib json read+write": [python, "-c", STDLIB_COPY, str(src), str(dst)],
        "orjson read+write": [python, "-c", ORJSON_COPY, str(src), str(dst)],
        "instraug assemble": [
            python,
            "-m",
            "instraug",
            "assemble",
            "-p",
            str(pool),
            "-i",
            str(src),
            "-o",
            str(dst),
            "--epsilon",
            str(epsilon),
            "--seed",
            "0",
            "-q",
        ],
    }


def profile(pool: Path, src: Path, dst: Path, epsilon: float, top: int) -> None:
    stats_file = dst.with_suffix(".prof")
    argv = [
        sys.executable,
        "-m",
        "cProfile",
        "-o",
        str(stats_file),
        "-m",
        "instraug",
        "assemble",
        "-p",
        str(pool),
        "-i",
        str(src),
        "-o",
        str(dst),
        "--epsilon",
        str(epsilon),
        "--seed",
        "0",
        "-q",
    ]
    run_measured(argv)
    stats = pstats.Stats(str(stats_file))
    total = stats.total_tt  # type: ignore[attr-defined]
    print(f"\ncProfile of instraug assemble ({total:.2f} s of profiled time), top {top} by own time:")
    print(f"{'own %':>6} {'own s':>7} {'cum s':>7} {'calls':>10}  function")
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
    for (file, line, func), (_cc, calls, own, cum, _callers) in rows[:top]:
        where = file.replace(str(REPO) + "/", "") if file.startswith(str(REPO)) else Path(file).name
        print(f"{100 * own / total:6.1f} {own:7.2f} {cum:7.2f} {calls:10d}  {where}:{line}:{func}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="56000,564000", help="Instance counts, comma-separated.")
    parser.add_argument("--repeat", type=int, default=3, help="Runs per command; the best time counts.")
    parser.add_argument("--epsilon", type=float, default=0.2)
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="MultiInstruct reference data.")
    parser.add_argument("--workdir", type=Path, help="Keep the generated files here (default: a temp dir).")
    parser.add_argument("--profile", action="store_true", help="Also cProfile assemble at the largest size.")
    parser.add_argument("--top", type=int, default=25, help="Functions to list with --profile.")
    args = parser.parse_args()
    if not (args.shared / "train.jsonl").is_file():
        raise SystemExit(f"no reference data: {args.shared}/train.jsonl (set INSTRAUG_SHARED or --shared)")
    sizes = [int(s) for s in args.sizes.split(",")]
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="instraug-bench-") as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        pool = build_pool(args.shared, folder)
        print(
            f"pool: {count_lines(pool)} instructions; python {sys.version.split()[0]}; cpus {os.cpu_count()}"
        )
        results: list[Measurement] = []
        for size in sizes:
            src = folder / f"instances-{size}.jsonl"
            build_instances(args.shared, size, src)
            mb = src.stat().st_size / 1e6
            print(f"{size} instances, {mb:.0f} MB ...", flush=True)
            argvs = commands(pool, src, folder / "out.jsonl", args.epsilon)
            best = {name: Measurement(size, name, float("inf"), float("inf"), 0.0) for name in argvs}
            for _ in range(args.repeat):  # interleaved, so a busy moment hits every command alike
                for name, argv in argvs.items():
                    seconds, cpu, rss = run_measured(argv)
                    assert count_lines(folder / "out.jsonl") == size, f"{name} wrote a different count"
                    m = best[name]
                    m.seconds, m.cpu_seconds = min(m.seconds, seconds), min(m.cpu_seconds, cpu)
                    m.rss_mb = max(m.rss_mb, rss)
            results.extend(best.values())
        if args.profile:
            size = max(sizes)
            profile(pool, folder / f"instances-{size}.jsonl", folder / "out.jsonl", args.epsilon, args.top)
    report(results, load_before)


def report(results: list[Measurement], load_before: float) -> None:
    """The table; ratios are the stdlib baseline's time over the command's (above 1: faster)."""
    head = f"{'instances':>9}  {'command':<24} {'wall s':>7} {'cpu s':>7} {'instances/s':>12}"
    print(f"\n{head} {'vs stdlib':>9} {'(cpu)':>7} {'peak RSS':>9}")
    ok = True
    for m in results:
        base = next(r for r in results if r.size == m.size and r.name.startswith("stdlib"))
        line = f"{m.size:>9}  {m.name:<24} {m.seconds:7.2f} {m.cpu_seconds:7.2f} {m.per_second:12,.0f}"
        ratios = f"{base.seconds / m.seconds:8.2f}x {base.cpu_seconds / m.cpu_seconds:6.2f}x"
        print(f"{line} {ratios} {m.rss_mb:6.1f} MB")
    assemble = [m for m in results if m.name == "instraug assemble"]
    print()
    for m in assemble:
        base = next(r for r in results if r.size == m.size and r.name.startswith("stdlib"))
        faster = m.seconds < base.seconds
        faster_cpu = m.cpu_seconds < base.cpu_seconds
        small = m.rss_mb <= RSS_LIMIT_MB
        ok &= faster and small
        print(
            f"{m.size:>9}: faster than stdlib json: {'yes' if faster else 'NO'} "
            f"(cpu: {'yes' if faster_cpu else 'NO'}); "
            f"peak RSS {m.rss_mb:.1f} MB <= {RSS_LIMIT_MB:.0f} MB: {'yes' if small else 'NO'}"
        )
    if len(assemble) > 1:
        lo, hi = assemble[0], assemble[-1]
        flat = hi.rss_mb <= lo.rss_mb * 1.15 + 5
        ok &= flat
        print(
            f"peak RSS {lo.rss_mb:.1f} MB at {lo.size} vs {hi.rss_mb:.1f} MB at {hi.size}: "
            f"{'flat' if flat else 'GROWS with the input'}"
        )
    print("goals met" if ok else "goals NOT met")
    if load_before > (os.cpu_count() or 1) * 0.5:
        print(
            f"note: load average {load_before:.1f} on {os.cpu_count()} cpus at the start; timings are noisy"
        )


if __name__ == "__main__":
    main()

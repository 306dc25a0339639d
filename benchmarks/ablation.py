"""Placeholder protection ablation on the embedded model: the same plan with masking on and off.

    .venv/bin/python benchmarks/ablation.py [--attempts 6] [--out runs/ablation]

For every template of the demo checkout that has placeholders, the same meta-prompts and sampling
plan are sent once with placeholders masked as {A}, {B}, ... and once verbatim; a generation
"keeps its placeholders" when its restored template has exactly the original's placeholders
(no `placeholders`, `mask_left` or `bad_braces` rejection). Also prints each rule's yield.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from instraug.config import Config
from instraug.jsonl import read_jsonl
from instraug.pipeline import run_pipeline as expand
from instraug.placeholders import placeholders_of

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "multiinstruct-mini"
LOST = {"placeholders", "mask_left", "bad_braces"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attempts", type=int, default=6, help="requests per template and arm")
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    args = parser.parse_args()
    print(f"{'protection':>10}  {'answered':>8}  {'kept placeholders':>18}  {'kept':>5}  {'seconds':>7}")
    for protect in (True, False):
        config = Config()
        config.meta_prompts.merge = "curated"
        config.expansion.factor = config.expansion.max_attempts = args.attempts
        config.expansion.protect_placeholders = protect
        out = args.out / ("on" if protect else "off")
        started = time.perf_counter()
        expand(EXAMPLE, out, config, quiet=True, cache_path=args.out / "cache.sqlite")
        seconds = time.perf_counter() - started
        rows = [
            r for _line, r in read_jsonl(out / "generations.jsonl") if placeholders_of(r["root_template"])
        ]
        answered = [r for r in rows if r["raw"] is not None]
        survived = sum(not LOST & set(r["reasons"]) for r in answered)
        kept = sum(r["kept"] for r in answered)
        label = "on" if protect else "off"
        share = f"{survived}/{len(answered)} = {survived / max(len(answered), 1):.0%}"
        print(f"{label:>10}  {len(answered):>8}  {share:>18}  {kept:>5}  {seconds:>7.0f}")
        reasons = Counter(reason for r in answered for reason in r["reasons"])
        print("            rejected by: " + ", ".join(f"{k} {n}" for k, n in reasons.most_common()))


if __name__ == "__main__":
    main()

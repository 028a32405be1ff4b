"""Prompt deduplication for PPO: Aho-Corasick (the learner's) against scanning every kept
prompt (the earlier implementation, quadratic), on the same prompts.

The prompts are the simulator's task prompts (loop/tasks.py: many share a prefix, and
short ones sit inside longer ones) with a user-specific suffix on most, as a live
service logs them. Both methods must return the same list; the ratio is scan / automaton.

    python bench/dedup.py [--sizes 2000,8000,32000] [--repeats 3] [--max-scan 8000]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from instructloop.learner.dataset import dedup_prompts, dedup_prompts_by_scanning
from instructloop.loop.tasks import make_prompt


def logged_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = make_prompt(rng)
        out.append(p if rng.random() < 0.2 else f"{p} (ticket {i})")
    return out


def timed(fn, prompts: list[str], repeats: int) -> tuple[float, list[str]]:
    times, result = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn(prompts)
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2000,8000,32000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-scan", type=int, default=8000,
                        help="largest size the quadratic scan runs at")  # fmt: skip
    parser.add_argument("--out", default="bench/results/dedup.json")
    args = parser.parse_args()

    rows = []
    print("| prompts | kept | scan (s) | Aho-Corasick (s) | scan / Aho-Corasick |")
    print("|---|---|---|---|---|")
    for n in [int(x) for x in args.sizes.split(",")]:
        prompts = logged_prompts(n, seed=n)
        fast_s, kept = timed(dedup_prompts, prompts, args.repeats)
        scan_s = None
        if n <= args.max_scan:
            scan_s, scanned = timed(dedup_prompts_by_scanning, prompts, args.repeats)
            assert scanned == kept, "the two methods disagree"
        ratio = scan_s / fast_s if scan_s is not None else None
        rows.append({"prompts": n, "kept": len(kept), "scan_s": scan_s,
                     "automaton_s": fast_s, "ratio": ratio})  # fmt: skip
        scan = f"{scan_s:.3f}" if scan_s is not None else "not run"
        shown = f"{ratio:.0f}x" if ratio is not None else "–"
        print(f"| {n:,} | {len(kept):,} | {scan} | {fast_s:.4f} | {shown} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

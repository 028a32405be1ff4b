"""Does a demonstration, ranked above the samples of its prompt, make a better reward model?

The learner can add each demonstration to the comparison of its prompt as the best answer
(RewardConfig.demo_comparisons, on by default). This script trains the same RM twice on
the same comparisons of a recorded loop run, with and without that, from the same SFT
policy, and measures both on the run's held-out users:

- held-out pairwise accuracy (the learner's own RM metric);
- right-vs-wrong accuracy: over held-out pairs where exactly one answer is the correct
  one (loop/tasks.py), how often the RM scores the right one higher. This is what PPO
  needs from the RM on the task set.

    python bench/rm_demos.py --data-dir run/data [--heldout-fraction 0.2]
                             [--comparisons 150,500] [--repeats 3]

--data-dir is a loop run's DATA_DIR (`instructloop up` + `instructloop simulate`): its
learner dataset and the newest SFT-only version in its model store. Medians over
--repeats seeds; the ratio is with / without.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from instructloop.learner.dataset import Dataset, DatasetConfig
from instructloop.learner.reward import (
    RewardConfig,
    load_reward_model,
    score_texts,
    train_reward_model,
)
from instructloop.loop.tasks import answer
from instructloop.secretfile import load_secret
from instructloop.store import ModelStore


def right_vs_wrong(rm_dir: Path, comparisons, max_length: int) -> tuple[float, int]:
    """Share of (right, wrong) answer pairs of the same prompt the RM orders correctly."""
    model, tok = load_reward_model(rm_dir)
    model.eval()
    wins = total = 0
    for c in comparisons:
        target = answer(c.prompt)
        right = [a for a in c.answers if a.strip() == target]
        wrong = [a for a in c.answers if a.strip() != target]
        if not right or not wrong:
            continue
        with torch.no_grad():
            scores = score_texts(model, tok, [c.prompt] * 2, [right[0], wrong[0]], max_length)
        wins += int(scores[0] > scores[1])
        total += 1
    return (wins / total if total else float("nan")), total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, help="a loop run's DATA_DIR")
    ap.add_argument("--heldout-fraction", type=float, default=0.2, help="the run's split")
    ap.add_argument("--comparisons", default="150,500", help="training comparisons to use")
    ap.add_argument("--repeats", type=int, default=3, help="seeds per setting")
    ap.add_argument("--lr", type=float, default=5e-4, help="RM learning rate (up's)")
    ap.add_argument("--out", default="bench/results/rm_demos.json")
    args = ap.parse_args()
    torch.set_num_threads(1)

    data = Path(args.data_dir)
    ds = Dataset(
        DatasetConfig(
            path=str(data / "learner" / "dataset.sqlite3"),
            heldout_fraction=args.heldout_fraction,
            split_salt=load_secret(data / "split-salt", "split salt"),  # the run's own split
        )
    )
    store = ModelStore(data / "store")
    sft = [m for m in store.list() if m.metrics.get("sft_only")]
    if not sft:
        raise SystemExit(
            f"no SFT-only version in {data / 'store'}: run the loop with demonstrations"
        )
    init = store.path(sft[-1].id)
    train, heldout = ds.comparisons("train"), ds.comparisons("heldout")
    demos = ds.demonstrations("train")
    print(
        f"{len(train)} training / {len(heldout)} held-out comparisons, {len(demos)} "
        f"demonstrations; RM from {sft[-1].id} (SFT-only)"
    )

    rows = []
    for n in [int(x) for x in args.comparisons.split(",")]:
        used = train[:n]
        ids = {c.prompt_id for c in used}
        used_demos = [d for d in demos if d.prompt_id in ids]
        for with_demos in (False, True):
            acc, rvw, secs = [], [], []
            for seed in range(args.repeats):
                cfg = RewardConfig(
                    learning_rate=args.lr,
                    batch_prompts=4,
                    max_length=64,
                    seed=seed,
                    log_every=10_000,
                    demo_comparisons=with_demos,
                )
                with tempfile.TemporaryDirectory() as tmp:
                    t0 = time.perf_counter()
                    m = train_reward_model(
                        cfg,
                        used,
                        init,
                        Path(tmp) / "rm",
                        heldout,
                        demos,
                        ranked_demonstrations=used_demos if with_demos else (),
                    )
                    secs.append(time.perf_counter() - t0)
                    acc.append(m["heldout_accuracy"])
                    rvw.append(right_vs_wrong(Path(tmp) / "rm", heldout, 64)[0])
            rows.append(
                {
                    "comparisons": len(used),
                    "with_demonstrations": with_demos,
                    "demonstrations_joined": len(used_demos) if with_demos else 0,
                    "heldout_accuracy": statistics.median(acc),
                    "right_vs_wrong": statistics.median(rvw),
                    "heldout_accuracy_runs": acc,
                    "right_vs_wrong_runs": rvw,
                    "train_seconds": statistics.median(secs),
                }
            )

    print(f"\n{'comparisons':>11} | {'demos':>5} | {'held-out acc':>12} | {'right vs wrong':>14}")
    for r in rows:
        print(
            f"{r['comparisons']:>11} | {'yes' if r['with_demonstrations'] else 'no':>5} | "
            f"{r['heldout_accuracy']:>12.3f} | {r['right_vs_wrong']:>14.3f}"
        )
    ratios = []
    for a, b in zip(rows[::2], rows[1::2], strict=True):
        ratios.append(
            {
                "comparisons": a["comparisons"],
                "heldout_accuracy_ratio": b["heldout_accuracy"] / a["heldout_accuracy"],
                "right_vs_wrong_ratio": b["right_vs_wrong"] / a["right_vs_wrong"],
            }
        )
        print(
            f"with/without at {a['comparisons']}: held-out acc "
            f"{ratios[-1]['heldout_accuracy_ratio']:.3f}x, right vs wrong "
            f"{ratios[-1]['right_vs_wrong_ratio']:.3f}x"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "ratios": ratios, "args": vars(args)}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

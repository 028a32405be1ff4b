"""The end of a simulation: report.json and a PNG plot of every version against v0.

The plot has three panels over the count of comparisons the simulated users had sent
when each version appeared: the labeler win rate against v0 on held-out prompts (served
versions only: a rejected version never serves), the reward model's held-out pairwise
accuracy, and the KL to the reference (both from the version's metrics). matplotlib is
imported here only, with the Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def write_json(report: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def _jsonable(x):
    return None if isinstance(x, float) and not math.isfinite(x) else str(x)


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def write_plot(report: dict, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions = [v for v in report["versions"] if v["id"] != "v0"]
    fig, axes = plt.subplots(3, 1, figsize=(7, 9), sharex=True)
    ax = axes[0]
    served = [v for v in versions if _finite(v.get("labeler_win_rate"))]
    ax.plot(
        [0] + [v["comparisons_at"] for v in served],
        [0.5] + [v["labeler_win_rate"] for v in served],
        "o-", color="tab:blue", label="served version",
    )  # fmt: skip
    for v in served:
        ax.annotate(v["id"], (v["comparisons_at"], v["labeler_win_rate"]), fontsize=8,
                    xytext=(3, -10), textcoords="offset points")  # fmt: skip
    target = report["config"].get("target_win_rate") or 0
    if target:
        ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:.0%}")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("labeler win rate vs v0")
    ax.set_title(f"labeler {report['config']['labeler']}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)

    for ax, key, label in (
        (axes[1], "rm_heldout_accuracy", "RM held-out accuracy"),
        (axes[2], "kl", "KL to reference (nats)"),
    ):
        for status, marker, color in (
            ("promoted", "o", "tab:green"),
            ("rejected", "x", "tab:red"),
        ):
            pts = [
                (v["comparisons_at"], v[key])
                for v in versions
                if v["status"] == status and _finite(v.get(key))
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker, color=color, label=status)
        ax.set_ylabel(label)
        ax.legend(loc="best", fontsize=8)
    axes[1].set_ylim(0, 1.02)
    axes[2].set_xlabel("comparisons sent when the version appeared")
    fig.tight_layout()
    path = out_dir / "report.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""The end of a simulation: report.json and report.png, the data-efficiency curve.

The plot has five panels over the training comparisons each version was trained on
(its `comparisons_total` metric; the count sent when it appeared, where a version has
none): greedy and sampled exact-match on the held-out prompts, and counting, a skill of
the pretraining corpus that no labeler ranks; the win rate against v0
and against the round's SFT-only policy, by the training labelers (solid colours) and
by the held-out labelers (lighter ones); the corpus loss on held-out pretraining text,
with v0's as a grey line (the alignment tax is the height above it); the reward model's
held-out pairwise accuracy; and the KL to the reference. Promoted versions are dots on a
line, rejected ones crosses, SFT-only policies squares. matplotlib is imported here only,
with the Agg backend (no display needed).
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


def _x(v: dict) -> float:
    used = v.get("comparisons_used")
    return used if _finite(used) else v["comparisons_at"]


def _short(spec: str | None) -> str:
    """A labeler spec for a title: the shipped module's name left out."""
    return (spec or "none").replace("instructloop.loop.labelers:", "")


STYLES = {  # status -> (marker, line style)
    "promoted": ("o", "-"),
    "rejected": ("x", ""),
    "sft": ("s", ":"),
}


def write_plot(report: dict, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions = sorted(report["versions"], key=_x)
    panels = (
        ("task success (exact match)", 0, 1.02,
         (("exact_match", "greedy", "tab:blue"), ("exact_match_sampled", "sampled", "tab:cyan"),
          ("count_exact_match", "counting (unranked)", "tab:olive"))),
        ("labeler win rate", 0, 1.02,
         (("labeler_win_rate", "vs v0", "tab:green"),
          ("labeler_win_rate_vs_sft", "vs SFT-only", "tab:purple"),
          ("labeler_win_rate_heldout", "held-out vs v0", "yellowgreen"),
          ("labeler_win_rate_vs_sft_heldout", "held-out vs SFT-only", "plum"))),
        ("corpus loss (nats/token)", None, None,
         (("corpus_loss", "held-out corpus", "tab:brown"),)),
        ("RM held-out accuracy", 0, 1.02,
         (("rm_heldout_accuracy", "RM held-out acc", "tab:orange"),)),
        ("KL to reference (nats)", None, None, (("kl", "KL", "tab:red"),)),
    )  # fmt: skip
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 13), sharex=True)
    for ax, (title, lo, hi, series) in zip(axes, panels, strict=True):
        for key, label, color in series:
            for status, (marker, line) in STYLES.items():
                pts = [
                    (_x(v), v[key])
                    for v in versions
                    if (v["status"] == status or (status == "promoted" and v["id"] == "v0"))
                    and _finite(v.get(key))
                ]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker=marker, ls=line, color=color,
                            label=f"{label} ({status})")  # fmt: skip
        ax.set_ylabel(title, fontsize=8)
        if lo is not None:
            ax.set_ylim(lo, hi)
        if ax.get_legend_handles_labels()[0]:  # a panel with no data has no legend
            ax.legend(loc="best", fontsize=7)
    cfg = report["config"]
    if cfg.get("target_exact_match"):
        axes[0].axhline(cfg["target_exact_match"], color="grey", ls="--", lw=1)
    if cfg.get("target_win_rate"):
        axes[1].axhline(cfg["target_win_rate"], color="grey", ls="--", lw=1)
    axes[1].axhline(0.5, color="lightgrey", lw=1)
    v0_loss = next((v.get("corpus_loss") for v in versions if v["id"] == "v0"), None)
    if _finite(v0_loss):
        axes[2].axhline(v0_loss, color="grey", ls="--", lw=1)  # above it: the alignment tax
    axes[0].set_title(
        f"labeler {_short(cfg['labeler'])}, held-out {_short(cfg.get('heldout_labeler'))}, "
        f"demonstrations {cfg['demo_prob']:.0%}",
        fontsize=8,
    )
    axes[-1].set_xlabel("training comparisons the version was trained on")
    fig.tight_layout()
    path = out_dir / "report.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""The end of a simulation (report.json and report.png, the data-efficiency curve) and of
an ablation (ablate.json, ablate.md, ablate.png: loop/ablate.py).

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


def write_json(report: dict, out_dir: Path, name: str = "report.json") -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
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


# ---------------------------------------------------------------- ablate's output


def fmt(x, spec: str = ".3f") -> str:
    """A table cell: '-' for a missing or non-finite number."""
    return format(x, spec) if _finite(x) else "-"


ABLATION_COLUMNS = (  # (key, header, format)
    ("algorithm", "algorithm", "s"),
    ("comparisons", "comparisons", "d"),
    ("train_seconds", "train s", ".0f"),
    ("exact_match", "exact greedy", ".1%"),
    ("exact_match_sampled", "exact sampled", ".1%"),
    ("win_vs_sft", "win vs SFT", ".1%"),
    ("win_vs_sft_heldout", "win vs SFT (held-out labelers)", ".1%"),
    ("kl_to_sft", "KL to SFT", ".2f"),
    ("rm_score", "RM score", ".2f"),
    ("corpus_loss", "corpus loss", ".3f"),
    ("alignment_tax", "tax", "+.3f"),
)


def ablation_rows(report: dict) -> list[list[str]]:
    out = []
    for r in report["rows"]:
        cells = []
        for key, _, spec in ABLATION_COLUMNS:
            v = r.get(key)
            cells.append(v if isinstance(v, str) else fmt(v, spec))
        out.append(cells)
    return out


def ablation_markdown(report: dict) -> str:
    head = "| " + " | ".join(h for _, h, _ in ABLATION_COLUMNS) + " |"
    rule = "|" + "---|" * len(ABLATION_COLUMNS)
    return "\n".join([head, rule, *("| " + " | ".join(c) + " |" for c in ablation_rows(report))])


def write_ablation_plot(report: dict, out_dir: Path) -> Path:
    """ablate.png: four panels over the share of comparisons, one line per algorithm;
    the SFT-only policy (and, for the tax, the base) as a dashed level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    sft = next((r for r in rows if r["algorithm"] == "sft"), {})
    panels = (
        ("win_vs_sft", "labeler win rate vs SFT-only", 0.5),
        ("exact_match", "exact match (greedy)", sft.get("exact_match")),
        ("kl_to_sft", "KL to the SFT reference (nats)", 0.0),
        ("alignment_tax", "alignment tax (corpus loss - base's)", sft.get("alignment_tax")),
    )
    fig, grid = plt.subplots(2, 2, figsize=(11, 7.5))
    axes = grid.ravel()
    names = [a for a in dict.fromkeys(r["algorithm"] for r in rows) if a not in ("base", "sft")]
    for ax, (key, title, level) in zip(axes, panels, strict=True):
        for name in names:
            pts = sorted(
                (r["comparisons"], r[key])
                for r in rows
                if r["algorithm"] == name and isinstance(r.get(key), int | float)
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        if isinstance(level, int | float):
            ax.axhline(level, color="grey", linestyle="--", label="SFT-only")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("comparisons trained on", fontsize=8)
        ax.grid(alpha=0.3)
    axes[3].axhline(0.0, color="black", linewidth=0.8)  # the base: no tax
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"instructloop ablate: {report['eval_prompts']} held-out prompts, same data and budget"
    )
    fig.tight_layout()
    path = out_dir / "ablate.png"
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path

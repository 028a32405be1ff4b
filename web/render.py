"""What the pages show, computed from the API's messages: pure functions, no I/O.

- `markdown`: model output and prompts as sanitised HTML (markdown-it, CommonMark with raw
  HTML off: every tag a model writes is shown as text; links and images off, so a sample
  can neither load nor point anywhere).
- `version_rows`, `chart`: the dashboard's versions table (key metrics, lineage) and its
  inline-SVG chart of gate win rate and RM accuracy per version.
- `rating_scores`: a ranking with flagged samples as a Rating (see README, Web app).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime

from markdown_it import MarkdownIt
from markupsafe import Markup

from instructloop.clients.admin import KEY_METRICS, key_metrics
from instructloop.v1 import admin_pb2

_MD = MarkdownIt("commonmark", {"html": False, "linkify": False}).disable(
    ["image", "link", "autolink"]
)


def markdown(text: str) -> Markup:
    """Sanitised HTML of a markdown text (safe to insert as markup)."""
    return Markup(_MD.render(text))


def when(ts) -> str:
    """A protobuf Timestamp as 'YYYY-MM-DD HH:MM:SS' UTC ('' when unset)."""
    if not ts.seconds:
        return ""
    return datetime.fromtimestamp(ts.seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def version_rows(reply: admin_pb2.ListVersionsResponse) -> list[dict]:
    """One row per version, newest first: id, aliases, kind, created, gate, the key metrics
    (formatted) and the lineage (parents up to the base, from the listed versions)."""
    parent = {v.id: v.parent for v in reply.versions}
    rows = []
    for v in reply.versions:
        chain, seen, p = [], {v.id}, v.parent
        while p and p not in seen:
            chain.append(p)
            seen.add(p)
            p = parent.get(p, "")
        key = key_metrics(v)
        rows.append(
            {
                "id": v.id,
                "aliases": list(v.aliases),
                "kind": v.kind,
                "created": when(v.created),
                "gate": "" if v.kind == "base" else ("passed" if v.gate.passed else "rejected"),
                "gate_reason": v.gate.reason,
                "metrics": [(label, _fmt(key[label])) for label, _ in KEY_METRICS],
                "feedback": v.feedback_count,
                "lineage": chain,
                "excluded": list(v.excluded_users),
            }
        )
    return rows


def chart(versions: Sequence[admin_pb2.VersionInfo], width: int = 340, height: int = 170):
    """The chart's geometry: gate win rate and RM held-out accuracy per version, oldest
    left, on a 0..1 axis. Returns None with fewer than one measured version."""
    measured = sorted(
        (v for v in versions if v.kind != "base"),
        key=lambda v: (v.created.ToNanoseconds(), v.id),
    )
    if not measured:
        return None
    left, right, top, bottom = 30, 14, 10, 24
    step = (width - left - right) / max(len(measured) - 1, 1)
    x = [left + i * step for i in range(len(measured))]

    def y(value: float) -> float:
        return top + (1 - min(max(value, 0.0), 1.0)) * (height - top - bottom)

    series = []
    for name, label, color in (
        ("win_rate", "gate win rate", "#2563eb"),
        ("rm_heldout_accuracy", "RM held-out accuracy", "#d97706"),
    ):
        points = []
        for xi, v in zip(x, measured, strict=True):
            value = v.metrics.get(name, v.gate.measures.get(name))
            if value is not None and math.isfinite(value):
                points.append(
                    {"x": round(xi, 1), "y": round(y(value), 1), "value": value, "id": v.id}
                )
        path = " ".join(f"{p['x']},{p['y']}" for p in points)
        series.append({"label": label, "color": color, "points": points, "path": path})
    grid = [{"y": round(y(g), 1), "label": f"{g:.2g}"} for g in (0.0, 0.5, 1.0)]
    labels = [{"x": round(xi, 1), "id": v.id} for xi, v in zip(x, measured, strict=True)]
    return {
        "width": width,
        "height": height,
        "series": series,
        "grid": grid,
        "labels": labels,
        "left": left,
        "right": width - right,
        "base": height - bottom,
    }


def rating_scores(
    tiers: Sequence[Sequence[str]], flagged: Sequence[str], low: float, high: float
) -> dict[str, float]:
    """A ranking with flagged samples, as Rating scores on the server's scale [low, high]:
    the lowest score is kept for flagged samples alone; the tiers spread evenly over the
    rest, best first (tied samples share a score). The learner reads a rating as a ranking
    by score, so the tiers survive, and the flag is the score `low`."""
    scores = {sid: low for sid in flagged}
    step = (high - low) / max(len(tiers), 1)  # tier i scores high - i*step > low
    for i, tier in enumerate(tiers):
        for sid in tier:
            scores[sid] = round(high - i * step, 6)
    return scores

"""Helpers the benchmarks share: percentiles, spreads over repeats, CPU time, the JSON result."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (not its children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    """The value at fraction q (0..1) of the sorted values; nan when there are none."""
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def spread(rows: list[dict], *path: str) -> dict:
    """Median, min and max over rows of the value at rows[i][path[0]][path[1]]..."""
    values = []
    for row in rows:
        for key in path:
            row = row[key]
        values.append(row)
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def write_result(out: str | Path, args, **measured) -> Path:
    """Write {"params", "machine", **measured} to `out` (folders made as needed)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "params": vars(args),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
        **measured,
    }
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return path

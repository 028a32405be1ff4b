"""The JSON result a benchmark writes: its parameters, the machine, and what it measured."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


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

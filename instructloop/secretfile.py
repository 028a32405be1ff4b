"""Per-deployment secrets kept in files: the registry key, the held-out split's salt.

A secret file is created on first use (mode 0600, 32 random bytes as hex) by whichever
process needs it first; every replica and the learner of a deployment read the same file.
Its contents never go to a log, an error message or `--help`.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def load_secret(path: str | Path, what: str) -> bytes:
    """The secret in `path`, creating the file if it does not exist. `what` names the
    secret in errors (never its value)."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it meanwhile
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
    value = path.read_text().strip().encode()
    if len(value) < 16:
        raise ValueError(f"the {what} in {path} is too short (at least 16 characters)")
    return value

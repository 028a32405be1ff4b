"""Child-process helpers shared by `instructloop up` and the tests."""

from __future__ import annotations

import contextlib
import ctypes
import signal


def die_with_parent() -> None:
    """Use as Popen(preexec_fn=...): the child gets SIGTERM when its parent dies (Linux
    prctl PR_SET_PDEATHSIG), so a killed supervisor leaves no orphan servers behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)

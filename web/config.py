"""`instructloop web`'s options (one dataclass, help on every field; instructloop/cliargs.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _default_target() -> str:
    return os.environ.get("INSTRUCTLOOP_TARGET") or "localhost:50051"


@dataclass
class WebConfig:
    """The web app: sign-in, labeler page, playground, operations dashboard, export."""

    target: str = field(
        default_factory=_default_target,
        metadata={"help": "gRPC address of the instructloop server (or its load balancer)."},
    )
    host: str = field(
        default="127.0.0.1",
        metadata={
            "help": "Address the web app listens on. Beyond loopback, serve it behind "
            "HTTPS and set --secure-cookies."
        },
    )
    port: int = field(default=8080, metadata={"help": "HTTP port of the web app."})
    tls_ca: str = field(
        default="",
        metadata={
            "help": "Connect to the gRPC server with TLS, trusting this CA (PEM); "
            "default $INSTRUCTLOOP_TLS_CA, else plaintext."
        },
    )
    session_ttl_s: float = field(
        default=8 * 3600.0,
        metadata={
            "help": "A session ends this long after sign-in (its credential is "
            "forgotten); sign in again then."
        },
    )
    max_sessions: int = field(
        default=10_000,
        metadata={"help": "Sessions held at once; beyond it the oldest ones end."},
    )
    secure_cookies: bool = field(
        default=False,
        metadata={
            "help": "Mark the session cookie Secure (sent over HTTPS only): set it "
            "when the app is served over HTTPS."
        },
    )
    daily_quota: int = field(
        default=100,
        metadata={
            "help": "Judgements a labeler is asked for per day; the labeler page shows "
            "progress against it (counted by this app, per user and UTC day). 0 hides it."
        },
    )
    export_limit: int = field(
        default=10_000,
        metadata={
            "help": "Judgements one export from the dashboard sends at most (the server "
            "caps a call at 100,000; page on with the last line's entry_id)."
        },
    )
    log_level: str = field(default="info", metadata={"help": "uvicorn's log level."})

"""Sessions: the credential stays on the server; the browser holds a signed session id.

Sign-in checks a credential with one gRPC call (Admin.WhoAmI) and keeps it here, in
memory, under a random session id (128 bits) with a TTL. The cookie holds only that id
and its HMAC-SHA256 under a per-process key, so a forged or altered cookie is refused
before any lookup, and a restart of the app ends every session (sign in again). The
cookie is HttpOnly (no script reads it) and SameSite=Strict (no other site's page sends
it).

Every state-changing request carries the session's CSRF token (a hidden form field or
the X-CSRF-Token header), compared in constant time. The sign-in form, which has no
session yet, carries a nonce that must match a short-lived cookie of its own (double
submit), so another site cannot sign a browser in as someone else.

Bounds: at most `max_sessions` sessions (the oldest end first); expired ones are dropped
as they are met and on every new sign-in.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

COOKIE = "il_session"
SIGNIN_COOKIE = "il_signin"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf"


@dataclass
class Session:
    """One signed-in browser."""

    sid: str
    token: str = field(repr=False)  # the credential: never sent to the browser, never logged
    user_id: str
    role: str
    actor: str  # the name the audit log records for the shared admin token
    csrf: str = field(repr=False)
    expires: float
    # The labeler page's state: the task leased now, and this session's counts.
    task: Any = None
    judged: int = 0
    skipped: int = 0


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class Sessions:
    def __init__(self, ttl_s: float, max_sessions: int, key: bytes | None = None):
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._key = key or secrets.token_bytes(32)
        self._sessions: dict[str, Session] = {}

    def _sign(self, value: str) -> str:
        return hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()

    def create(self, token: str, user_id: str, role: str, actor: str) -> Session:
        now = time.monotonic()
        self._sessions = {k: s for k, s in self._sessions.items() if s.expires > now}
        while len(self._sessions) >= self.max_sessions:
            del self._sessions[min(self._sessions, key=lambda k: self._sessions[k].expires)]
        session = Session(
            sid=secrets.token_urlsafe(16),
            token=token,
            user_id=user_id,
            role=role,
            actor=actor,
            csrf=secrets.token_urlsafe(24),
            expires=now + self.ttl_s,
        )
        self._sessions[session.sid] = session
        return session

    def cookie(self, session: Session) -> str:
        return f"{session.sid}.{self._sign(session.sid)}"

    def get(self, cookie: str | None) -> Session | None:
        """The live session a cookie names; None if absent, forged, ended or expired."""
        sid, _, signature = (cookie or "").partition(".")
        if not sid or not _same(signature, self._sign(sid)):
            return None
        session = self._sessions.get(sid)
        if session is None:
            return None
        if session.expires <= time.monotonic():
            del self._sessions[sid]
            return None
        return session

    def end(self, session: Session) -> None:
        self._sessions.pop(session.sid, None)

    @staticmethod
    def csrf_ok(session: Session, presented: str | None) -> bool:
        return bool(presented) and _same(presented, session.csrf)

    # ---- the sign-in form's double-submit nonce ------------------------------------------

    def signin_nonce(self) -> tuple[str, str]:
        """(nonce for the form's hidden field, signed value for its cookie)."""
        nonce = secrets.token_urlsafe(16)
        return nonce, f"{nonce}.{self._sign('signin:' + nonce)}"

    def signin_ok(self, cookie: str | None, presented: str | None) -> bool:
        nonce, _, signature = (cookie or "").partition(".")
        return (
            bool(nonce)
            and _same(signature, self._sign("signin:" + nonce))
            and _same(presented or "", nonce)
        )

"""Who is calling: the credential in the call metadata, checked against the user store.

Every call of the public service and the Admin service carries
`authorization: Bearer <token>`. The token is the deployment's admin token (the caller is
then the operator "admin", role admin) or a user's token (instructloop/users.py). The
server derives the user id from it; a request naming another user is refused.

A lookup costs two Redis reads, so a caller is cached for `cache_s` seconds (a revoked or
suspended user is refused at most that long after the change), and while Redis does not
answer, a caller seen within STALE_S is still admitted: Generate keeps serving known users
through a Redis outage, as it serves without logging. The cache holds at most MAX_CACHED
callers (the oldest half is dropped when full).

With `open_mode` (the server's --open, for local experiments only) a call without a
credential is admitted as the user its request names; the Admin service still needs the
admin credential.
"""

from __future__ import annotations

import hmac
import logging
import time

from redis.exceptions import RedisError

from instructloop.users import ADMIN, AuthError, Caller, UserStore, token_hash

from .errors import PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

MAX_CACHED = 10_000
STALE_S = 300.0
MISSING = (
    "no credential: send 'authorization: Bearer <token>' (a token from `instructloop users "
    "add`; the CLI reads --token, $INSTRUCTLOOP_TOKEN or DATA_DIR/user-token)"
)
ADMIN_USER = "admin"


def bearer(metadata) -> str:
    """The token of an `authorization: Bearer <token>` metadata entry, or ""."""
    for key, value in metadata or ():
        if key == "authorization":
            value = value if isinstance(value, str) else value.decode()
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


class Authenticator:
    def __init__(
        self,
        users: UserStore,
        admin_token: str,
        *,
        cache_s: float = 5.0,
        open_mode: bool = False,
    ):
        self.users = users
        self._admin = admin_token.encode()
        self.cache_s = cache_s
        self.open_mode = open_mode
        self._cache: dict[str, tuple[float, Caller]] = {}  # token hash -> (seen, caller)

    async def caller(self, metadata) -> Caller | None:
        """The authenticated caller; None in open mode without a credential.
        Raises Unauthenticated."""
        token = bearer(metadata)
        if not token:
            if self.open_mode:
                return None
            raise Unauthenticated(MISSING)
        if hmac.compare_digest(token.encode(), self._admin):
            return Caller(ADMIN_USER, ADMIN)
        digest = token_hash(token)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and now - cached[0] < self.cache_s:
            return cached[1]
        try:
            caller = await self.users.authenticate(token)
        except AuthError as e:
            self._cache.pop(digest, None)
            log.info("refused credential: %s", e)
            raise Unauthenticated(f"the credential is not valid ({e})") from None
        except (RedisError, TimeoutError, OSError):
            if cached is not None and now - cached[0] < STALE_S:
                return cached[1]  # Redis is out: a caller known a moment ago goes on
            raise
        if len(self._cache) >= MAX_CACHED:
            for key in sorted(self._cache, key=lambda k: self._cache[k][0])[: MAX_CACHED // 2]:
                del self._cache[key]
        self._cache[digest] = (now, caller)
        return caller

    async def admin(self, metadata) -> Caller:
        """An admin caller (the admin token, or a user with role admin). Raises
        Unauthenticated or PermissionDenied."""
        if not bearer(metadata):
            raise Unauthenticated(
                "admin call without credential: send 'authorization: Bearer <admin token>' "
                "(the CLI: --admin-token, or $INSTRUCTLOOP_ADMIN_TOKEN, or DATA_DIR/admin-token)"
            )
        caller = await self.caller(metadata)
        if caller.role != ADMIN:
            raise PermissionDenied(
                f"user {caller.user_id!r} has role {caller.role!r}; this needs admin"
            )
        return caller

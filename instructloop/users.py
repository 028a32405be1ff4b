"""Users, their credentials and roles, in Redis: shared by every replica and the learner.

A credential is a random token (32 bytes, URL-safe base64) shown once when the user is
added. Redis keeps only its SHA-256: the token has 256 bits of entropy, so a fast hash is
enough (a slow password hash guards low-entropy secrets), and a dump of Redis gives no
usable credential. A lookup finds the hash's owner, then compares the stored hash with
hmac.compare_digest; nothing here logs a token or puts one in an error.

Roles: "app" may Generate; "labeler" may also SubmitFeedback; "admin" may do everything,
the Admin service included. A revoked credential is refused for good (UNAUTHENTICATED); a
suspended user still authenticates but may not judge, and the learner leaves all of its
feedback out of its next round (learner/rounds.py).

The learner writes what it measured of each user (admin_pb2.UserQuality) to its own hash,
replaced whole each round, so ListUsers shows counts, agreement and flags beside the
account. Bounds: one entry per user in each hash; users are only added by an admin.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from redis.exceptions import WatchError

from instructloop.keys import Keys
from instructloop.redis_client import AsyncClient
from instructloop.v1 import admin_pb2

APP, LABELER, ADMIN = "app", "labeler", "admin"
ROLES = (APP, LABELER, ADMIN)
USER_ID = re.compile(r"[A-Za-z0-9._@-]{1,64}")
TOKEN_PREFIX = "il_"


class UserError(Exception):
    """A user operation that cannot be done (unknown user, bad id or role)."""


class UnknownUser(UserError):
    pass


class AuthError(Exception):
    """A credential that does not authenticate: missing, unknown or revoked."""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Caller:
    """Who a call comes from, as its credential says."""

    user_id: str
    role: str
    suspended: bool = False

    def may_generate(self) -> bool:
        return self.role in ROLES

    def may_judge(self) -> bool:
        return self.role in (LABELER, ADMIN)


def check_user_id(user_id: str) -> None:
    if not USER_ID.fullmatch(user_id):
        raise UserError(
            f"user id {user_id[:80]!r} is not valid: use 1..64 letters, digits, '.', '_', "
            "'-' or '@'"
        )


class UserStore:
    def __init__(self, redis: AsyncClient, keys: Keys):
        self.redis = redis
        self.keys = keys

    async def add(self, user_id: str, role: str, actor: str) -> tuple[admin_pb2.UserInfo, str]:
        """Create a user with a fresh credential. Returns (info, token): the token is not
        stored and cannot be shown again. Refused if the user exists (revoked ones too:
        ids are never reused, so old feedback keeps one owner)."""
        check_user_id(user_id)
        if role not in ROLES:
            raise UserError(f"role {role[:40]!r} is not one of {', '.join(ROLES)}")
        info = admin_pb2.UserInfo(user_id=user_id, role=role, actor=actor[:128])
        info.created.GetCurrentTime()
        token = new_token()
        if not await self.redis.hsetnx(self.keys.users, user_id, info.SerializeToString()):
            raise UserError(f"user {user_id!r} exists; revoke it and add a new id instead")
        digest = token_hash(token)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.credentials, digest, user_id)
            pipe.hset(self.keys.credential_of, user_id, digest)
            await pipe.execute()
        return info, token

    async def get(self, user_id: str) -> admin_pb2.UserInfo:
        raw = await self.redis.hget(self.keys.users, user_id)
        if raw is None:
            raise UnknownUser(f"no user {user_id[:80]!r}")
        return admin_pb2.UserInfo.FromString(raw)

    async def info(self, user_id: str) -> admin_pb2.UserInfo:
        """A user with the learner's latest measures of its feedback (as list() gives)."""
        info = await self.get(user_id)
        quality = await self.redis.hget(self.keys.user_quality, user_id)
        if quality is not None:
            info.quality.ParseFromString(quality)
        return info

    async def authenticate(self, token: str) -> Caller:
        """The caller a token belongs to, or AuthError (the message never holds the token)."""
        if not token:
            raise AuthError("no credential")
        digest = token_hash(token)
        owner = await self.redis.hget(self.keys.credentials, digest)
        if owner is None:
            raise AuthError("unknown credential")
        # The lookup matched the hash exactly; compare again in constant time so the
        # check does not rest on how Redis compares field names.
        stored = await self.redis.hget(self.keys.credential_of, owner)
        if stored is None or not hmac.compare_digest(stored.decode(), digest):
            raise AuthError("unknown credential")
        info = await self.get(owner.decode())
        if info.revoked:
            raise AuthError(f"the credential of {info.user_id!r} is revoked")
        return Caller(info.user_id, info.role, info.suspended)

    async def list(self) -> list[admin_pb2.UserInfo]:
        raw = await self.redis.hgetall(self.keys.users)
        quality = await self.redis.hgetall(self.keys.user_quality)
        users = []
        for uid, data in raw.items():
            info = admin_pb2.UserInfo.FromString(data)
            if uid in quality:
                info.quality.ParseFromString(quality[uid])
            users.append(info)
        return sorted(users, key=lambda u: u.user_id)

    async def _update(self, user_id: str, change) -> admin_pb2.UserInfo:
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self.keys.users)
                    raw = await pipe.hget(self.keys.users, user_id)
                    if raw is None:
                        raise UnknownUser(f"no user {user_id[:80]!r}")
                    info = admin_pb2.UserInfo.FromString(raw)
                    change(info)
                    pipe.multi()
                    pipe.hset(self.keys.users, user_id, info.SerializeToString())
                    await pipe.execute()
                    return info
                except WatchError:
                    continue

    async def revoke(self, user_id: str) -> admin_pb2.UserInfo:
        info = await self._update(user_id, lambda i: setattr(i, "revoked", True))
        await self._drop_credential(user_id)
        return info

    async def suspend(self, user_id: str, suspend: bool, reason: str) -> admin_pb2.UserInfo:
        def change(info: admin_pb2.UserInfo) -> None:
            info.suspended = suspend
            info.suspend_reason = reason[:1024] if suspend else ""

        return await self._update(user_id, change)

    async def suspended_users(self) -> dict[str, str]:
        """user id -> reason, for every suspended user (read by the learner each round)."""
        raw = await self.redis.hgetall(self.keys.users)
        infos = (admin_pb2.UserInfo.FromString(v) for v in raw.values())
        return {i.user_id: i.suspend_reason for i in infos if i.suspended}

    async def set_quality(
        self, quality: dict[str, admin_pb2.UserQuality], agreement: float, pairs: int
    ) -> None:
        """Replace the learner's per-user measures and the inter-labeler agreement."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.user_quality, self.keys.labeler_agreement)
            if quality:
                pipe.hset(
                    self.keys.user_quality,
                    mapping={u: q.SerializeToString() for u, q in quality.items()},
                )
            pipe.hset(self.keys.labeler_agreement, mapping={"agreement": agreement, "pairs": pairs})
            await pipe.execute()

    async def labeler_agreement(self) -> tuple[float, int]:
        raw = await self.redis.hgetall(self.keys.labeler_agreement)
        return float(raw.get(b"agreement", 0.0)), int(raw.get(b"pairs", 0))

    async def _drop_credential(self, user_id: str) -> None:
        digest = await self.redis.hget(self.keys.credential_of, user_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            if digest is not None:
                pipe.hdel(self.keys.credentials, digest)
            pipe.hdel(self.keys.credential_of, user_id)
            await pipe.execute()

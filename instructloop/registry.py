"""The model registry in Redis: known versions and movable aliases, like MLflow aliases.

Shared by the server (which follows `current` and serves the Admin API) and the learner
(which registers and, unless frozen, promotes). Every alias change is one optimistic
transaction (WATCH/MULTI) that moves the alias, appends an AuditRecord to the audit
stream and publishes a RegistryEvent, so a change is either complete or absent.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import TypeVar

from google.protobuf.timestamp_pb2 import Timestamp
from redis.exceptions import WatchError

from instructloop.keys import DATA_FIELD, Keys
from instructloop.redis_client import AsyncClient, is_cluster
from instructloop.secretfile import load_secret
from instructloop.store import Manifest, ModelStore
from instructloop.v1 import admin_pb2, records_pb2

log = logging.getLogger(__name__)

CURRENT, PREVIOUS, CANARY = "current", "previous", "canary"
MAX_CANARY_SHARE = 0.5
T = TypeVar("T")

# Count one judgement of the canary, atomically with the canary it belongs to: nothing is
# counted unless the alias and the state hash both still name `version` (a replica that read
# an old canary cannot add to a new one), and each user's judgement of a prompt counts once.
# KEYS: aliases, canary state, canary judged, canary users.
# ARGV: canary alias name, version, '<user> <prompt>', user, outcome field (wins, losses or
# ties), then the state fields to reply with.
# Reply: nil for an old canary; else the values of those fields, then the distinct users.
_COUNT_CANARY_JUDGEMENT = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return nil end
if redis.call('HGET', KEYS[2], 'version') ~= ARGV[2] then return nil end
if redis.call('SADD', KEYS[3], ARGV[3]) == 1 then
  redis.call('SADD', KEYS[4], ARGV[4])
  redis.call('HINCRBY', KEYS[2], ARGV[5], 1)
end
local reply = redis.call('HMGET', KEYS[2], unpack(ARGV, 6))
reply[#reply + 1] = redis.call('SCARD', KEYS[4])
return reply
"""

# Claim the decision on a canary for one replica: every replica counts judgements and may
# see the thresholds crossed at once, but only the first claim wins, and only while the
# canary is still that version. The claim is a lease: a decider that dies leaves it to
# expire, and the replica of a later judgement decides.
# KEYS: aliases, canary decision. ARGV: canary alias name, version, lease ms.
# Reply: 1 if claimed.
_CLAIM_CANARY_DECISION = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return 1 end
return 0
"""

# Distinct users a canary needs before a decision when the operator gives 0, and how long a
# replica holds the claim to decide (promote, then clear the canary) before another may.
DEFAULT_MIN_USERS = 5
CANARY_DECISION_LEASE_MS = 30_000
# The canary state hash fields a decision reads, and the count each outcome increments.
_CANARY_FIELDS = (
    "share",
    "wins",
    "losses",
    "ties",
    "promote_at",
    "rollback_at",
    "min_comparisons",
    "min_users",
)
_OUTCOME_FIELD = {1: "wins", -1: "losses", 0: "ties"}

# Bounds: the audit stream keeps about this many newest records; a replica's heartbeat
# is deleted this long after it stopped (a replica that stops cleanly deletes its own).
AUDIT_MAXLEN = 100_000
FORGET_REPLICA_S = 24 * 3600.0


class RegistryError(Exception):
    """Base class of registry refusals."""


class UnknownVersion(RegistryError):
    """No version with that id is registered."""


class Frozen(RegistryError):
    """Automatic promotion is frozen by an operator."""


class NothingToRollBackTo(RegistryError):
    """There is no `previous` version."""


class BadSignature(RegistryError):
    """A registry entry is not signed with this deployment's registry key."""


def load_registry_key(path: str | Path) -> bytes:
    """The deployment's registry key (see secretfile.py). Every replica and the learner
    must read the same key."""
    return load_secret(path, "registry key")


def _entry_bytes(info: admin_pb2.VersionInfo) -> bytes:
    bare = admin_pb2.VersionInfo()
    bare.CopyFrom(info)
    bare.ClearField("signature")
    bare.ClearField("aliases")
    return bare.SerializeToString(deterministic=True)


def now_ts() -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


class Registry:
    """Versions, aliases, freeze, canary, audit and heartbeats in Redis.

    With a signing key, every entry it registers is signed (HMAC-SHA256) and `verify`
    checks an entry before a replica loads it: a version registered by hand in Redis,
    or an entry changed there, is refused."""

    def __init__(self, redis: AsyncClient, keys: Keys, signing_key: bytes | None = None):
        self.redis = redis
        self.keys = keys
        self.signing_key = signing_key
        self.cluster = is_cluster(redis)
        self._count_canary_judgement = redis.register_script(_COUNT_CANARY_JUDGEMENT)
        self._claim_canary_decision = redis.register_script(_CLAIM_CANARY_DECISION)

    def _signature(self, info: admin_pb2.VersionInfo) -> str:
        return hmac.new(self.signing_key, _entry_bytes(info), "sha256").hexdigest()

    def sign(self, info: admin_pb2.VersionInfo) -> None:
        if self.signing_key is not None:
            info.signature = self._signature(info)

    def verify(self, info: admin_pb2.VersionInfo) -> None:
        """Raise BadSignature unless the entry carries this deployment's signature."""
        if self.signing_key is None:
            return
        if not hmac.compare_digest(self._signature(info), info.signature):
            raise BadSignature(
                f"version {info.id!r} is not signed with this deployment's registry key "
                "(registered by hand in Redis, changed there, or by a learner with another "
                "key): refused"
            )

    # ---- versions ---------------------------------------------------------------------

    async def next_version_id(self) -> str:
        return f"v{await self.redis.incr(self.keys.version_seq)}"

    async def register(self, info: admin_pb2.VersionInfo, actor: str) -> None:
        """Make a complete, published version known. Ids are never reused."""
        self.sign(info)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.versions, info.id, info.SerializeToString())
            self._audit(pipe, actor, "register", "", "", info.id, info.gate.reason)
            await pipe.execute()

    async def get(self, version: str) -> admin_pb2.VersionInfo:
        data = await self.redis.hget(self.keys.versions, version)
        if data is None:
            raise UnknownVersion(f"version {version!r} is not registered")
        info = admin_pb2.VersionInfo.FromString(data)
        aliases = await self.aliases()
        info.aliases.extend(sorted(a for a, v in aliases.items() if v == version))
        return info

    async def list(self) -> list[admin_pb2.VersionInfo]:
        """All versions, newest first, with their aliases."""
        raw = await self.redis.hgetall(self.keys.versions)
        aliases = await self.aliases()
        infos = [admin_pb2.VersionInfo.FromString(v) for v in raw.values()]
        for info in infos:
            info.aliases.extend(sorted(a for a, v in aliases.items() if v == info.id))
        infos.sort(key=lambda i: (i.created.ToNanoseconds(), i.id), reverse=True)
        return infos

    async def aliases(self) -> dict[str, str]:
        raw = await self.redis.hgetall(self.keys.aliases)
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def alias(self, name: str) -> str | None:
        value = await self.redis.hget(self.keys.aliases, name)
        return value.decode() if value is not None else None

    async def ensure_base(self, info: admin_pb2.VersionInfo) -> None:
        """Register the base model (v0) and point `current` at it, if nothing is there yet."""
        self.sign(info)
        if await self.redis.hsetnx(self.keys.versions, info.id, info.SerializeToString()):
            async with self.redis.pipeline(transaction=True) as pipe:
                self._audit(pipe, "server", "register", "", "", info.id, "base model")
                await pipe.execute()
        if await self.redis.hsetnx(self.keys.aliases, CURRENT, info.id):
            async with self.redis.pipeline(transaction=True) as pipe:
                self._audit(pipe, "server", "bootstrap", CURRENT, "", info.id, "first start")
                self._event(pipe, "bootstrap", CURRENT, info.id)
                await pipe.execute()

    # ---- alias moves ------------------------------------------------------------------

    async def promote(
        self, version: str, actor: str, reason: str = "", auto: bool = False
    ) -> admin_pb2.AliasChange:
        """current := version, previous := old current. auto=True (the learner) is
        refused while frozen; operators can always promote."""
        await self.get(version)

        async def move(pipe) -> admin_pb2.AliasChange:
            # GET, not EXISTS: redis-py's cluster pipeline splits EXISTS by slot and
            # returns itself, unawaited, while watching.
            if auto and await pipe.get(self.keys.freeze) is not None:
                raise Frozen("automatic promotion is frozen by an operator")
            old = await self._watched_alias(pipe, CURRENT)
            if old == version:
                return self._change(CURRENT, old, version, actor)
            await self._still_registered(pipe, version)
            pipe.multi()
            pipe.hset(self.keys.aliases, CURRENT, version)
            if old:
                pipe.hset(self.keys.aliases, PREVIOUS, old)
            action = "auto-promote" if auto else "promote"
            self._audit(pipe, actor, action, CURRENT, old, version, reason)
            self._event(pipe, action, CURRENT, version)
            return self._change(CURRENT, old, version, actor)

        return await self._transaction(
            move, self.keys.aliases, self.keys.freeze, self.keys.versions
        )

    async def rollback(
        self, actor: str, version: str = "", reason: str = ""
    ) -> admin_pb2.AliasChange:
        """current := version (default: previous), previous := old current."""
        if version:
            await self.get(version)

        async def move(pipe) -> admin_pb2.AliasChange:
            old = await self._watched_alias(pipe, CURRENT)
            target = version or await self._watched_alias(pipe, PREVIOUS)
            if not target:
                raise NothingToRollBackTo("there is no previous version to roll back to")
            await self._still_registered(pipe, target)
            pipe.multi()
            pipe.hset(self.keys.aliases, CURRENT, target)
            if old and old != target:
                pipe.hset(self.keys.aliases, PREVIOUS, old)
            self._audit(pipe, actor, "rollback", CURRENT, old, target, reason)
            self._event(pipe, "rollback", CURRENT, target)
            return self._change(CURRENT, old, target, actor)

        return await self._transaction(move, self.keys.aliases)

    async def set_canary(
        self,
        actor: str,
        version: str,
        share: float,
        reason: str = "",
        promote_at: float = 0.0,
        rollback_at: float = 0.0,
        min_comparisons: int = 0,
        min_users: int = 0,
    ) -> admin_pb2.AliasChange:
        """Route `share` of traffic to `version`; an empty version clears the canary.
        After min_comparisons judgements from at least min_users distinct users (0: the
        default, DEFAULT_MIN_USERS), a win rate >= promote_at promotes it and one <=
        rollback_at ends it (0 turns either off). A new canary starts with nothing: no
        counts, no judged users or prompts, no decision claim."""
        state = {}
        if version:
            await self.get(version)
            if not 0 < share <= MAX_CANARY_SHARE:
                raise ValueError(f"canary share must be in (0, {MAX_CANARY_SHARE}]; got {share}")
            for name, value in (("promote_at", promote_at), ("rollback_at", rollback_at)):
                if not 0 <= value <= 1:
                    raise ValueError(f"{name} is a win rate in [0, 1]; got {value}")
            for name, count in (("min_comparisons", min_comparisons), ("min_users", min_users)):
                if count < 0:
                    raise ValueError(f"{name} is a count; got {count}")
            state = {
                "version": version,
                "share": repr(float(share)),
                "promote_at": repr(float(promote_at)),
                "rollback_at": repr(float(rollback_at)),
                "min_comparisons": int(min_comparisons),
                "min_users": int(min_users) or DEFAULT_MIN_USERS,
                "wins": 0,
                "losses": 0,
                "ties": 0,
            }
        return await self._move_canary(actor, version, state, reason or f"share={share}")

    async def canary(self) -> tuple[str | None, float]:
        """The canary version and its traffic share (None, 0.0 when there is none)."""
        state = await self.canary_state()
        return (state.version or None), state.share

    async def canary_state(self) -> admin_pb2.CanaryState:
        """The canary, its thresholds and its live counts, read in one transaction."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hget(self.keys.aliases, CANARY)
            pipe.hmget(self.keys.canary, _CANARY_FIELDS)
            pipe.scard(self.keys.canary_users)
            version, values, users = await pipe.execute()
        if version is None or not any(values):
            return admin_pb2.CanaryState()
        return _canary_state(version.decode(), values, users)

    async def record_canary_judgement(
        self, version: str, user_id: str, prompt_id: str, outcome: int
    ) -> str:
        """Count one user's judgement of an arena response of `version`, the canary
        (outcome +1: its samples ranked better than current's, -1: worse, 0: even), then
        act on the operator's thresholds. Returns "", "promoted", "ended" or "frozen".

        The count is one Lua script, so it lands on the canary it was meant for or not at
        all, and a user's judgement of a prompt counts once however often it is sent.
        Bounds: the judged set holds one '<user> <prompt>' per counted judgement and the
        user set one id per judging user, of this canary only; both are deleted when the
        canary is cleared, decided or replaced (prompt ids have no spaces, so a member
        reads unambiguously)."""
        field = _OUTCOME_FIELD.get(outcome)
        if field is None:
            raise ValueError(f"a canary outcome is +1, -1 or 0; got {outcome!r}")
        keys = self.keys
        reply = await self._count_canary_judgement(
            keys=[keys.aliases, keys.canary, keys.canary_judged, keys.canary_users],
            args=[CANARY, version, f"{user_id} {prompt_id}", user_id, field, *_CANARY_FIELDS],
        )
        if reply is None:
            return ""  # the canary changed meanwhile: this judgement is of an old one
        *values, users = reply
        return await self._decide_canary(_canary_state(version, values, users))

    async def _decide_canary(self, state: admin_pb2.CanaryState) -> str:
        """Promote or end the canary once its counts cross the operator's thresholds. One
        replica decides, under a lease (CANARY_DECISION_LEASE_MS); if it dies before the
        canary is cleared, the lease expires and the next judgement's replica decides
        (promoting an already current version changes nothing)."""
        total = state.wins + state.losses + state.ties
        if total < max(state.min_comparisons, 1) or state.users < state.min_users:
            return ""
        promote = bool(state.promote_at) and state.win_rate >= state.promote_at
        end = bool(state.rollback_at) and state.win_rate <= state.rollback_at
        if not (promote or end):
            return ""
        claimed = await self._claim_canary_decision(
            keys=[self.keys.aliases, self.keys.canary_decision],
            args=[CANARY, state.version, CANARY_DECISION_LEASE_MS],
        )
        if not claimed:
            return ""  # another replica decides this canary
        why = f"win rate {state.win_rate:.3f} over {total} judgements by {state.users} users"
        if promote:
            try:
                await self.promote(state.version, "canary-judge", why, auto=True)
            except Frozen:
                await self.redis.delete(self.keys.canary_decision)  # decide after unfreeze
                return "frozen"
            await self._move_canary("canary-judge", "", {}, f"promoted: {why}", state.version)
            return "promoted"
        await self._move_canary("canary-judge", "", {}, f"ended: {why}", state.version)
        return "ended"

    async def _move_canary(
        self, actor: str, version: str, state: dict, reason: str, only_from: str | None = None
    ) -> admin_pb2.AliasChange:
        """canary := version ("" clears it), with `state` as its state hash. The old
        canary's counts, judged set, user set and decision claim go in the same
        transaction. With `only_from`, nothing changes unless the canary is that version."""

        async def move(pipe) -> admin_pb2.AliasChange:
            old = await self._watched_alias(pipe, CANARY)
            if only_from is not None and old != only_from:
                return self._change(CANARY, old, old, actor)  # decided or replaced meanwhile
            pipe.multi()
            keys = self.keys
            pipe.delete(keys.canary, keys.canary_users, keys.canary_judged, keys.canary_decision)
            if version:
                pipe.hset(keys.aliases, CANARY, version)
                pipe.hset(keys.canary, mapping=state)
            else:
                pipe.hdel(keys.aliases, CANARY)
            self._audit(pipe, actor, "canary", CANARY, old, version, reason)
            self._event(pipe, "canary", CANARY, version)
            return self._change(CANARY, old, version, actor)

        return await self._transaction(move, self.keys.aliases)

    # ---- freeze -----------------------------------------------------------------------

    async def freeze(self, actor: str, reason: str = "") -> admin_pb2.FreezeState:
        state = admin_pb2.FreezeState(frozen=True, actor=actor, reason=reason, since=now_ts())
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.freeze, state.SerializeToString())
            self._audit(pipe, actor, "freeze", "", "", "", reason)
            self._event(pipe, "freeze", "", "")
            await pipe.execute()
        return state

    async def unfreeze(self, actor: str, reason: str = "") -> admin_pb2.FreezeState:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.freeze)
            self._audit(pipe, actor, "unfreeze", "", "", "", reason)
            self._event(pipe, "unfreeze", "", "")
            await pipe.execute()
        return admin_pb2.FreezeState(frozen=False, actor=actor, reason=reason, since=now_ts())

    async def freeze_state(self) -> admin_pb2.FreezeState:
        data = await self.redis.get(self.keys.freeze)
        return admin_pb2.FreezeState.FromString(data) if data else admin_pb2.FreezeState()

    # ---- replicas and audit -----------------------------------------------------------

    async def heartbeat(self, status: admin_pb2.ReplicaStatus) -> None:
        status.seen.CopyFrom(now_ts())
        await self.redis.hset(self.keys.replicas, status.replica_id, status.SerializeToString())

    async def replicas(self, max_age_s: float = 60.0) -> list[admin_pb2.ReplicaStatus]:
        """Replicas that reported within max_age_s. Heartbeats older than
        FORGET_REPLICA_S (a replica that died without saying so) are deleted."""
        raw = await self.redis.hgetall(self.keys.replicas)
        now = time.time()
        every = [admin_pb2.ReplicaStatus.FromString(v) for v in raw.values()]
        age = {r.replica_id: now - r.seen.ToNanoseconds() / 1e9 for r in every}
        dead = [rid for rid, a in age.items() if a > FORGET_REPLICA_S]
        if dead:
            await self.redis.hdel(self.keys.replicas, *dead)
        live = [r for r in every if age[r.replica_id] <= max_age_s]
        return sorted(live, key=lambda r: r.replica_id)

    async def forget(self, version: str, actor: str, reason: str) -> None:
        """Unregister a version (retention). Refused, atomically, while an alias names
        it; a promote that looked it up before cannot then make it an alias target."""

        async def drop(pipe) -> None:
            raw = await pipe.hgetall(self.keys.aliases)
            aliases = {v.decode(): k.decode() for k, v in raw.items()}
            if version in aliases:
                raise RegistryError(f"{version} is {aliases[version]!r}; it is kept")
            pipe.multi()
            pipe.hdel(self.keys.versions, version)
            self._audit(pipe, actor, "prune", "", version, "", reason)

        await self._transaction(drop, self.keys.aliases, self.keys.versions)

    async def forget_replica(self, replica_id: str) -> None:
        await self.redis.hdel(self.keys.replicas, replica_id)

    async def audit_log(self, count: int = 100) -> list[records_pb2.AuditRecord]:
        """The newest `count` audit records, newest first."""
        entries = await self.redis.xrevrange(self.keys.audit_stream, count=count)
        return [records_pb2.AuditRecord.FromString(f[DATA_FIELD]) for _, f in entries]

    # ---- plumbing ---------------------------------------------------------------------

    async def _transaction(self, body: Callable[..., Awaitable[T]], *watch: str) -> T:
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(*watch)
                    result = await body(pipe)
                    if len(pipe):  # the body queued a MULTI (both pipelines count it so)
                        await pipe.execute()
                    return result
                except WatchError:
                    continue  # someone else moved an alias meanwhile: read again

    async def _still_registered(self, pipe, version: str) -> None:
        """Inside a transaction that watches the versions hash: a version pruned since it
        was looked up cannot become an alias target."""
        if not await pipe.hexists(self.keys.versions, version):
            raise UnknownVersion(f"version {version!r} is not registered")

    async def _watched_alias(self, pipe, name: str) -> str:
        value = await pipe.hget(self.keys.aliases, name)
        return value.decode() if value is not None else ""

    def _audit(self, pipe, actor, action, alias, old, new, reason) -> None:
        record = records_pb2.AuditRecord(
            actor=actor, action=action, alias=alias, from_version=old or "",
            to_version=new or "", reason=reason or "", at=now_ts(),
        )  # fmt: skip
        pipe.xadd(
            self.keys.audit_stream,
            {DATA_FIELD: record.SerializeToString()},
            maxlen=AUDIT_MAXLEN,
            approximate=True,
        )

    def _event(self, pipe, action: str, alias: str, version: str) -> None:
        """Publish a RegistryEvent in the transaction. In a Redis Cluster it is sharded
        pub/sub (SPUBLISH): the channel has the registry's hash tag, so it goes in the
        same MULTI, and only the node of that slot carries it."""
        event = records_pb2.RegistryEvent(action=action, alias=alias, version=version, at=now_ts())
        if self.cluster:
            pipe.spublish(self.keys.events, event.SerializeToString())
        else:
            pipe.publish(self.keys.events, event.SerializeToString())

    async def events(self) -> AsyncIterator[bytes]:
        """Each RegistryEvent (serialized) as it is published, until the connection breaks
        (the error is raised: a follower polls meanwhile, then listens again). Events sent
        while nobody listens are lost; followers poll as well."""
        if not self.cluster:
            async with self.redis.pubsub() as pubsub:
                await pubsub.subscribe(self.keys.events)
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        yield message["data"]
            return
        await self.redis.initialize()  # the slot map: ssubscribe looks the node up in it
        pubsub = self.redis.pubsub()
        try:
            await pubsub.ssubscribe(self.keys.events)
            while True:
                message = await pubsub.get_sharded_message(
                    ignore_subscribe_messages=True, timeout=1.0
                )
                if message is not None and message["type"] in ("smessage", b"smessage"):
                    yield message["data"]
        finally:
            await pubsub.aclose()

    @staticmethod
    def _change(alias: str, old: str, new: str, actor: str) -> admin_pb2.AliasChange:
        return admin_pb2.AliasChange(
            alias=alias, from_version=old or "", to_version=new, actor=actor, at=now_ts()
        )


def _canary_state(version: str, values: list[bytes | None], users: int) -> admin_pb2.CanaryState:
    """A CanaryState from the state hash's values of _CANARY_FIELDS (in that order, None
    where absent) and the canary's distinct-user count."""
    fields = {k: v.decode() for k, v in zip(_CANARY_FIELDS, values, strict=True) if v is not None}
    wins, losses, ties = (int(fields.get(k, 0)) for k in ("wins", "losses", "ties"))
    total = wins + losses + ties
    return admin_pb2.CanaryState(
        version=version,
        share=float(fields.get("share", 0)),
        wins=wins,
        losses=losses,
        ties=ties,
        win_rate=(wins + ties / 2) / total if total else 0.0,
        promote_at=float(fields.get("promote_at", 0)),
        rollback_at=float(fields.get("rollback_at", 0)),
        min_comparisons=int(fields.get("min_comparisons", 0)),
        min_users=int(fields.get("min_users", DEFAULT_MIN_USERS)),
        users=users,
    )


def version_info(manifest: Manifest, store: ModelStore) -> admin_pb2.VersionInfo:
    """The registry entry of a version in the store, from its manifest."""
    gate = manifest.gate or {}
    info = admin_pb2.VersionInfo(
        id=manifest.id, parent=manifest.parent, kind=manifest.kind,
        base_model=manifest.base_model, path=str(store.path(manifest.id)),
        metrics=manifest.metrics, checksum=manifest.checksum,
        feedback_count=len(manifest.feedback_ids),
        gate=admin_pb2.Gate(
            passed=bool(gate.get("passed", False)), reason=str(gate.get("reason", "")),
            measures={k: float(v) for k, v in gate.items() if isinstance(v, int | float)
                      and not isinstance(v, bool)},
        ),
        excluded_users=manifest.excluded_users,
        excluded_feedback=manifest.excluded_feedback,
    )  # fmt: skip
    info.created.FromNanoseconds(int(manifest.created * 1e9))
    return info


async def ensure_registered(
    registry: Registry, store: ModelStore, manifest: Manifest, actor: str
) -> bool:
    """Register a stored version if the registry does not know it (a publisher killed
    between the store write and the registry write). True if it was missing."""
    try:
        await registry.get(manifest.id)
        return False
    except UnknownVersion:
        await registry.register(version_info(manifest, store), actor)
        return True


async def prune_versions(
    registry: Registry,
    store: ModelStore,
    keep: int,
    also_keep: Iterable[str] = (),
    actor: str = "learner",
) -> list[str]:
    """Retention: unregister and delete all but the newest `keep` published versions.
    Never an alias target (current, previous, canary), never `also_keep`, never the full
    weights a kept LoRA version applies to. Returns the ids removed."""
    import asyncio

    infos = [i for i in await registry.list() if i.kind != "base"]  # newest first
    protected = set((await registry.aliases()).values()) | set(also_keep)
    protected |= {i.id for i in infos[:keep]}
    protected |= {i.base_model for i in infos if i.id in protected and i.kind == "lora"}
    removed = []
    for info in infos:
        if info.id in protected:
            continue
        try:
            await registry.forget(info.id, actor, f"retention: the newest {keep} are kept")
        except RegistryError as e:  # became an alias target meanwhile
            log.info("not pruning %s: %s", info.id, e)
            continue
        await asyncio.to_thread(store.delete, info.id)
        removed.append(info.id)
    if removed:
        log.info("pruned %d version(s): %s", len(removed), ", ".join(removed))
    return removed


async def publish_version(
    registry: Registry,
    store: ModelStore,
    src_dir: str,
    *,
    kind: str,
    parent: str,
    base_model: str,
    feedback_ids: tuple[str, ...] | list[str] = (),
    metrics: dict[str, float] | None = None,
    gate: dict | None = None,
    excluded_users: tuple[str, ...] | list[str] = (),
    excluded_feedback: int = 0,
    actor: str = "learner",
) -> admin_pb2.VersionInfo:
    """Publish a checkpoint as the next version: atomically into the store first, then
    into the registry. It is not promoted; call Registry.promote for that.
    excluded_users/excluded_feedback: whose feedback the round left out, and how much."""
    import asyncio

    version_id = await registry.next_version_id()
    manifest = await asyncio.to_thread(
        store.publish, src_dir, version_id, parent=parent, kind=kind, base_model=base_model,
        feedback_ids=list(feedback_ids), metrics=metrics or {}, gate=gate or {},
        excluded_users=list(excluded_users), excluded_feedback=excluded_feedback,
    )  # fmt: skip
    info = version_info(manifest, store)
    await registry.register(info, actor)
    return info

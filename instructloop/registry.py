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
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TypeVar

import redis.asyncio as aioredis
from google.protobuf.timestamp_pb2 import Timestamp
from redis.exceptions import WatchError

from instructloop.keys import DATA_FIELD, Keys
from instructloop.secretfile import load_secret
from instructloop.store import Manifest, ModelStore
from instructloop.v1 import admin_pb2, records_pb2

log = logging.getLogger(__name__)

CURRENT, PREVIOUS, CANARY = "current", "previous", "canary"
MAX_CANARY_SHARE = 0.5
T = TypeVar("T")

# Claim the decision on a canary for one replica: every replica counts outcomes and may see
# the threshold crossed at once, but only the first claim wins, and only while the canary
# is still that version (a decision clears it; a new canary starts with no claim).
# KEYS: aliases, canary state. ARGV: canary alias name, version. Reply: 1 if claimed.
_CLAIM_CANARY_DECISION = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
return redis.call('HSETNX', KEYS[2], 'decided', '1')
"""


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

    def __init__(self, redis: aioredis.Redis, keys: Keys, signing_key: bytes | None = None):
        self.redis = redis
        self.keys = keys
        self.signing_key = signing_key
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
            if auto and await pipe.exists(self.keys.freeze):
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
    ) -> admin_pb2.AliasChange:
        """Route `share` of traffic to `version`; an empty version clears the canary.
        Starting a canary resets its win/loss counts."""
        if version:
            await self.get(version)
            if not 0 < share <= MAX_CANARY_SHARE:
                raise ValueError(f"canary share must be in (0, {MAX_CANARY_SHARE}]; got {share}")
            for name, value in (("promote_at", promote_at), ("rollback_at", rollback_at)):
                if not 0 <= value <= 1:
                    raise ValueError(f"{name} is a win rate in [0, 1]; got {value}")

        async def move(pipe) -> admin_pb2.AliasChange:
            old = await self._watched_alias(pipe, CANARY)
            pipe.multi()
            pipe.delete(self.keys.canary)
            if version:
                pipe.hset(self.keys.aliases, CANARY, version)
                pipe.hset(self.keys.canary, mapping={
                    "share": repr(float(share)), "promote_at": repr(float(promote_at)),
                    "rollback_at": repr(float(rollback_at)),
                    "min_comparisons": int(min_comparisons),
                    "wins": 0, "losses": 0, "ties": 0,
                })  # fmt: skip
            else:
                pipe.hdel(self.keys.aliases, CANARY)
            self._audit(pipe, actor, "canary", CANARY, old, version, reason or f"share={share}")
            self._event(pipe, "canary", CANARY, version)
            return self._change(CANARY, old, version, actor)

        return await self._transaction(move, self.keys.aliases)

    async def canary(self) -> tuple[str | None, float]:
        """The canary version and its traffic share (None, 0.0 when there is none)."""
        state = await self.canary_state()
        return (state.version or None), state.share

    async def canary_state(self) -> admin_pb2.CanaryState:
        version = await self.alias(CANARY)
        raw = await self.redis.hgetall(self.keys.canary)
        if not version or not raw:
            return admin_pb2.CanaryState()
        f = {k.decode(): v.decode() for k, v in raw.items()}
        wins, losses, ties = int(f.get("wins", 0)), int(f.get("losses", 0)), int(f.get("ties", 0))
        total = wins + losses + ties
        return admin_pb2.CanaryState(
            version=version, share=float(f.get("share", 0)), wins=wins, losses=losses,
            ties=ties, win_rate=(wins + ties / 2) / total if total else 0.0,
            promote_at=float(f.get("promote_at", 0)), rollback_at=float(f.get("rollback_at", 0)),
            min_comparisons=int(f.get("min_comparisons", 0)),
        )  # fmt: skip

    async def record_canary_outcomes(self, version: str, wins: int, losses: int, ties: int) -> str:
        """Count preference outcomes of `version` (the canary) against current, then act
        on the operator's thresholds. Returns "", "promoted", "ended" or "frozen"."""
        if await self.alias(CANARY) != version:
            return ""  # the canary changed meanwhile: these outcomes are for an old one
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(self.keys.canary, "wins", wins)
            pipe.hincrby(self.keys.canary, "losses", losses)
            pipe.hincrby(self.keys.canary, "ties", ties)
            await pipe.execute()
        state = await self.canary_state()
        total = state.wins + state.losses + state.ties
        if state.version != version or total < max(state.min_comparisons, 1):
            return ""
        promote = bool(state.promote_at) and state.win_rate >= state.promote_at
        end = bool(state.rollback_at) and state.win_rate <= state.rollback_at
        if not (promote or end):
            return ""
        claim = [self.keys.aliases, self.keys.canary], [CANARY, version]
        if not await self._claim_canary_decision(*claim):
            return ""  # another replica decides this canary
        why = f"canary win rate {state.win_rate:.3f} over {total} comparisons"
        if promote:
            try:
                await self.promote(version, "canary-judge", why, auto=True)
            except Frozen:
                await self.redis.hdel(self.keys.canary, "decided")  # decide after unfreeze
                return "frozen"
            await self.set_canary("canary-judge", "", 0.0, f"promoted: {why}")
            return "promoted"
        await self.set_canary("canary-judge", "", 0.0, f"ended: {why}")
        return "ended"

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
                    if pipe.explicit_transaction:
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
        event = records_pb2.RegistryEvent(action=action, alias=alias, version=version, at=now_ts())
        pipe.publish(self.keys.events, event.SerializeToString())

    @staticmethod
    def _change(alias: str, old: str, new: str, actor: str) -> admin_pb2.AliasChange:
        return admin_pb2.AliasChange(
            alias=alias, from_version=old or "", to_version=new, actor=actor, at=now_ts()
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
    actor: str = "learner",
) -> admin_pb2.VersionInfo:
    """Publish a checkpoint as the next version: atomically into the store first, then
    into the registry. It is not promoted; call Registry.promote for that."""
    import asyncio

    version_id = await registry.next_version_id()
    manifest = await asyncio.to_thread(
        store.publish, src_dir, version_id, parent=parent, kind=kind, base_model=base_model,
        feedback_ids=list(feedback_ids), metrics=metrics or {}, gate=gate or {},
    )  # fmt: skip
    info = version_info(manifest, store)
    await registry.register(info, actor)
    return info

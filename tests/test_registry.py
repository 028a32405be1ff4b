"""The registry against a real redis-server: decisions that several replicas race to make."""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis

from instructloop.keys import Keys
from instructloop.registry import Registry
from instructloop.v1 import admin_pb2


async def _replicas(url: str, prefix: str, count: int) -> list[Registry]:
    """`count` registries on their own connections, as `count` server replicas hold them."""
    return [Registry(aioredis.Redis.from_url(url), Keys(prefix)) for _ in range(count)]


async def _canary_race(url: str, thresholds: dict, outcome: dict) -> tuple[list[str], list[str]]:
    """8 replicas each count one outcome of canary v1 at once; the 8th crosses
    min_comparisons. Returns each replica's decision and the canary judge's audit actions."""
    prefix = f"reg-{uuid.uuid4().hex[:8]}"
    replicas = await _replicas(url, prefix, 8)
    first = replicas[0]
    for vid in ("v0", "v1"):
        await first.register(admin_pb2.VersionInfo(id=vid, kind="full"), actor="test")
    await first.promote("v0", "test", "base")
    await first.set_canary("test", "v1", 0.5, "A/B", min_comparisons=8, **thresholds)
    # Every replica counts the outcome that crosses the threshold at the same moment.
    decisions = await asyncio.gather(*(r.record_canary_outcomes("v1", **outcome) for r in replicas))
    actions = [a.action for a in await first.audit_log() if a.actor == "canary-judge"]
    for r in replicas:
        await r.redis.aclose()
    return decisions, actions


def test_one_replica_promotes_a_winning_canary(redis_server):
    decisions, actions = asyncio.run(
        _canary_race(redis_server.url, {"promote_at": 0.6}, {"wins": 1, "losses": 0, "ties": 0})
    )
    assert decisions.count("promoted") == 1, decisions
    assert set(decisions) == {"promoted", ""}, decisions
    assert actions.count("auto-promote") == 1, actions


def test_one_replica_ends_a_losing_canary(redis_server):
    decisions, actions = asyncio.run(
        _canary_race(redis_server.url, {"rollback_at": 0.4}, {"wins": 0, "losses": 1, "ties": 0})
    )
    assert decisions.count("ended") == 1, decisions
    assert len(actions) == 1, actions

"""The rolling-swap turn (serve/swapturn.py) on a real redis-server: one holder at a
time, the holder's renewals keep it, a dead holder's turn expires, and giving it back
deletes only one's own. And the status a swap advertises (serve/health.py)."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from instructloop.keys import Keys
from instructloop.serve.health import NOT_SERVING, SERVING, ServingHealth
from instructloop.serve.swapturn import SwapTurn

KEY = Keys("turn-test").swap_turn


def _run(redis_url: str, body) -> None:
    async def go():
        client = aioredis.Redis.from_url(redis_url)
        try:
            await client.delete(KEY)
            await body(client)
        finally:
            await client.delete(KEY)
            await client.aclose()

    asyncio.run(go())


def test_holder_renews_and_others_wait(redis_server):
    async def body(client):
        a = SwapTurn(client, KEY, "a", ttl_s=0.6, retry_s=0.05)
        b = SwapTurn(client, KEY, "b", ttl_s=0.6, retry_s=0.05)
        order = []

        async def swap(turn, name, seconds):
            async with turn.hold():
                order.append(f"{name}+")
                await asyncio.sleep(seconds)
                order.append(f"{name}-")

        first = asyncio.create_task(swap(a, "a", 2.0))  # over 3 TTLs: kept only by renewals
        await asyncio.sleep(0.1)
        assert (await b.holder()).startswith("a ")
        started = time.monotonic()
        await swap(b, "b", 0.0)
        await first
        assert order == ["a+", "a-", "b+", "b-"], "b must wait for a, however long a holds"
        assert time.monotonic() - started > 1.5
        assert not a.lost and await client.get(KEY) is None  # both gave it back

    _run(redis_server.url, body)


def test_a_dead_holders_turn_expires(redis_server):
    async def body(client):
        dead = SwapTurn(client, KEY, "dead", ttl_s=0.5)
        await dead.acquire()  # and never renews nor releases: SIGKILLed mid-swap
        alive = SwapTurn(client, KEY, "alive", ttl_s=0.5, retry_s=0.05)
        waited = await alive.acquire()
        assert 0.3 < waited < 1.5
        assert (await alive.holder()).startswith("alive ")

    _run(redis_server.url, body)


def test_release_and_renew_compare_before_they_touch(redis_server):
    async def body(client):
        old = SwapTurn(client, KEY, "old", ttl_s=0.3)
        await old.acquire()
        await asyncio.sleep(0.5)  # expired
        new = SwapTurn(client, KEY, "new", ttl_s=5)
        await new.acquire()
        assert not await old.renew(), "renewing someone else's turn"
        assert not await old.release(), "releasing someone else's turn"
        assert (await client.get(KEY)).decode() == new.value
        assert await client.pttl(KEY) > 4000
        assert await new.release()
        assert await client.get(KEY) is None

    _run(redis_server.url, body)


def test_engine_checks_cannot_end_a_swaps_not_serving():
    """_watch_health reports the engine every few seconds; while a swap drains the
    replica that must not flip it back to SERVING (nor the /healthz mirror)."""
    from grpc_health.v1 import health, health_pb2

    async def go():
        servicer = health.aio.HealthServicer()
        serving = ServingHealth(servicer, ("", "svc"))

        async def status(name):
            request = health_pb2.HealthCheckRequest(service=name)
            return (await servicer.Check(request, None)).status

        await serving.set_engine_ok(True)
        assert serving.serving and await status("svc") == SERVING
        await serving.set_swapping(True)
        await serving.set_engine_ok(True)  # the periodic check, mid-swap
        assert not serving.serving
        assert [await status(n) for n in ("", "svc")] == [NOT_SERVING, NOT_SERVING]
        await serving.set_swapping(False)
        assert serving.serving and await status("") == SERVING
        await serving.set_engine_ok(False)
        assert await status("svc") == NOT_SERVING
        await serving.set_engine_ok(True)
        await serving.stop()
        assert await status("") == NOT_SERVING and not serving.serving

    asyncio.run(go())

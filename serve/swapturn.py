"""Rolling swaps: one replica of a fleet takes a full-weight swap at a time.

A full-weight swap takes its replica out of the load balancer (NOT_SERVING, then a
drain), so the fleet serves on N-1 replicas meanwhile; two at once would leave N-2. The
turn is one Redis key: `SET key "<replica> <token>" NX PX ttl` takes it, the holder
renews it every ttl/3 while it swaps (compare-and-pexpire), and gives it back only if it
still holds it (compare-and-delete), each one Lua script. A replica killed mid-swap
cannot give it back: its turn expires after at most one TTL and the next replica goes.

Imports: redis only; the follower (serve/versions.py) decides when to take a turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

log = logging.getLogger(__name__)

# KEYS[1] the turn, ARGV[1] our value, ARGV[2] the TTL in ms: 1 if renewed, 0 if not ours.
RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS[1] the turn, ARGV[1] our value: 1 if released, 0 if it was no longer ours.
RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class SwapTurn:
    """The fleet's one swap turn, as seen by one replica."""

    def __init__(
        self,
        redis: aioredis.Redis,
        key: str,
        replica_id: str,
        *,
        ttl_s: float = 10.0,
        wait_log_s: float = 60.0,
        retry_s: float = 0.2,
    ) -> None:
        self.redis = redis
        self.key = key
        self.replica_id = replica_id
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.wait_log_s = wait_log_s
        self.retry_s = retry_s
        self.value = ""  # while we hold the turn: "<replica> <token>"
        self.lost = False  # the turn expired (or was taken) while we held it

    async def holder(self) -> str | None:
        """Who holds the turn now ('<replica> <token>'), or None."""
        value = await self.redis.get(self.key)
        return value.decode() if isinstance(value, bytes) else value

    async def acquire(self, what: str = "") -> float:
        """Wait for the turn and take it; returns the seconds waited. Every wait_log_s
        without it, log who holds it and keep waiting: meanwhile this replica serves its
        old version (every response names it). Redis errors propagate."""
        value = f"{self.replica_id} {secrets.token_hex(8)}"
        started = time.monotonic()
        next_log = started + self.wait_log_s
        while not await self.redis.set(self.key, value, nx=True, px=self.ttl_ms):
            now = time.monotonic()
            if now >= next_log:
                log.warning(
                    "waited %.0fs for the swap turn (held by %s); still serving the old "
                    "version, still waiting%s",
                    now - started, await self.holder(), f" ({what})" if what else "",
                )  # fmt: skip
                next_log = now + self.wait_log_s
            await asyncio.sleep(self.retry_s * random.uniform(0.5, 1.5))
        self.value, self.lost = value, False
        return time.monotonic() - started

    async def renew(self) -> bool:
        """Extend our turn by one TTL; False if it is no longer ours."""
        ok = await self.redis.eval(RENEW, 1, self.key, self.value, self.ttl_ms)
        return bool(ok)

    async def release(self) -> bool:
        """Give the turn back if we still hold it; False if it had expired (or was taken)."""
        value, self.value = self.value, ""
        if not value:
            return False
        return bool(await self.redis.eval(RELEASE, 1, self.key, value))

    async def _keep(self) -> None:
        """Renew every ttl/3 until cancelled. A failed renewal is logged, and the swap goes
        on: it cannot be undone half way, and the fleet's next replica waits at most one
        TTL more."""
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            try:
                if not await self.renew():
                    self.lost = True
                    log.error(
                        "lost the swap turn while swapping (it expired: Redis or this "
                        "process stalled longer than its TTL); another replica may swap now"
                    )
                    return
            except Exception as e:  # Redis unreachable: retry at the next beat
                log.warning("could not renew the swap turn: %s", e)

    @contextlib.asynccontextmanager
    async def hold(self, what: str = "") -> AsyncIterator[float]:
        """Hold the turn for the body (yields the seconds waited for it)."""
        waited = await self.acquire(what)
        keeper = asyncio.create_task(self._keep(), name="swap-turn-renew")
        try:
            yield waited
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            try:
                if not await self.release() and not self.lost:
                    log.warning("the swap turn had expired before it was given back")
            except Exception as e:  # it expires by itself within one TTL
                log.warning("could not give the swap turn back (it expires by itself): %s", e)

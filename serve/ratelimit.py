"""Per-user rate limits and quotas, enforced in Redis with the `limits` library.

Each kind of call has its own limits, written in `limits`' notation ("120/minute",
"5000/day", several joined with ";"), and every user has its own window per limit:

  samples   Generate and GenerateStream, each call costing its n (samples asked for);
  feedback  SubmitFeedback, each call costing 1;
  tasks     NextTask (the labeling queue), each call costing 1.

The windows are moving windows (`limits`' MovingWindowRateLimiter: a Lua script per hit,
atomic in Redis, so every replica shares one count). Each window is one key, so in a
Redis Cluster the windows spread over the masters. A refused call gets
RESOURCE_EXHAUSTED and the trailing metadata `retry-after`: seconds until the oldest
counted hit leaves its window. Bound: one Redis list per (user, limit), at most the
limit's amount long, expiring with its window.

When Redis does not answer, a call is admitted (and counted in the metrics): serving goes
on through a Redis outage, and feedback fails there by itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from limits import RateLimitItem, parse_many
from limits.aio.storage import RedisClusterStorage, RedisSentinelStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter

from instructloop.redis_client import AsyncClient, parse_redis_url

from .errors import ResourceExhausted

log = logging.getLogger(__name__)

KINDS = ("samples", "feedback", "tasks")


def parse_limits(text: str, option: str) -> list[RateLimitItem]:
    """Limits from their notation; "" means none. ValueError names the option."""
    if not text.strip():
        return []
    try:
        return sorted(parse_many(text), key=lambda item: item.get_expiry())
    except ValueError as e:
        raise ValueError(
            f"{option}: cannot read {text!r} ({e}); write e.g. '120/minute' or '60/minute;5000/day'"
        ) from None


class OverLimit(ResourceExhausted):
    """A user over one of its limits: RESOURCE_EXHAUSTED with a retry-after."""

    def __init__(self, kind: str, limit: str, retry_after_s: float):
        self.kind, self.limit, self.retry_after_s = kind, limit, retry_after_s
        super().__init__(
            f"rate limit for {kind}: {limit} per user is used up; retry in "
            f"{retry_after_s:.1f}s (trailing metadata retry-after)"
        )


class RateLimiter:
    def __init__(
        self,
        url: str,
        redis: AsyncClient,
        prefix: str,
        limits: dict[str, list[RateLimitItem]],
        timeout_s: float,
        on_unchecked=lambda: None,
    ):
        """url: the --redis-url. One Redis: the limiter shares `redis`'s connection pool.
        A cluster or Sentinel: `limits` makes its own client from the same URL (its
        schemes are ours with "async+" in front), with the same timeouts."""
        target = parse_redis_url(url)
        if target.kind == "single":
            storage = RedisStorage(
                "async+redis://",
                implementation="redispy",
                key_prefix=prefix,
                connection_pool=redis.connection_pool,
            )
        else:
            storage_class = (
                RedisClusterStorage if target.kind == "cluster" else RedisSentinelStorage
            )
            storage = storage_class(
                target.limits_url,
                implementation="redispy",
                key_prefix=prefix,
                socket_connect_timeout=timeout_s,
                socket_timeout=timeout_s,
                **({"use_replicas": False} if target.kind == "sentinel" else {}),
            )
        self._limiter = MovingWindowRateLimiter(storage)
        self.limits = limits
        self.timeout_s = timeout_s
        self.on_unchecked = on_unchecked  # called for each call admitted unchecked

    async def hit(self, kind: str, user: str, cost: int = 1) -> None:
        """Count `cost` against each of `kind`'s limits of `user`; OverLimit if one is
        used up (the shorter windows are counted first)."""
        for item in self.limits.get(kind, ()):
            try:
                async with asyncio.timeout(self.timeout_s):
                    if await self._limiter.hit(item, kind, user, cost=cost):
                        continue
                    stats = await self._limiter.get_window_stats(item, kind, user)
            except Exception as e:  # noqa: BLE001 - Redis out or slow: admit, count, warn
                self.on_unchecked()
                log.warning("rate limit not checked (Redis): %s", type(e).__name__)
                return
            wait = max(0.0, stats.reset_time - time.time())
            raise OverLimit(kind, str(item), math.ceil(wait * 10) / 10)

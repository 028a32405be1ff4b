"""One `--redis-url`, three kinds of Redis: the only place a URL becomes a client.

    redis://[:PASSWORD@]host:port/db     one Redis (also rediss:// for TLS, unix://PATH)
    redis+cluster://[:PASSWORD@]h:p[,h:p]  a Redis Cluster; any reachable nodes, the rest
                                          are discovered (redis-py RedisCluster)
    redis+sentinel://[:PASSWORD@]h:p[,h:p]/SERVICE  the primary that these Sentinels name
                                          SERVICE (redis-py Sentinel); a failover moves
                                          the clients to the new primary

The schemes are the `limits` library's (serve/ratelimit.py gives it the same URL with
"async+" in front). The password of a Sentinel URL is used for the Sentinels and the
Redis alike, as `limits` does. TLS is for one Redis only (rediss://).

Every client gets connect and read timeouts (`timeout_s`): a Redis that stops answering
fails a call instead of hanging it. Commands that block on the server (XREADGROUP BLOCK,
WAIT) must block for less than `timeout_s`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.sentinel import Sentinel

CLUSTER_SCHEME = "redis+cluster"
SENTINEL_SCHEME = "redis+sentinel"
DEFAULT_PORT = 6379
# Errors a call is retried on (twice, backing off up to 0.5 s): a dropped connection, a
# failover in progress. Each attempt still has the timeouts.
RETRY_ON = [RedisConnectionError, RedisTimeoutError, ConnectionResetError]

AsyncClient = aioredis.Redis | AsyncRedisCluster
SyncClient = redis.Redis | RedisCluster


@dataclass(frozen=True)
class RedisTarget:
    """What a --redis-url names."""

    kind: str  # "single", "cluster" or "sentinel"
    url: str
    nodes: tuple[tuple[str, int], ...] = ()  # cluster start nodes, or the Sentinels
    service: str = ""  # the Sentinel service name (the primary's name)
    username: str | None = None
    password: str | None = None

    @property
    def limits_url(self) -> str:
        """The URL for the `limits` library's async storage."""
        return "async+" + self.url


def parse_redis_url(url: str) -> RedisTarget:
    """The target of a --redis-url; ValueError with a usable message if it is not one."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in (CLUSTER_SCHEME, SENTINEL_SCHEME):
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"--redis-url must start with redis://, rediss://, unix://, "
                f"{CLUSTER_SCHEME}:// or {SENTINEL_SCHEME}://; got {scheme or 'no scheme'}"
            )
        return RedisTarget("single", url)
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    nodes = []
    for hostport in hosts.split(","):
        host, _, port = hostport.strip().rpartition(":")
        if not host:
            host, port = port, str(DEFAULT_PORT)
        if not host or not port.isdigit():
            raise ValueError(f"--redis-url: cannot read {hostport!r} as host:port")
        nodes.append((host, int(port)))
    service = parts.path.strip("/")
    if scheme == SENTINEL_SCHEME and not service:
        raise ValueError(
            f"--redis-url: a Sentinel URL names its service, e.g. "
            f"{SENTINEL_SCHEME}://host:26379/mymaster"
        )
    if scheme == CLUSTER_SCHEME and service and service != "0":
        raise ValueError("--redis-url: a Redis Cluster has only database 0")
    if parse_qs(parts.query):
        raise ValueError(
            f"--redis-url: {scheme}:// takes no ?options (TLS is for a single Redis, rediss://)"
        )
    kind = "cluster" if scheme == CLUSTER_SCHEME else "sentinel"
    return RedisTarget(
        kind, url, tuple(nodes), service, unquote(username) or None, unquote(password) or None
    )


def _auth(target: RedisTarget) -> dict[str, Any]:
    return {"username": target.username, "password": target.password}


def connect_async(url: str, *, timeout_s: float, max_connections: int = 64) -> AsyncClient:
    """An asyncio client. One Redis: a pool that waits (at most timeout_s) for a free
    connection instead of failing. A cluster: at most max_connections per node. Sentinel:
    a pool on the current primary, found again through the Sentinels after a failover."""
    target = parse_redis_url(url)
    timeouts = {"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s}
    retry = {"retry": AsyncRetry(ExponentialBackoff(cap=0.5, base=0.05), retries=2)}
    if target.kind == "single":
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,  # wait for a free connection at most this long
            retry_on_error=RETRY_ON,
            health_check_interval=10,
            **retry,
            **timeouts,
        )
        return aioredis.Redis(connection_pool=pool)
    if target.kind == "cluster":
        return AsyncRedisCluster(
            startup_nodes=[AsyncClusterNode(h, p) for h, p in target.nodes],
            max_connections=max_connections,
            retry_on_error=RETRY_ON,
            **retry,
            **timeouts,
            **_auth(target),
        )
    sentinel = AsyncSentinel(
        list(target.nodes), sentinel_kwargs={**timeouts, **_auth(target)}, **timeouts
    )
    return sentinel.master_for(
        target.service,
        redis_class=aioredis.Redis,
        max_connections=max_connections,
        retry_on_error=RETRY_ON,
        health_check_interval=10,
        **retry,
        **_auth(target),
    )


def connect_sync(url: str, *, timeout_s: float) -> SyncClient:
    """A blocking client (the learner's), with the same kinds and timeouts."""
    target = parse_redis_url(url)
    timeouts = {"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s}
    retry = {"retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2)}
    if target.kind == "single":
        return redis.Redis.from_url(url, retry_on_error=RETRY_ON, **retry, **timeouts)
    if target.kind == "cluster":
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in target.nodes],
            retry_on_error=RETRY_ON,
            **retry,
            **timeouts,
            **_auth(target),
        )
    sentinel = Sentinel(
        list(target.nodes), sentinel_kwargs={**timeouts, **_auth(target)}, **timeouts
    )
    return sentinel.master_for(target.service, retry_on_error=RETRY_ON, **retry, **_auth(target))


def is_cluster(client: object) -> bool:
    """Whether a client talks to a Redis Cluster (scripts and transactions must then stay
    in one hash slot, and registry events are sharded pub/sub)."""
    return isinstance(client, AsyncRedisCluster | RedisCluster)

"""Beyond one Redis: the URL schemes, the move to the hash-tagged key layout, a Sentinel
failover under feedback load (with and without --redis-min-replicas-ack), and one real
server on a real Redis Cluster (feedback, rate limits, registry events)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid

import pytest
import redis
from conftest import report_row
from redis_cluster import SentinelSet, redis7

from instructloop.clients import Client
from instructloop.keys import DATA_FIELD, Keys
from instructloop.migrate import migrate_layout
from instructloop.redis_client import connect_async, parse_redis_url
from instructloop.registry import Registry
from instructloop.serve.errors import Unavailable
from instructloop.serve.logstore import LogStore
from instructloop.v1 import api_pb2, records_pb2

# ---------------------------------------------------------------------------- URLs


def test_the_url_says_which_redis():
    assert parse_redis_url("redis://:pw@h:6379/2").kind == "single"
    assert parse_redis_url("rediss://h:6380/0?ssl_ca_certs=/ca.pem").kind == "single"
    assert parse_redis_url("unix:///tmp/r.sock").kind == "single"
    c = parse_redis_url("redis+cluster://:s3cret@a:7000,b:7001,c")
    assert (c.kind, c.nodes, c.password) == (
        "cluster",
        (("a", 7000), ("b", 7001), ("c", 6379)),
        "s3cret",
    )
    s = parse_redis_url("redis+sentinel://s1:26379,s2:26380/mymaster")
    assert (s.kind, s.nodes, s.service) == ("sentinel", (("s1", 26379), ("s2", 26380)), "mymaster")
    assert s.limits_url == "async+redis+sentinel://s1:26379,s2:26380/mymaster"
    for bad, says in (
        ("redis+sentinel://s1:26379", "names its service"),
        ("http://h:1", "must start with"),
        ("redis+cluster://a:x", "host:port"),
        ("redis+cluster://a:1?ssl=true", "TLS is for a single Redis"),
    ):
        with pytest.raises(ValueError, match=says):
            parse_redis_url(bad)


@pytest.mark.parametrize(
    ("url", "extra", "says"),
    [
        ("http://h:1", [], "must start with redis://"),
        ("redis+cluster://127.0.0.1:1", ["--redis-min-replicas-ack", "1"], "not a Redis Cluster"),
    ],
)
def test_the_server_refuses_a_url_or_option_that_does_not_fit(
    tiny_model, tmp_path, url, extra, says
):
    cmd = [
        sys.executable, "-m", "instructloop.cli", "serve", "--model", str(tiny_model),
        "--data-dir", str(tmp_path), "--redis-url", url, *extra,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and says in done.stderr, done.stderr[-2000:]


# ---------------------------------------------------------------------------- events


@pytest.mark.redis_kinds("single", "cluster")
def test_a_registry_change_reaches_an_event_listener(redis_server):
    """Plain pub/sub on one Redis, sharded pub/sub (SPUBLISH in the transaction) on a
    cluster: a listener gets the event of a change."""

    async def run() -> records_pb2.RegistryEvent:
        client = connect_async(redis_server.url, timeout_s=5)
        registry = Registry(client, Keys(f"ev-{uuid.uuid4().hex[:6]}"))
        events = registry.events()
        try:
            first = asyncio.ensure_future(anext(events))
            await asyncio.sleep(0.5)  # subscribed by then
            await registry.freeze("test", "an event")
            return records_pb2.RegistryEvent.FromString(await asyncio.wait_for(first, 10))
        finally:
            await events.aclose()
            await client.aclose()

    event = asyncio.run(run())
    assert (event.action, event.HasField("at")) == ("freeze", True)


# ---------------------------------------------------------------------------- migration


def test_the_old_layout_moves_to_the_tagged_one_with_ttls_groups_and_no_overwrite(redis_server):
    r, keys = redis_server.client(), Keys("mig")
    old = "mig:"
    # The old layout, as a deployment left it: streams with a group and a pending entry,
    # a prompt with its TTL, a judgement, an idempotency key, registry and user hashes.
    r.xadd(old + "stream:feedback", {DATA_FIELD: b"f1"})
    r.xadd(old + "stream:feedback", {DATA_FIELD: b"f2"})
    r.xgroup_create(old + "stream:feedback", "learner", id="0")
    r.xreadgroup("learner", "c", {old + "stream:feedback": ">"}, count=1)  # f1 pending
    r.xadd(old + "stream:prompts", {DATA_FIELD: b"p1"})
    r.set(old + "prompt:p1", b"record", ex=600)
    r.set(old + "judged:p1:alice:comparison", b"f1", ex=600)
    r.set(old + "idem:5:alice:k1", b"hash f1", ex=600)
    r.hset(old + "versions", "v0", b"info")
    r.hset(old + "aliases", "current", "v0")
    r.hset(old + "users", "alice", b"user")
    r.set(old + "learner:lease", b"kept as it is")
    # A learner that started first made the new feedback stream, empty, with its group.
    r.xgroup_create(keys.feedback_stream, "learner", id="0", mkstream=True)
    # A conflict: both names hold data (an old replica wrote after the move).
    r.hset(old + "replicas", "r1", b"old")
    r.hset(keys.replicas, "r1", b"new")

    async def migrate():
        client = connect_async(redis_server.url, timeout_s=10)
        try:
            return await migrate_layout(client, keys), await migrate_layout(client, keys)
        finally:
            await client.aclose()

    first, again = asyncio.run(migrate())
    assert first.moved == 8 and first.conflicts == ["mig:replicas"]
    assert again.moved == 0 and again.conflicts == ["mig:replicas"], "runs twice, moves once"
    assert [f[DATA_FIELD] for _, f in r.xrange(keys.feedback_stream)] == [b"f1", b"f2"]
    assert r.xpending(keys.feedback_stream, "learner")["pending"] == 1, "the group came along"
    assert r.get(keys.prompt("p1")) == b"record" and 0 < r.ttl(keys.prompt("p1")) <= 600
    assert r.get(keys.judgement("p1", "alice", "comparison")) == b"f1"
    assert r.get(keys.idempotency("alice", "k1")) == b"hash f1"
    assert r.hget(keys.aliases, "current") == b"v0" and r.hget(keys.users, "alice") == b"user"
    assert r.hget(keys.replicas, "r1") == b"new" and r.hget(old + "replicas", "r1") == b"old"
    assert r.get(keys.learner_lease) == b"kept as it is"
    assert not [k for k in r.scan_iter("mig:*") if k != b"mig:replicas" and b"lease" not in k]


# ---------------------------------------------------------------------------- Sentinel

PROMPTS = 20


def _prompt(i: int) -> records_pb2.PromptRecord:
    record = records_pb2.PromptRecord(prompt_id=f"p{i}", prompt="sort: b a\n", version="v0")
    for s in range(2):
        record.samples.add(sample_id=f"p{i}-s{s}", text=f"answer {s}")
    return record


def _feedback(n: int) -> records_pb2.FeedbackRecord:
    pid = f"p{n % PROMPTS}"
    return records_pb2.FeedbackRecord(
        feedback_id=f"f{n}",
        feedback=api_pb2.SubmitFeedbackRequest(
            prompt_id=pid,
            user_id=f"u{n}",
            idempotency_key=f"k{n}",
            choice=api_pb2.Choice(chosen_sample_id=f"{pid}-s0", rejected_sample_id=f"{pid}-s1"),
        ),
    )


FAILOVER_AT_S = 1.5
AFTER_REJOIN = 100  # acknowledged feedback after the set-up is whole again, then stop
LOAD_AT_MOST_S = 30.0


async def _load_through_failover(sentinels: SentinelSet, min_replicas_ack: int) -> dict:
    """Feedback from 16 concurrent writers; SENTINEL FAILOVER after FAILOVER_AT_S; the
    load goes on until the old primary has rejoined as a replica and AFTER_REJOIN more
    were acknowledged. Then: which acknowledged ids the new primary has."""
    store = LogStore(
        sentinels.url, Keys("fo"), prompt_ttl_s=600, timeout_s=2.0,
        min_replicas_ack=min_replicas_ack, replica_ack_timeout_s=0.5, breaker_cooldown_s=0,
    )  # fmt: skip
    before = sentinels.primary_address()
    old_primary = redis.Redis(port=before[1])
    acked: list[tuple[float, str]] = []
    unavailable = 0
    rejoined_at = None
    counter = iter(range(10**9))
    try:
        for i in range(PROMPTS):
            await store.log_prompt(_prompt(i))
        replica = redis.Redis(port=sentinels.replica_port)
        while len(list(replica.scan_iter(Keys("fo").prompt("*")))) < PROMPTS:
            await asyncio.sleep(0.05)  # the replica has every prompt before the load
        start = time.monotonic()

        def done() -> bool:
            if time.monotonic() - start > LOAD_AT_MOST_S:
                return True
            return (
                rejoined_at is not None and sum(t > rejoined_at for t, _ in acked) >= AFTER_REJOIN
            )

        async def writer() -> None:
            nonlocal unavailable
            while not done():
                record = _feedback(next(counter))
                try:
                    result = await store.submit_feedback(record)
                except Unavailable:
                    unavailable += 1
                    await asyncio.sleep(0.02)
                    continue
                acked.append((time.monotonic() - start, result.feedback_id))

        async def failover() -> None:
            nonlocal rejoined_at
            await asyncio.sleep(FAILOVER_AT_S)
            sentinels.sentinel().execute_command("SENTINEL FAILOVER", sentinels.service)
            while not done():  # the old primary turned replica and resynced
                role = old_primary.info("replication")
                if role["role"] == "slave" and role.get("master_link_status") == "up":
                    rejoined_at = time.monotonic() - start
                    return
                await asyncio.sleep(0.1)

        await asyncio.gather(failover(), *(writer() for _ in range(16)))
    finally:
        await store.close()
    after = sentinels.primary_address()
    primary = redis.Redis(host=after[0], port=after[1])
    stored = {
        records_pb2.FeedbackRecord.FromString(f[DATA_FIELD]).feedback_id
        for _, f in primary.xrange(Keys("fo").feedback_stream)
    }
    return {
        "moved": before != after,
        "rejoined_at": rejoined_at,
        "acked": len(acked),
        "acked_during": sum(FAILOVER_AT_S < t <= (rejoined_at or 1e9) for t, _ in acked),
        "acked_after": sum(t > (rejoined_at or 1e9) for t, _ in acked),
        "unavailable": unavailable,
        "lost": sum(fid not in stored for _, fid in acked),
    }


@pytest.mark.parametrize("min_replicas_ack", [1, 0])
def test_a_sentinel_failover_under_feedback_load(tmp_path, min_replicas_ack):
    """With --redis-min-replicas-ack 1 no acknowledged feedback is lost when Sentinel
    promotes the replica; without it, what the old primary acknowledged after the
    replica's last copy is lost when it rejoins as a replica (reported, not asserted: the
    window is short and may hold nothing)."""
    binary = redis7()
    if binary is None:
        pytest.skip("Sentinel here needs redis-server 7 (redis-server FILE --sentinel)")
    sentinels = SentinelSet(tmp_path, binary).start()
    try:
        got = asyncio.run(_load_through_failover(sentinels, min_replicas_ack))
    finally:
        sentinels.stop()
    report_row(
        "Sentinel failover under feedback load (16 writers; SENTINEL FAILOVER at 1.5 s)",
        f"min-replicas-ack {min_replicas_ack}",
        f"acknowledged {got['acked']}: {got['acked_during']} between the failover and the "
        f"old primary's return as a replica ({got['rejoined_at']:.1f} s), "
        f"{got['acked_after']} after",
        f"UNAVAILABLE {got['unavailable']}",
        f"acknowledged but lost {got['lost']}",
    )
    assert got["moved"], "Sentinel did not move the primary"
    assert got["acked_after"] >= AFTER_REJOIN, f"feedback did not flow again: {got}"
    if min_replicas_ack:
        assert got["lost"] == 0, got


# ---------------------------------------------------------------------------- a server on a cluster


def test_a_server_on_a_redis_cluster_logs_and_follows_events(cluster_server, redis_cluster):
    """The session's server whose --redis-url is a Redis Cluster (tests/test_feedback.py
    runs on it too): prompts and feedback land in the cluster (an idempotent retry stored
    once), and a registry change reaches the replica as a sharded pub/sub event."""
    server = cluster_server
    keys, db = Keys(server.prefix), redis_cluster.client()
    prompts_before = db.xlen(keys.prompts_stream)
    with Client(server.target, timeout=60) as client:
        gen = client.generate("sort: c a b", n=2, max_tokens=4, user_id="app")
        s = [x.sample_id for x in gen.samples]
        first = client.rank(gen.prompt_id, [s[1], s[0]], user_id="ann", idempotency_key="k")
        again = client.rank(gen.prompt_id, [s[1], s[0]], user_id="ann", idempotency_key="k")
        second = client.rank(gen.prompt_id, [s[0], s[1]], user_id="ann2")
    assert again.feedback_id == first.feedback_id
    stored = [
        records_pb2.FeedbackRecord.FromString(f[DATA_FIELD])
        for _, f in db.xrange(keys.feedback_stream)
    ]
    ours = [r.feedback_id for r in stored if r.feedback.prompt_id == gen.prompt_id]
    assert sorted(ours) == sorted([first.feedback_id, second.feedback_id])
    assert db.xlen(keys.prompts_stream) == prompts_before + 1
    assert db.exists(keys.prompt(gen.prompt_id))

    events = "instructloop_swap_phase_seconds_count"
    seen = server.metric(events)

    async def freeze():
        client = connect_async(redis_cluster.url, timeout_s=5)
        try:
            await Registry(client, keys).freeze("test", "cluster event test")
            await Registry(client, keys).unfreeze("test")
        finally:
            await client.aclose()

    asyncio.run(freeze())
    deadline = time.monotonic() + 10
    while server.metric(events) <= seen:
        assert time.monotonic() < deadline, "the registry event did not arrive"
        time.sleep(0.1)
    assert "registry events unavailable" not in server.log_path.read_text()


@pytest.mark.redis_kinds("single", "cluster")
def test_rate_limits_count_in_the_redis_the_url_names(redis_server):
    """The limiter's windows live where --redis-url points (`limits`' own cluster client
    for a cluster URL): the fourth call of a 3/minute limit is refused, whichever kind.
    A limiter that could not reach its storage would admit it (it fails open)."""
    from instructloop.serve.ratelimit import OverLimit, RateLimiter, parse_limits

    async def go():
        client = connect_async(redis_server.url, timeout_s=5)
        unchecked = []
        limiter = RateLimiter(
            redis_server.url, client, f"rl-{uuid.uuid4().hex[:6]}",
            {"feedback": parse_limits("3/minute", "--rate-limit-feedback")},
            timeout_s=5, on_unchecked=lambda: unchecked.append(1),
        )  # fmt: skip
        try:
            for _ in range(3):
                await limiter.hit("feedback", "ann")
            with pytest.raises(OverLimit) as over:
                await limiter.hit("feedback", "ann")
            await limiter.hit("feedback", "bob")  # every user has its own window
        finally:
            await client.aclose()
        assert not unchecked
        assert 0 < over.value.retry_after_s <= 60

    asyncio.run(go())

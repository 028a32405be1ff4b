"""Faults against real processes: a real redis-server (AOF) that is stopped, a real server.

Each test adds a row of figures to one table, printed at the end of the run (and kept in
the README's Operations section).
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import threading
import time

import grpc
import pytest
from conftest import launch_server, report_row, start_servers, stop_server, wait_serving
from grpc_health.v1 import health_pb2, health_pb2_grpc

from instructloop.clients import AsyncClient, Client
from instructloop.keys import DATA_FIELD, Keys
from instructloop.learner import synthetic
from instructloop.learner.consumer import ConsumerConfig, StreamConsumer
from instructloop.learner.dataset import Dataset, DatasetConfig
from instructloop.redis_embedded import EmbeddedRedis, free_port
from instructloop.serve.logstore import LogStore, RedisSettingsError
from instructloop.v1 import records_pb2

PREFIX = "faults"
REDIS_TIMEOUT_S = 1.0
STALL_S = 15.0
CALL_DEADLINE_S = 15.0
LOGGING_HEALTH = "instructloop.logging"
POOL = 8  # Redis connections of the server
ADMITTED = 128  # Generate calls in flight
TABLE = "faults: what was done | what happened | what must happen"


@pytest.fixture(scope="module")
def rig(tiny_model, tmp_path_factory):
    """A Redis of its own (it is stopped here) and a server with a 1 s Redis deadline."""
    work = tmp_path_factory.mktemp("faults")
    redis = EmbeddedRedis(work / "redis", port=free_port()).start()
    # A small connection pool and admission limit, so that a burst must wait for both.
    (server,) = start_servers(tiny_model, redis.url, [work / "server"], PREFIX,
                              "--redis-timeout-s", str(REDIS_TIMEOUT_S),
                              "--redis-max-connections", str(POOL),
                              "--max-concurrent-requests", str(ADMITTED))  # fmt: skip
    yield redis, server
    os.kill(redis.proc.pid, signal.SIGCONT)  # never leave it stopped
    code = stop_server(server)
    redis.stop()
    assert code == 0, server.log_tail()


def _logged_prompt_ids(redis: EmbeddedRedis) -> set[str]:
    entries = redis.client().xrange(Keys(PREFIX).prompts_stream)
    return {records_pb2.PromptRecord.FromString(f[DATA_FIELD]).prompt_id for _, f in entries}


def _health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return reply.status


def _wait_health(target: str, service: str, status: int, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if _health(target, service) == status:
            return time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"health of {service!r} did not become {status} in {timeout}s")


def test_a_stopped_redis_costs_each_call_its_deadline_and_everything_recovers(rig):
    redis, server = rig
    calls: list[tuple[float, str, bool]] = []  # (seconds, prompt id, logged)
    failures: list[BaseException] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        with Client(server.target, timeout=CALL_DEADLINE_S, max_attempts=1) as c:
            while not stop.is_set():
                start = time.monotonic()
                try:
                    r = c.generate(f"reverse: load{worker}", n=2, max_tokens=4, temperature=1.0)
                    calls.append((time.monotonic() - start, r.prompt_id, r.logged))
                except grpc.RpcError as e:
                    failures.append(e)

    with Client(server.target, timeout=CALL_DEADLINE_S, max_attempts=1) as c:
        before = c.generate("sort: c b a", n=2, max_tokens=4, temperature=1.0)
        assert before.logged
        threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        os.kill(redis.proc.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            time.sleep(1.0)
            with pytest.raises(grpc.RpcError) as err:  # feedback cannot be stored: retry later
                c.rank(before.prompt_id, [s.sample_id for s in before.samples], user_id="f1")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            details = err.value.details()  # the deadline, or the breaker if it opened first
            assert "did not answer within" in details or "not tried again" in details
            health_after = _wait_health(
                server.target, LOGGING_HEALTH, health_pb2.HealthCheckResponse.NOT_SERVING, STALL_S
            )
            assert _health(server.target, "") == health_pb2.HealthCheckResponse.SERVING
            time.sleep(max(0.0, STALL_S - (time.monotonic() - stopped_at)))
            during = list(calls)
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        recovered_after = _wait_health(
            server.target, LOGGING_HEALTH, health_pb2.HealthCheckResponse.SERVING, 30
        )
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        after = c.generate("sort: c b a", n=2, max_tokens=4, temperature=1.0)
        assert after.logged
        c.rank(after.prompt_id, [s.sample_id for s in after.samples], user_id="f1")

    assert not failures, f"calls failed instead of answering unlogged: {failures[:3]}"
    unlogged = [seconds for seconds, _, logged in during if not logged]
    assert unlogged, "no call answered during the stall"
    # The circuit breaker: once Redis failed 5 times in a row, calls stop waiting for it.
    fast = [seconds for seconds in unlogged if seconds < REDIS_TIMEOUT_S / 2]
    assert fast, "every call waited out the Redis deadline: the breaker never opened"
    assert max(seconds for seconds, _, _ in calls) < CALL_DEADLINE_S
    # The guarantee: a prompt that a response says is logged, is logged.
    claimed = {pid for _, pid, logged in calls if logged}
    assert claimed <= _logged_prompt_ids(redis)
    report_row(
        TABLE,
        f"Redis SIGSTOP {STALL_S:g} s under load (4 clients), Redis deadline {REDIS_TIMEOUT_S:g} s",
        f"{len(calls)} Generate calls answered, 0 failed; {len(unlogged)} unlogged during the "
        f"stall, slowest {max(unlogged):.2f} s (median {statistics.median(unlogged):.2f} s), "
        f"{len(fast)} of them at once (breaker open); "
        f"feedback UNAVAILABLE; {LOGGING_HEALTH} NOT_SERVING after {1 + health_after:.1f} s; "
        f"SERVING {recovered_after:.1f} s after SIGCONT; {len(claimed)} claimed logged, "
        "all in the stream",
        "each call within its deadline, logged=false; health degraded; recovers",
    )  # fmt: skip


def test_500_concurrent_generates_are_logged_or_refused(rig):
    redis, server = rig
    total = 500

    async def burst():
        async with AsyncClient(server.target, timeout=300, max_attempts=1) as c:
            return await asyncio.gather(
                *[c.generate(f"uppercase: burst {i}", n=2, max_tokens=8) for i in range(total)],
                return_exceptions=True,
            )

    start = time.monotonic()
    results = asyncio.run(burst())
    seconds = time.monotonic() - start
    answered = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    others = [r for r in results if isinstance(r, BaseException) and r not in refused]
    assert not others, others[:3]
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused), refused[:3]
    assert len(answered) + len(refused) == total and answered
    unlogged = [r.prompt_id for r in answered if not r.logged]
    assert not unlogged, f"{len(unlogged)} answered prompts were not logged"
    assert {r.prompt_id for r in answered} <= _logged_prompt_ids(redis)
    report_row(
        TABLE,
        f"{total} concurrent Generate calls on one replica ({ADMITTED} admitted at once, "
        f"{POOL} Redis connections)",
        f"{len(answered)} answered and logged, {len(refused)} RESOURCE_EXHAUSTED, 0 unlogged "
        f"({seconds:.1f} s)",
        "every answer logged, or RESOURCE_EXHAUSTED",
    )  # fmt: skip


def test_a_redis_that_evicts_is_refused_at_start_and_weak_durability_is_warned(
    tiny_model, tmp_path
):
    redis = EmbeddedRedis(tmp_path / "redis", port=free_port()).start()
    try:
        r = redis.client()

        async def check() -> list[str]:
            store = LogStore(redis.url, Keys(PREFIX), 60)
            try:
                return await store.check_settings()
            finally:
                await store.close()

        r.config_set("appendfsync", "everysec")
        r.config_set("maxmemory", "0")
        warnings = asyncio.run(check())
        assert any("appendfsync always" in w for w in warnings), warnings
        assert any("no maxmemory" in w for w in warnings), warnings

        r.config_set("maxmemory-policy", "volatile-lru")
        with pytest.raises(RedisSettingsError, match="noeviction"):
            asyncio.run(check())
        server = launch_server(tiny_model, redis.url, tmp_path / "server", PREFIX)
        code = server.proc.wait(timeout=300)
        assert code != 0 and "maxmemory-policy volatile-lru" in server.log_tail()
    finally:
        redis.stop()
    report_row(
        TABLE,
        "server started on a Redis with maxmemory-policy volatile-lru; appendfsync everysec",
        f"refused to start (exit {code}) naming the policy; warned about the fsync",
        "a clear error, or a warning",
    )


def test_the_server_starts_while_redis_is_down_and_logs_once_it_is_up(tiny_model, tmp_path):
    port = free_port()
    server = launch_server(tiny_model, f"redis://127.0.0.1:{port}/0", tmp_path / "server",
                           PREFIX, "--redis-timeout-s", "1", "--poll-interval-s", "1")  # fmt: skip
    redis = None
    try:
        wait_serving(server.target, server.proc, server.log_path, 300)
        with Client(server.target, timeout=CALL_DEADLINE_S, max_attempts=1) as c:
            assert not c.generate("sort: b a", max_tokens=4).logged  # serving, unlogged
            redis = EmbeddedRedis(tmp_path / "redis", port=port).start()
            started = time.monotonic()
            while not c.generate("sort: b a", max_tokens=4).logged:
                assert time.monotonic() - started < 30, server.log_tail()
                time.sleep(0.2)
            logged_after = time.monotonic() - started
            # The registry caught up too: the base is registered and `current`.
            keys = Keys(PREFIX)
            while redis.client().hget(keys.aliases, "current") != b"v0":
                assert time.monotonic() - started < 30, server.log_tail()
                time.sleep(0.2)
    finally:
        code = stop_server(server)
        if redis is not None:
            redis.stop()
    assert code == 0, server.log_tail()
    report_row(
        TABLE,
        "server started with its Redis down, Redis started later",
        f"SERVING at once, answers unlogged; logged {logged_after:.1f} s after Redis came up, "
        "base registered",
        "starts, degrades, recovers",
    )


def test_a_week_of_traffic_in_compressed_time_keeps_redis_bounded(tmp_path):
    """One day is one second: prompts accept feedback for a day (their keys' TTL) and the
    learner trims what it acknowledged after a day. Written records grow with the days;
    what Redis holds must not."""
    day_s, per_day, days = 1.0, 200, 7
    redis = EmbeddedRedis(tmp_path / "redis", port=free_port()).start()
    keys = Keys(PREFIX)
    r = redis.client()
    ds = Dataset(DatasetConfig(path=str(tmp_path / "d.sqlite3")))
    cfg = ConsumerConfig(consumer="c", block_ms=10, stream_retention_s=day_s)
    consumer = StreamConsumer(r, keys, ds, cfg)
    consumer.ensure_groups()

    async def traffic(day: int) -> None:
        store = LogStore(redis.url, keys, prompt_ttl_s=int(day_s))
        try:
            for prompt, feedback in synthetic.preference_data(per_day, seed=day):
                await store.log_prompt(prompt)
                await store.submit_feedback(feedback)
        finally:
            await store.close()

    held = []  # (keys, stream entries, used memory) at the end of each day
    try:
        for day in range(days):
            start = time.monotonic()
            asyncio.run(traffic(day))
            while consumer.poll(block_ms=0).entries:
                pass
            time.sleep(max(0.0, day_s - (time.monotonic() - start)))
            consumer.trim()
            streams = r.xlen(keys.prompts_stream) + r.xlen(keys.feedback_stream)
            held.append((r.dbsize(), streams, r.info("memory")["used_memory"]))
    finally:
        redis.stop()
    assert ds.counts()["feedback"] == per_day * days  # everything reached the dataset
    # Bounded by about a day of traffic: a prompt key and a judgement key per prompt (and
    # expired keys Redis has not reclaimed yet), two stream entries per prompt; the week
    # wrote 7 times that.
    assert all(k <= 3 * per_day for k, _, _ in held), held
    assert all(s <= 2 * per_day for _, s, _ in held), held
    assert held[-1][2] <= 1.5 * held[1][2], held  # memory flat from the second day on
    report_row(
        TABLE,
        f"{days} days of traffic in compressed time ({per_day} prompts and judgements a day; "
        "feedback window and stream retention one day)",
        f"{per_day * days} records written and stored by the learner; Redis held at most "
        f"{max(k for k, _, _ in held)} keys and {max(s for _, s, _ in held)} stream entries; "
        f"used memory day 2 {held[1][2] / 2**20:.2f} MiB, day {days} "
        f"{held[-1][2] / 2**20:.2f} MiB",
        "Redis memory bounded (store size: tests/test_store.py, retention)",
    )


def test_redis_sigkill_under_load_loses_and_doubles_no_acknowledged_feedback(rig):
    redis, server = rig
    acked: dict[str, str] = {}  # feedback id -> prompt id, as the server acknowledged
    failures: list[BaseException] = []
    stop = threading.Event()

    def judge(worker: int) -> None:
        with Client(server.target, timeout=CALL_DEADLINE_S, max_attempts=1) as c:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    gen = c.generate(f"sort: {worker} {i}", n=2, max_tokens=4, temperature=1.0)
                except grpc.RpcError as e:
                    failures.append(e)
                    continue
                if not gen.logged:
                    continue
                ids = [s.sample_id for s in gen.samples]
                key, deadline = f"k-{worker}-{i}", time.monotonic() + 60
                while time.monotonic() < deadline:  # the client's retry: same key
                    try:
                        r = c.rank(gen.prompt_id, ids, user_id=f"killer{worker}",
                                   idempotency_key=key)  # fmt: skip
                        acked[r.feedback_id] = gen.prompt_id
                        break
                    except grpc.RpcError as e:
                        if e.code() != grpc.StatusCode.UNAVAILABLE:
                            failures.append(e)
                            break
                        time.sleep(0.2)

    threads = [threading.Thread(target=judge, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    time.sleep(3.0)
    before = len(acked)
    redis.stop(kill=True)  # SIGKILL: nothing flushed on the way out
    time.sleep(2.0)
    redis.start()  # same directory and port: the AOF is replayed
    time.sleep(5.0)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures[:3]
    entries = redis.client().xrange(Keys(PREFIX).feedback_stream)
    stored = [records_pb2.FeedbackRecord.FromString(f[DATA_FIELD]) for _, f in entries]
    stored_ids = {s.feedback_id for s in stored}
    lost = [fid for fid in acked if fid not in stored_ids]
    judged = [(s.feedback.prompt_id, s.feedback.user_id) for s in stored
              if s.feedback.user_id.startswith("killer")]  # fmt: skip
    doubled = len(judged) - len(set(judged))
    assert before > 0 and len(acked) > before, "no load before or after the kill"
    assert lost == [] and doubled == 0
    report_row(
        TABLE,
        "Redis SIGKILL under load (4 clients ranking, retrying with the same idempotency "
        "key), restarted 2 s later from its AOF",
        f"{len(acked)} judgements acknowledged ({before} before the kill): lost 0, doubled 0",
        "acknowledged feedback lost = 0, doubled = 0",
    )

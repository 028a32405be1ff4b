"""Group commit and the prompt cache of the server's log store, against a real Redis.

The store is driven directly (no server): concurrent calls must share round trips and
still each get their own answer, and the shortcuts must keep the guarantees (an expired
prompt refused, a flushed script reloaded, a failed round trip failing every caller).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from instructloop.keys import Keys
from instructloop.redis_embedded import free_port
from instructloop.serve.errors import AlreadyExists, NotFound, Unavailable
from instructloop.serve.logstore import LogStore, PromptCache
from instructloop.v1 import api_pb2, records_pb2

pytestmark = pytest.mark.redis_kinds("single", "cluster")


def _prompt(prompt_id: str) -> records_pb2.PromptRecord:
    record = records_pb2.PromptRecord(prompt_id=prompt_id, prompt="sort: b a\n", version="v0")
    for i in range(2):
        record.samples.add(sample_id=f"{prompt_id}-s{i}", text=f"answer {i}")
    return record


def _ranking(prompt: records_pb2.PromptRecord, user: str, key: str = ""):
    ids = [s.sample_id for s in prompt.samples]
    return records_pb2.FeedbackRecord(
        feedback_id=f"f-{prompt.prompt_id}-{user}-{key}",
        feedback=api_pb2.SubmitFeedbackRequest(
            prompt_id=prompt.prompt_id,
            user_id=user,
            idempotency_key=key,
            ranking=api_pb2.Ranking(tiers=[api_pb2.RankTier(sample_ids=[i]) for i in ids]),
        ),
    )


def _store(url: str, prefix: str, **kw) -> LogStore:
    return LogStore(url, Keys(prefix), prompt_ttl_s=600, timeout_s=2.0, **kw)


def _count_round_trips(store: LogStore) -> tuple[list[int], list[object]]:
    """The sizes of the feedback batches sent from now on, and the calls sent alone."""
    batches, singles = [], []
    send, send_one = store._feedback.send, store._feedback.send_one

    async def batch(items):
        batches.append(len(items))
        return await send(items)

    async def single(item):
        singles.append(item)
        return await send_one(item)

    store._feedback.send, store._feedback.send_one = batch, single
    return batches, singles


def test_concurrent_feedback_shares_round_trips_and_each_caller_gets_its_answer(redis_server):
    async def run():
        store = _store(redis_server.url, "gc-share")
        batches, _ = _count_round_trips(store)
        try:
            prompts = [_prompt(f"p{i}") for i in range(4)]
            await asyncio.gather(*(store.log_prompt(p) for p in prompts))
            first = await store.submit_feedback(_ranking(prompts[0], "keyed", "k1"))
            calls = [_ranking(p, f"u{u}") for p in prompts for u in range(50)]
            calls.append(_ranking(prompts[0], "keyed", "k1"))  # a retry: the first answer
            calls.append(_ranking(prompts[1], "u0"))  # a second judgement: refused
            results = await asyncio.gather(
                *(store.submit_feedback(c) for c in calls), return_exceptions=True
            )
            stream = redis_server.client().xrange(store.keys.feedback_stream)
            return first, calls, results, batches, stream
        finally:
            await store.close()

    first, calls, results, batches, stream = asyncio.run(run())
    *stored, retry, second = results
    assert all(
        r.feedback_id == c.feedback_id and not r.duplicate
        for c, r in zip(calls[:-2], stored, strict=True)
    )
    assert retry.duplicate and retry.feedback_id == first.feedback_id
    assert isinstance(second, AlreadyExists)
    assert len(stream) == 1 + len(stored), "every stored call is in the stream, once"
    # 203 calls after the first: they went to Redis in a few pipelines, not one by one.
    assert sum(batches) == 1 + len(calls) and len(batches) < len(calls) / 4, batches


def test_feedback_on_a_cached_prompt_that_redis_no_longer_has_is_refused(redis_server):
    async def run():
        store = _store(redis_server.url, "gc-expired")
        try:
            prompt = _prompt("gone")
            await store.log_prompt(prompt)
            assert await store.get_prompt("gone") is prompt  # from the replica's cache
            redis_server.client().delete(store.keys.prompt("gone"))  # as if it expired
            with pytest.raises(NotFound, match="expired"):
                await store.submit_feedback(_ranking(prompt, "late"))
            return redis_server.client().xlen(store.keys.feedback_stream)
        finally:
            await store.close()

    assert asyncio.run(run()) == 0


def test_a_flushed_script_is_loaded_again_and_runs_once(redis_server):
    async def run():
        store = _store(redis_server.url, "gc-flush")
        try:
            prompt = _prompt("flush")
            await store.log_prompt(prompt)
            await store.submit_feedback(_ranking(prompt, "before"))
            redis_server.client().script_flush()  # what a Redis restart does
            after = await asyncio.gather(
                *(store.submit_feedback(_ranking(prompt, f"after{i}")) for i in range(5))
            )
            return after, redis_server.client().xlen(store.keys.feedback_stream)
        finally:
            await store.close()

    after, stored = asyncio.run(run())
    assert all(not r.duplicate for r in after) and stored == 6


def test_a_round_trip_that_fails_fails_every_caller_in_it():
    async def run():
        store = _store(f"redis://127.0.0.1:{free_port()}", "gc-down")  # nothing listens
        try:
            prompt = _prompt("down")
            return await asyncio.gather(
                *(store.submit_feedback(_ranking(prompt, f"u{i}")) for i in range(8)),
                store.log_prompt(prompt),
                return_exceptions=True,
            )
        finally:
            await store.close()

    results = asyncio.run(run())
    assert all(isinstance(r, Unavailable) for r in results), results


def test_prompt_cache_is_bounded_and_forgets_after_the_ttl():
    cache = PromptCache(size=2, ttl_s=0.2)
    for i in range(3):
        cache.put(_prompt(f"p{i}"))
    assert cache.get("p0") is None, "the oldest was dropped at the bound"
    assert cache.get("p2").prompt_id == "p2"
    time.sleep(0.3)
    assert cache.get("p2") is None and cache.get("p1") is None
    off = PromptCache(size=0, ttl_s=60)
    off.put(_prompt("x"))
    assert off.get("x") is None


def test_max_batch_one_sends_every_call_on_its_own(redis_server):
    async def run():
        store = _store(redis_server.url, "gc-single", max_batch=1)
        batches, singles = _count_round_trips(store)
        try:
            prompt = _prompt("single")
            await store.log_prompt(prompt)
            results = await asyncio.gather(
                *(store.submit_feedback(_ranking(prompt, f"u{i}")) for i in range(20)),
                store.submit_feedback(_ranking(prompt, "u0")),
                return_exceptions=True,
            )
            return results, singles, batches, redis_server.client().xlen(store.keys.feedback_stream)
        finally:
            await store.close()

    results, singles, batches, stored = asyncio.run(run())
    assert len(singles) == 21 and batches == [] and stored == 20
    assert sum(isinstance(r, AlreadyExists) for r in results) == 1

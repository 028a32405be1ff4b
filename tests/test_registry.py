"""The registry against a real redis-server: the canary's judgements, counted once per user
and prompt and atomically with the canary they belong to, and the decisions that several
replicas race to make."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from instructloop.keys import Keys
from instructloop.redis_client import connect_async
from instructloop.registry import CANARY_DECISION_LEASE_MS, DEFAULT_MIN_USERS, Registry
from instructloop.v1 import admin_pb2, api_pb2, records_pb2
from serve.arena import canary_outcome

WIN, LOSS, TIE = 1, -1, 0
pytestmark = pytest.mark.redis_kinds("single", "cluster")


async def _replicas(url: str, count: int, **canary) -> list[Registry]:
    """`count` registries on their own connections, as `count` server replicas hold them,
    over a fresh prefix where v0 is current and v1 the canary with thresholds `canary`."""
    prefix = f"reg-{uuid.uuid4().hex[:8]}"
    replicas = [Registry(connect_async(url, timeout_s=10), Keys(prefix)) for _ in range(count)]
    first = replicas[0]
    for vid in ("v0", "v1", "v2"):
        await first.register(admin_pb2.VersionInfo(id=vid, kind="full"), actor="test")
    await first.promote("v0", "test", "base")
    await first.set_canary("test", "v1", 0.5, "A/B", **canary)
    return replicas


async def _close(replicas: list[Registry]) -> None:
    for r in replicas:
        await r.redis.aclose()


async def _canary_sets_exist(registry: Registry) -> int:
    keys = registry.keys
    return await registry.redis.exists(
        keys.canary, keys.canary_users, keys.canary_judged, keys.canary_decision
    )


# ---- one judgement, one outcome ---------------------------------------------------------


def _arena(*versions: str) -> records_pb2.PromptRecord:
    """An arena response: sample s<i> comes from versions[i]."""
    samples = [api_pb2.Sample(sample_id=f"s{i}", version=v) for i, v in enumerate(versions)]
    return records_pb2.PromptRecord(prompt_id="p-1", samples=samples)


def _ranking(*tiers: tuple[str, ...]) -> api_pb2.SubmitFeedbackRequest:
    return api_pb2.SubmitFeedbackRequest(
        prompt_id="p-1",
        ranking=api_pb2.Ranking(tiers=[api_pb2.RankTier(sample_ids=t) for t in tiers]),
    )


def test_a_judgement_is_one_outcome_by_mean_rank():
    record = _arena("v1", "v0", "v1", "v0")  # canary v1 at s0 and s2
    # Ranks: s0=0, s1=1, s2=2, s3=3: canary mean 1, current mean 2.
    assert canary_outcome(_ranking(("s0",), ("s1",), ("s2",), ("s3",)), record, "v1") == WIN
    # s1=0, s0=1, s3=2, s2=3: canary mean 2, current mean 1.
    assert canary_outcome(_ranking(("s1",), ("s0",), ("s3",), ("s2",)), record, "v1") == LOSS
    # s0=0, s1=1, s3=2, s2=3: both means 1.5.
    assert canary_outcome(_ranking(("s0",), ("s1",), ("s3",), ("s2",)), record, "v1") == TIE
    # One tier: everything ties.
    assert canary_outcome(_ranking(("s0", "s1", "s2", "s3")), record, "v1") == TIE
    # A choice between the two canary samples orders no canary sample against current.
    both_canary = api_pb2.SubmitFeedbackRequest(
        prompt_id="p-1", choice=api_pb2.Choice(chosen_sample_id="s0", rejected_sample_id="s2")
    )
    assert canary_outcome(both_canary, record, "v1") is None
    # A rating: higher is better.
    rating = api_pb2.SubmitFeedbackRequest(
        prompt_id="p-1",
        rating=api_pb2.Rating(
            scores=[api_pb2.SampleScore(sample_id=s, score=x) for s, x in (("s1", 7), ("s0", 2))]
        ),
    )
    assert canary_outcome(rating, record, "v1") == LOSS


# ---- counting ---------------------------------------------------------------------------


def test_a_users_judgements_of_one_prompt_count_once(redis_server):
    async def run() -> admin_pb2.CanaryState:
        (r,) = await _replicas(redis_server.url, 1, promote_at=0.6, min_comparisons=2)
        for outcome in (WIN, WIN, LOSS, WIN, TIE):  # resent, even with another outcome
            await r.record_canary_judgement("v1", "ann", "p-1", outcome)
        state = await r.canary_state()
        await _close([r])
        return state

    state = asyncio.run(run())
    assert (state.wins, state.losses, state.ties, state.users) == (1, 0, 0, 1), state


def test_one_user_cannot_decide_the_canary_and_distinct_users_can(redis_server):
    async def run() -> tuple[list[str], admin_pb2.CanaryState, list[str], dict, int]:
        (r,) = await _replicas(redis_server.url, 1, promote_at=0.6, min_comparisons=10)
        alone = [await r.record_canary_judgement("v1", "ann", f"p-{i}", WIN) for i in range(50)]
        state = await r.canary_state()
        others = [
            await r.record_canary_judgement("v1", f"user-{i}", "p-0", WIN)
            for i in range(1, DEFAULT_MIN_USERS)
        ]
        aliases = await r.aliases()
        left = await _canary_sets_exist(r)
        await _close([r])
        return alone, state, others, aliases, left

    alone, state, others, aliases, left = asyncio.run(run())
    assert set(alone) == {""}, "one user's 50 winning judgements decide nothing"
    assert (state.wins, state.users, state.min_users) == (50, 1, DEFAULT_MIN_USERS), state
    # The 5th distinct user reaches min_users (the default) and the canary is promoted.
    assert others == [""] * (DEFAULT_MIN_USERS - 2) + ["promoted"], others
    assert aliases["current"] == "v1" and "canary" not in aliases, aliases
    assert left == 0, "the decided canary's state, judged and user sets are deleted"


def test_a_stale_counter_cannot_count_for_a_new_canary(redis_server):
    """The canary moves from v1 to v2 while a replica counts a judgement of v1, after each
    of its Redis commands in turn: v2 starts with nothing, whatever the moment."""

    async def run(moves_after: int) -> admin_pb2.CanaryState:
        mover, counter = await _replicas(redis_server.url, 2, min_comparisons=100)
        send, sent = counter.redis.execute_command, 0

        async def move() -> None:
            await mover.set_canary("test", "v2", 0.5, "next", min_comparisons=100)

        async def then_move(*args, **kwargs):
            nonlocal sent
            try:
                return await send(*args, **kwargs)
            finally:
                sent += 1
                if sent == moves_after:
                    await move()

        counter.redis.execute_command = then_move
        await counter.record_canary_judgement("v1", "ann", "p-1", WIN)
        counter.redis.execute_command = send
        if sent < moves_after:  # the count took fewer commands: the move comes after it
            await move()
        # And the common case: the replica read the canary (v1) before the move.
        assert await counter.record_canary_judgement("v1", "bob", "p-2", WIN) == ""
        state = await mover.canary_state()
        await _close([mover, counter])
        return state

    for moves_after in (1, 2, 3):
        state = asyncio.run(run(moves_after))
        assert state.version == "v2", state
        counts = (state.wins, state.losses, state.ties, state.users)
        assert counts == (0, 0, 0, 0), f"moved after command {moves_after}: {state}"


# ---- deciding ---------------------------------------------------------------------------


async def _canary_race(url: str, thresholds: dict, outcome: int) -> tuple[list[str], list[str]]:
    """8 replicas each count a judgement of canary v1 from a distinct user at once; the
    4th to count crosses min_comparisons and min_users, and every later one sees them
    crossed too. Returns each replica's decision and the canary judge's audit actions."""
    replicas = await _replicas(url, 8, min_comparisons=4, min_users=4, **thresholds)
    judgements = (
        r.record_canary_judgement("v1", f"user-{i}", "p-1", outcome) for i, r in enumerate(replicas)
    )
    decisions = await asyncio.gather(*judgements)
    actions = [a.action for a in await replicas[0].audit_log() if a.actor == "canary-judge"]
    await _close(replicas)
    return decisions, actions


def test_one_replica_promotes_a_winning_canary(redis_server):
    decisions, actions = asyncio.run(_canary_race(redis_server.url, {"promote_at": 0.6}, WIN))
    assert decisions.count("promoted") == 1, decisions
    assert set(decisions) == {"promoted", ""}, decisions
    assert actions.count("auto-promote") == 1, actions


def test_one_replica_ends_a_losing_canary(redis_server):
    decisions, actions = asyncio.run(_canary_race(redis_server.url, {"rollback_at": 0.4}, LOSS))
    assert decisions.count("ended") == 1, decisions
    assert len(actions) == 1, actions


def test_a_decider_that_died_leaves_the_decision_to_the_next_judgement(redis_server):
    async def run() -> tuple[int, list[str], dict, dict]:
        dying, other = await _replicas(
            redis_server.url, 2, promote_at=0.6, min_comparisons=2, min_users=2
        )

        async def die(*args, **kwargs):
            raise ConnectionError("the replica died while deciding")

        dying.promote = die  # it claims the decision, then dies before promoting
        assert await dying.record_canary_judgement("v1", "ann", "p-1", WIN) == ""
        with pytest.raises(ConnectionError):
            await dying.record_canary_judgement("v1", "bob", "p-1", WIN)
        lease = await other.redis.pttl(other.keys.canary_decision)
        decisions = [await other.record_canary_judgement("v1", "cyd", "p-1", WIN)]
        held = await other.aliases()
        await other.redis.pexpire(other.keys.canary_decision, 50)  # the lease runs out
        await asyncio.sleep(0.2)
        decisions.append(await other.record_canary_judgement("v1", "dee", "p-1", WIN))
        after = await other.aliases()
        await _close([dying, other])
        return lease, decisions, held, after

    lease, decisions, held, after = asyncio.run(run())
    assert 0 < lease <= CANARY_DECISION_LEASE_MS, "the claim is a lease that expires"
    assert decisions == ["", "promoted"], "held while the lease lasts, then decided"
    assert held["canary"] == "v1" and held["current"] == "v0", held
    assert after["current"] == "v1" and "canary" not in after, after


def test_a_frozen_decision_releases_its_claim(redis_server):
    async def run() -> tuple[list[str], int, dict]:
        (r,) = await _replicas(redis_server.url, 1, promote_at=0.6, min_comparisons=1, min_users=1)
        await r.freeze("test", "hold")
        decisions = [await r.record_canary_judgement("v1", "ann", "p-1", WIN)]
        claim = await r.redis.exists(r.keys.canary_decision)
        await r.unfreeze("test")
        decisions.append(await r.record_canary_judgement("v1", "bob", "p-1", WIN))
        aliases = await r.aliases()
        await _close([r])
        return decisions, claim, aliases

    decisions, claim, aliases = asyncio.run(run())
    assert decisions == ["frozen", "promoted"], decisions
    assert claim == 0, "a frozen decider releases its claim at once"
    assert aliases["current"] == "v1" and "canary" not in aliases, aliases

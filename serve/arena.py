"""Arena-style A/B between the canary and the current version.

A canary-routed Generate with n >= 2 is split: some samples come from the canary, the
rest from current, at shuffled positions, so a user's ranking of that one response
compares the two versions directly. Each judgement is one outcome, however many samples
it orders (`canary_outcome`): counting every canary-vs-current pair would let one ranking
of n=16 samples weigh as 64 outcomes. Registry.record_canary_judgement counts it once per
user and prompt and decides the canary.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

from instructloop.v1 import api_pb2, records_pb2


def split_indexes(n: int, rng: random.Random | None = None) -> tuple[list[int], list[int]]:
    """Response positions for (canary, current) samples: ceil(n/2) and floor(n/2)."""
    positions = list(range(n))
    (rng or random).shuffle(positions)
    half = (n + 1) // 2
    return sorted(positions[:half]), sorted(positions[half:])


async def merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Interleave several async iterators as items arrive: yields (stream index, item).
    An error in one stream cancels the others and is raised here."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
            await queue.put((i, done))
        except BaseException as e:  # noqa: BLE001  (handed to the consumer below)
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _ranks(feedback: api_pb2.SubmitFeedbackRequest) -> dict[str, float]:
    """A rank per judged sample: lower is better, equal is a tie."""
    kind = feedback.WhichOneof("kind")
    if kind == "ranking":
        return {sid: i for i, tier in enumerate(feedback.ranking.tiers) for sid in tier.sample_ids}
    if kind == "choice":
        return {feedback.choice.chosen_sample_id: 0, feedback.choice.rejected_sample_id: 1}
    if kind == "rating":
        return {s.sample_id: -s.score for s in feedback.rating.scores}
    return {}


def canary_outcome(
    feedback: api_pb2.SubmitFeedbackRequest, record: records_pb2.PromptRecord, canary: str
) -> int | None:
    """One judgement's outcome for the canary: +1 if the user ranked the canary's samples
    better on average (lower mean rank) than the other version's, -1 if worse, 0 if even.
    None if the judgement orders no canary sample against another version's sample."""
    version_of = {s.sample_id: s.version for s in record.samples}
    ranks = _ranks(feedback)
    ours = [r for sid, r in ranks.items() if version_of.get(sid) == canary]
    theirs = [r for sid, r in ranks.items() if version_of.get(sid) not in (canary, None)]
    if not ours or not theirs:
        return None
    ours_mean, theirs_mean = sum(ours) / len(ours), sum(theirs) / len(theirs)
    return (ours_mean < theirs_mean) - (ours_mean > theirs_mean)

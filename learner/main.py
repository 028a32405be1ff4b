"""The learner process: consume feedback, run rounds when they are due, stop cleanly.

`instructloop learn` runs `run()`: one visible while loop that

  1. reads new entries from the prompts and feedback streams into the dataset
     (consumer.py: persist, then XACK; pending entries are re-read or re-claimed first);
  2. asks the round scheduler whether a round is due (N new comparisons, or T seconds
     with some new data) and runs it (rounds.py).

SIGTERM / SIGINT set a stop event: the batch in hand is persisted and acknowledged, a
running round is abandoned at the next PPO iteration, SFT step or phase boundary (unless
it is already publishing, which is short and completes). Nothing is acknowledged before it is
persisted, and a version is visible only once completely written, so a learner killed
at any moment (even SIGKILL) restarts without losing or double-counting feedback.

Everything the learner owns lives under --data-dir: the dataset (dataset.sqlite3), the
round state (state.json) and the reward models and SFT policies of recent rounds.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import redis
import redis.asyncio as aioredis

from instructloop.keys import Keys
from instructloop.learner.config import (
    LearnerConfig,
    PPOConfig,
    RewardConfig,
    RoundConfig,
    SFTStepConfig,
)
from instructloop.learner.consumer import ConsumerConfig, StreamConsumer
from instructloop.learner.dataset import Dataset, DatasetConfig
from instructloop.learner.device import resolve_device
from instructloop.learner.rounds import Learner, RoundAbandoned
from instructloop.registry import Registry
from instructloop.store import ModelStore

log = logging.getLogger(__name__)


@dataclass
class Configs:
    """Every config of the process, parsed once at the entry point."""

    learner: LearnerConfig
    consumer: ConsumerConfig
    round: RoundConfig
    sft: SFTStepConfig
    rm: RewardConfig
    ppo: PPOConfig

    def __post_init__(self):
        if self.round.kind not in ("full", "lora"):
            raise ValueError(f"--kind must be 'full' or 'lora', got {self.round.kind!r}")
        self.ppo.lora = self.round.kind == "lora"  # derived once, here
        self.learner.device = str(resolve_device(self.learner.device))  # 'auto' -> cuda/cpu


def run(cfgs: Configs, stop: threading.Event | None = None) -> int:
    """Consume and learn until stopped (or max_rounds). Returns the exit code."""
    cfg = cfgs.learner
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: _request_stop(stop, signum))
    if cfg.torch_threads:
        import torch

        torch.set_num_threads(cfg.torch_threads)

    data_dir = Path(cfg.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    keys = Keys(cfg.redis_prefix)
    dataset = Dataset(
        DatasetConfig(
            path=str(data_dir / "dataset.sqlite3"),
            heldout_fraction=cfg.heldout_fraction,
            split_salt=cfg.split_salt,
        )
    )
    client = redis.Redis.from_url(cfg.resolved_redis_url)
    loop = asyncio.new_event_loop()
    aclient = aioredis.Redis.from_url(cfg.resolved_redis_url)
    store = ModelStore(cfg.model_store)
    learner = Learner(
        data_dir, dataset, store, Registry(aclient, keys), loop,
        cfgs.round, cfgs.sft, cfgs.rm, cfgs.ppo, device=cfg.device,
    )  # fmt: skip
    consumer = StreamConsumer(client, keys, dataset, cfgs.consumer)
    log.info(
        "learner %s: redis %s prefix %r, store %s, data %s, device %s; state: round %d",
        cfgs.consumer.consumer, cfg.resolved_redis_url, cfg.redis_prefix, cfg.model_store,
        data_dir, cfg.device, learner.state.round,
    )  # fmt: skip
    published = 0
    try:
        consumer.ensure_groups()
        consumer.recover()
        while not stop.is_set():
            try:
                stats = consumer.poll()
                if stats.new_prompts or stats.new_feedback:
                    log.info(
                        "consumed %d prompts, %d judgements (%d duplicates)",
                        stats.new_prompts, stats.new_feedback, stats.duplicates,
                    )  # fmt: skip
                reason = learner.due()
                if reason is None:
                    continue
                # Read the backlog to the end first: a judgement read before its prompt
                # (the two streams are read in batches) would miss this round.
                while not stop.is_set() and consumer.poll(block_ms=0).entries:
                    pass
                result = learner.run_round(reason, stop)
                if result is not None:
                    published += 1
                    if cfg.max_rounds and published >= cfg.max_rounds:
                        log.info("published %d round(s): exiting (--max-rounds)", published)
                        break
            except RoundAbandoned as e:
                log.warning("%s; the next start redoes it on the same data", e)
            except redis.ConnectionError as e:
                log.warning("redis unavailable (%s); retrying", e)
                stop.wait(1.0)
    finally:
        loop.run_until_complete(aclient.aclose())
        loop.close()
        client.close()
        dataset.close()
    log.info("learner stopped")
    return 0


def _request_stop(stop: threading.Event, signum: int) -> None:
    log.warning("%s: finishing the current step, then stopping", signal.Signals(signum).name)
    stop.set()

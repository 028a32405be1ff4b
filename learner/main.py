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

One learner runs per deployment: it holds a lease in Redis (lease.py) and a second one
waits for it. While it runs, it re-reads its pending entries and claims stale ones of
other consumers every --claim-interval-s, not only at start.

Under torchrun (`torchrun --nproc_per_node N -m instructloop.cli learn ...`) rank 0 is
the learner described here; every other rank only trains its shard of each SFT, RM and
PPO batch, on orders from rank 0 (follow_rank0, learner/distributed.py).

Everything the learner owns lives under --data-dir: the dataset (dataset.sqlite3), the
round state (state.json) and the reward models and SFT policies of recent rounds. Beside
it (the parent directory, the deployment's DATA_DIR by default) lie the deployment's
secrets, created 0600 on first use (instructloop/secretfile.py) and never logged: the
registry key (registry-key) and the key of the held-out split (split-salt).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import redis

from instructloop.keys import Keys
from instructloop.learner import distributed
from instructloop.learner.config import (
    ALGORITHMS,
    GATE_REWARD_MODELS,
    AlignConfig,
    LearnerConfig,
    PPOConfig,
    RewardConfig,
    RoundConfig,
    SFTStepConfig,
)
from instructloop.learner.consumer import ConsumerConfig, StreamConsumer
from instructloop.learner.dataset import Dataset, DatasetConfig
from instructloop.learner.device import resolve_device
from instructloop.learner.lease import LearnerLease
from instructloop.learner.ppo import FSDP_LORA, PPOStopped
from instructloop.learner.rounds import Learner, RoundAbandoned
from instructloop.migrate import migrate_layout
from instructloop.redact import redact_url
from instructloop.redis_client import connect_async, connect_sync
from instructloop.registry import Registry, load_registry_key, prune_versions
from instructloop.secretfile import load_secret
from instructloop.store import ModelStore
from instructloop.users import UserStore

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
    align: AlignConfig = field(default_factory=AlignConfig)  # step 3's algorithm

    def __post_init__(self):
        if self.round.kind not in ("full", "lora"):
            raise ValueError(f"--kind must be 'full' or 'lora', got {self.round.kind!r}")
        if self.round.gate_reward_model not in GATE_REWARD_MODELS:
            raise ValueError(
                f"--gate-reward-model must be one of {', '.join(GATE_REWARD_MODELS)}, got "
                f"{self.round.gate_reward_model!r}"
            )
        self.ppo.lora = self.round.kind == "lora"  # derived once, here
        if self.learner.sharding not in distributed.SHARDINGS:
            raise ValueError(f"--sharding must be 'ddp' or 'fsdp', got {self.learner.sharding!r}")
        if self.learner.sharding == "fsdp" and self.ppo.lora:
            raise ValueError(FSDP_LORA)
        if self.ppo.ptx_data not in ("demonstrations", "corpus"):
            raise ValueError(
                f"--ppo-ptx-data must be 'demonstrations' or 'corpus', got {self.ppo.ptx_data!r}"
            )
        self._check_algorithm()
        self.learner.device = str(resolve_device(self.learner.device))  # 'auto' -> cuda/cpu

    def _check_algorithm(self) -> None:
        """What --algorithm refuses, at start rather than in the first round."""
        algorithm = self.align.algorithm
        if algorithm not in ALGORITHMS:
            raise ValueError(f"--algorithm: one of {', '.join(ALGORITHMS)}, not {algorithm!r}")
        if self.align.start_from_reference and self.ppo.lora:
            raise ValueError(
                "--start-from-reference trains full weights from the reference: not with "
                "--kind lora (each adapter sits on the serving weights)"
            )
        if algorithm == "ppo":
            return
        if self.ppo.lora:
            raise ValueError(f"--algorithm {algorithm} trains full weights: --kind lora is ppo's")
        if distributed.launched_world_size() > 1:
            raise ValueError(
                f"--algorithm {algorithm} runs on one process: under torchrun only ppo (TRL's "
                "trainers are untested in our process group)"
            )
        if algorithm in ("grpo", "rloo"):
            from instructloop.learner.algorithms import group_budget

            group_budget(self.ppo, self.align)  # whole groups per step, or ValueError


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
    cfg.device = distributed.init_from_env(cfg.device)  # torchrun: this rank's device
    if not distributed.is_main():
        return follow_rank0(cfg.device, stop)

    data_dir = Path(cfg.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    keys = Keys(cfg.redis_prefix)
    secrets_dir = data_dir.resolve().parent  # the deployment's secrets sit beside data_dir
    salt_file = cfg.split_salt_file or str(secrets_dir / "split-salt")
    dataset = Dataset(
        DatasetConfig(
            path=str(data_dir / "dataset.sqlite3"),
            heldout_fraction=cfg.heldout_fraction,
            split_salt=load_secret(salt_file, "split salt"),
        )
    )
    # Timeouts: a Redis that stops answering fails a call (retried by the loops below)
    # instead of hanging the learner; longer than the consumer's XREADGROUP BLOCK.
    timeout_s = 10.0 + cfgs.consumer.block_ms / 1000
    client = connect_sync(cfg.resolved_redis_url, timeout_s=timeout_s)
    loop = asyncio.new_event_loop()
    aclient = connect_async(cfg.resolved_redis_url, timeout_s=timeout_s)
    try:  # the old layout's keys move before the consumer groups are made
        loop.run_until_complete(migrate_layout(aclient, keys))
    except redis.RedisError as e:
        log.warning("could not check for keys of the old layout (%s); not moved", e)
    store = ModelStore(cfg.model_store, max_bytes=int(cfg.store_max_gib * 2**30))
    key_file = cfg.registry_key_file or str(secrets_dir / "registry-key")
    learner = Learner(
        data_dir, dataset, store, Registry(aclient, keys, load_registry_key(key_file)),
        UserStore(aclient, keys), loop, cfgs.round, cfgs.sft, cfgs.rm, cfgs.ppo,
        device=cfg.device, sharding=cfg.sharding, align_cfg=cfgs.align,
    )  # fmt: skip
    consumer = StreamConsumer(client, keys, dataset, cfgs.consumer)
    log.info(
        "learner %s: redis %s prefix %r, store %s, data %s, split key %s, device %s, "
        "algorithm %s; state: round %d",
        cfgs.consumer.consumer, redact_url(cfg.resolved_redis_url), cfg.redis_prefix,
        cfg.model_store, data_dir, salt_file, cfg.device, cfgs.align.algorithm,
        learner.state.round,
    )  # fmt: skip
    lease = LearnerLease(client, keys.learner_lease, cfgs.consumer.consumer, cfg.lease_ttl_s)
    published = 0
    failures = FailedRounds(data_dir / "failed-rounds.jsonl", cfg.round_retry_s,
                            cfg.round_retry_max_s)  # fmt: skip
    try:
        if not lease.acquire(stop):
            return 0
        store.gc_tmp()  # publishes a killed learner left half-written
        consumer.ensure_groups()
        consumer.recover()
        last_claim = time.monotonic()
        while not stop.is_set():
            try:
                if time.monotonic() - last_claim >= cfgs.consumer.claim_interval_s:
                    consumer.recover()
                    consumer.trim()
                    last_claim = time.monotonic()
                stats = consumer.poll()
                if stats.new_prompts or stats.new_feedback:
                    log.info(
                        "consumed %d prompts, %d judgements (%d duplicates)",
                        stats.new_prompts, stats.new_feedback, stats.duplicates,
                    )  # fmt: skip
                reason = learner.due()
                if reason is None or not failures.may_retry():
                    continue
                # Read the backlog to the end first: a judgement read before its prompt
                # (the two streams are read in batches) would miss this round.
                while not stop.is_set() and consumer.poll(block_ms=0).entries:
                    pass
                try:
                    result = learner.run_round(reason, stop)
                except (RoundAbandoned, redis.ConnectionError):
                    raise
                except Exception as e:  # a failing round must not become a crash loop
                    failures.failed(learner.state.round + 1, e)
                    continue
                failures.succeeded()
                if result is not None:
                    _retain(loop, learner, store, cfg.keep_versions)
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
        if distributed.world_size() > 1:
            distributed.send_order(None)  # the other ranks exit
            distributed.close()
        lease.release()
        loop.run_until_complete(aclient.aclose())
        loop.close()
        client.close()
        dataset.close()
    if lease.lost.is_set():
        log.error("learner stopped: it lost its lease")
        return 1
    log.info("learner stopped")
    return 0


def follow_rank0(device: str, stop: threading.Event) -> int:
    """A rank other than 0 under torchrun: run the trainer rank 0 orders, with the
    arguments it sends (the round's data included), on this rank's device and shard,
    until rank 0 says stop. It touches no Redis, no store and no learner state; a stop
    request is obeyed through the trainers' own checks, together with rank 0."""
    log.info("rank %d: training only; rank 0 consumes and publishes", distributed.rank())
    while (order := distributed.receive_order()) is not None:
        trainer, kwargs = order
        if "stop" in inspect.signature(trainer).parameters:
            kwargs["stop"] = stop
        try:
            trainer(**kwargs, device=device)
        except PPOStopped:
            pass  # rank 0 stopped it too: the round is abandoned there
        except Exception:  # rank 0 fails the same way and decides what happens next
            log.exception("rank %d: %s failed", distributed.rank(), trainer.__name__)
    log.info("rank %d: rank 0 is done; exiting", distributed.rank())
    distributed.close()
    return 0


def _retain(loop, learner: Learner, store: ModelStore, keep: int) -> None:
    """Apply the store's retention after a round; a failure here fails nothing else."""
    if not keep:
        return
    also_keep = [v for v in (learner.state.sft_version, learner.state.last_version) if v]
    try:
        loop.run_until_complete(prune_versions(learner.registry, store, keep, also_keep))
    except Exception as e:
        log.warning("version retention failed (tried again after the next round): %s", e)


class FailedRounds:
    """Backoff and a dead-letter file for rounds that fail: the learner keeps consuming
    (nothing is lost meanwhile), waits `base_s`, then twice that, ... up to `max_s`
    before the next try, and appends each failure (round, error, traceback, attempt, next
    try) to one JSON line of `path`. A round that succeeds resets the wait."""

    def __init__(self, path: Path, base_s: float, max_s: float):
        self.path, self.base_s, self.max_s = path, base_s, max_s
        self.consecutive = 0
        self.retry_at = 0.0

    def may_retry(self) -> bool:
        return time.monotonic() >= self.retry_at

    def succeeded(self) -> None:
        self.consecutive, self.retry_at = 0, 0.0

    def failed(self, round_no: int, error: Exception) -> None:
        self.consecutive += 1
        wait = min(self.max_s, self.base_s * 2 ** (self.consecutive - 1))
        self.retry_at = time.monotonic() + wait
        log.exception(
            "round %d failed (%d in a row): %s; next try in %.0fs (recorded in %s)",
            round_no, self.consecutive, error, wait, self.path,
        )  # fmt: skip
        record = {
            "round": round_no, "at": time.time(), "attempt": self.consecutive,
            "error": f"{type(error).__name__}: {error}"[:2000],
            "traceback": traceback.format_exc()[-4000:], "retry_in_s": wait,
        }  # fmt: skip
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _request_stop(stop: threading.Event, signum: int) -> None:
    log.warning("%s: finishing the current step, then stopping", signal.Signals(signum).name)
    stop.set()

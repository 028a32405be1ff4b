"""Consume the prompts and feedback streams into the learner's dataset without loss.

Both streams are read through one Redis consumer group, each stream with its own
XREADGROUP and XAUTOCLAIM calls (so a Redis Cluster may hold them anywhere). An entry is
acknowledged (XACK) only after its record is committed to the dataset (dataset.py), so:
  - a learner killed before the commit leaves the entry pending: it is delivered again;
  - a learner killed after the commit but before the XACK gets it again too, and the
    idempotent insert (primary key prompt_id / feedback_id) stores it once.
On start, and every `claim_interval_s` while it runs, the consumer re-reads its own
pending entries (XREADGROUP from id 0), then takes over entries left pending by other
consumers for longer than `claim_min_idle_ms` (XAUTOCLAIM), and removes consumers that
hold nothing and have been idle that long (the group's consumer list stays bounded).
Entries that cannot be parsed go to the dataset's dead_letters table and are acknowledged:
one bad record must not block the stream forever.

Streams are trimmed (`trim`, with each claim pass): entries older than
`stream_retention_s`, and only up to the oldest entry the group has not acknowledged
(pending) or not yet read, so trimming never drops what the learner has not stored.

The loop is one visible `while`: read a batch, persist, ack, until `stop` is set (SIGTERM
handling belongs to the entry point, which sets the event; the current batch finishes).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import redis
from google.protobuf.message import DecodeError

from instructloop.keys import DATA_FIELD, Keys
from instructloop.learner.dataset import Dataset
from instructloop.redis_client import SyncClient
from instructloop.v1 import records_pb2

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict[bytes, bytes] | None]  # (entry id, fields); None = deleted entry


@dataclass
class ConsumerConfig:
    """How the learner reads the Redis streams."""

    group: str = field(
        default="learner",
        metadata={"help": "Consumer group name; every learner of a deployment shares it."},
    )
    consumer: str = field(
        default="learner",
        metadata={
            "help": "This consumer's name inside the group. One learner runs at a time (the "
            "lease), so a restart keeps the name and re-reads its own pending entries at once."
        },
    )
    batch_size: int = field(
        default=256, metadata={"help": "Entries read per stream per XREADGROUP call."}
    )
    block_ms: int = field(
        default=1000, metadata={"help": "How long one XREADGROUP waits for new entries."}
    )
    claim_min_idle_ms: int = field(
        default=60_000,
        metadata={
            "help": "Pending entries of other consumers idle this long are taken over "
            "(XAUTOCLAIM): their consumer is presumed dead."
        },
    )
    stream_retention_s: float = field(
        default=24 * 3600.0,
        metadata={
            "help": "Acknowledged stream entries older than this are trimmed from Redis (the "
            "dataset keeps them); an entry not yet acknowledged is never trimmed."
        },
    )
    claim_interval_s: float = field(
        default=30.0,
        metadata={
            "help": "How often the running learner re-reads its own pending entries and "
            "takes over other consumers' stale ones (not only at start)."
        },
    )


@dataclass
class ConsumeStats:
    """What one call stored: new records, re-deliveries that were already stored, bad ones."""

    entries: int = 0
    new_prompts: int = 0
    new_feedback: int = 0
    duplicates: int = 0
    dead_letters: int = 0

    def add(self, other: ConsumeStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _stream_id(value: bytes | str) -> tuple[int, int]:
    ms, _, seq = _str(value).partition("-")
    return int(ms), int(seq or 0)


class StreamConsumer:
    """Moves entries from the two streams into a Dataset: persist first, then XACK."""

    def __init__(self, client: SyncClient, keys: Keys, dataset: Dataset, cfg: ConsumerConfig):
        self.r = client
        self.keys = keys
        self.dataset = dataset
        self.cfg = cfg
        self.streams = (keys.prompts_stream, keys.feedback_stream)

    def ensure_groups(self) -> None:
        """Create the consumer group on both streams (from the first entry) if missing."""
        for stream in self.streams:
            try:
                self.r.xgroup_create(stream, self.cfg.group, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    # ------------------------------------------------------------------ one batch

    def _persist_and_ack(self, stream: str, entries: list[Entry]) -> ConsumeStats:
        """Commit every record of the batch to the dataset, then acknowledge the batch."""
        stats = ConsumeStats(entries=len(entries))
        if not entries:
            return stats
        prompts, feedback, dead = [], [], []
        for entry_id, fields in entries:
            raw = (fields or {}).get(DATA_FIELD)
            try:
                if raw is None:
                    raise ValueError("entry has no data field (or was deleted)")
                if stream == self.keys.prompts_stream:
                    prompts.append(records_pb2.PromptRecord.FromString(raw))
                else:
                    feedback.append(records_pb2.FeedbackRecord.FromString(raw))
            except (DecodeError, ValueError) as e:
                log.warning("dead letter %s %s: %s", stream, entry_id.decode(), e)
                dead.append((stream, entry_id.decode(), str(e), raw))
        new_prompts, new_feedback = self.dataset.add_batch(prompts, feedback, dead)
        # Only now is the batch durable: a crash before this line re-delivers it.
        self.r.xack(stream, self.cfg.group, *[entry_id for entry_id, _ in entries])
        stats.new_prompts, stats.new_feedback = new_prompts, new_feedback
        stats.duplicates = len(prompts) + len(feedback) - new_prompts - new_feedback
        stats.dead_letters = len(dead)
        return stats

    # ------------------------------------------------------------------ recovery

    def recover(self) -> ConsumeStats:
        """Persist what this consumer left pending, then what dead consumers left pending."""
        stats = ConsumeStats()
        for stream in self.streams:
            # 1) Our own pending entries (a restart with the same consumer name).
            while True:
                resp = self.r.xreadgroup(
                    self.cfg.group, self.cfg.consumer, {stream: "0"}, count=self.cfg.batch_size
                )
                entries = resp[0][1] if resp else []
                if not entries:
                    break
                stats.add(self._persist_and_ack(stream, entries))
            # 2) Entries other consumers took and never acknowledged.
            cursor = "0-0"
            while True:
                resp = self.r.xautoclaim(
                    stream,
                    self.cfg.group,
                    self.cfg.consumer,
                    min_idle_time=self.cfg.claim_min_idle_ms,
                    start_id=cursor,
                    count=self.cfg.batch_size,
                )
                cursor, entries = resp[0], resp[1]
                stats.add(self._persist_and_ack(stream, entries))
                if cursor in (b"0-0", "0-0"):
                    break
            self._forget_idle_consumers(stream)
        if stats.entries:
            log.info("recovered %d pending entries: %s", stats.entries, stats)
        return stats

    def trim(self, now_ms: int | None = None) -> int:
        """XTRIM MINID each stream below both the retention cutoff and the oldest entry
        the group still needs (pending, or after its last-delivered id); returns how many
        entries went."""
        if now_ms is None:  # Redis's clock: the one that stamped the entry ids
            seconds, micros = self.r.time()
            now_ms = seconds * 1000 + micros // 1000
        cutoff = now_ms - int(self.cfg.stream_retention_s * 1000)
        removed = 0
        for stream in self.streams:
            groups = self.r.xinfo_groups(stream)
            group = next((g for g in groups if _str(g["name"]) == self.cfg.group), None)
            if group is None:
                continue
            needed = _stream_id(group["last-delivered-id"])
            needed = (needed[0], needed[1] + 1)  # everything after it is unread
            oldest_pending = self.r.xpending(stream, self.cfg.group)["min"]
            if oldest_pending is not None:
                needed = min(needed, _stream_id(oldest_pending))
            keep_from = min(needed, (max(cutoff, 0), 0))
            removed += self.r.xtrim(
                stream, minid=f"{keep_from[0]}-{keep_from[1]}", approximate=False
            )
        if removed:
            log.info("trimmed %d acknowledged entries older than %.0fs", removed,
                     self.cfg.stream_retention_s)  # fmt: skip
        return removed

    def _forget_idle_consumers(self, stream: str) -> None:
        for c in self.r.xinfo_consumers(stream, self.cfg.group):
            name = _str(c["name"])
            if (
                name != self.cfg.consumer
                and not c["pending"]
                and (c["idle"] >= self.cfg.claim_min_idle_ms)
            ):
                self.r.xgroup_delconsumer(stream, self.cfg.group, name)

    # ------------------------------------------------------------------ steady state

    def poll(self, block_ms: int | None = None) -> ConsumeStats:
        """Read new entries from both streams once, persist, ack.

        Waits up to block_ms (default: the config's) for entries; 0 does not wait.
        """
        stats = ConsumeStats()
        block_ms = self.cfg.block_ms if block_ms is None else block_ms
        for stream in self.streams:
            stats.add(self._read_new(stream, block_ms=None))
        if stats.entries or not block_ms:
            return stats
        # Nothing new: wait on each stream in turn, for a share of block_ms each.
        for stream in self.streams:
            stats.add(self._read_new(stream, block_ms=max(1, block_ms // len(self.streams))))
            if stats.entries:
                break
        return stats

    def _read_new(self, stream: str, block_ms: int | None) -> ConsumeStats:
        """One XREADGROUP of one stream's new entries, persisted and acknowledged. Each
        stream has its own call: a Redis Cluster refuses one call over keys of several
        slots (these share one, but nothing here should depend on it)."""
        resp = self.r.xreadgroup(
            self.cfg.group,
            self.cfg.consumer,
            {stream: ">"},
            count=self.cfg.batch_size,
            block=block_ms,  # BLOCK 0 would wait forever; None does not block
        )
        entries = resp[0][1] if resp else []
        return self._persist_and_ack(stream, entries)

    def drain(self) -> ConsumeStats:
        """Recover, then read until both streams have nothing new (no blocking at the end)."""
        self.ensure_groups()
        stats = self.recover()
        while True:
            step = self.poll(block_ms=0)
            stats.add(step)
            if step.entries == 0:
                return stats

    def run(self, stop: threading.Event) -> ConsumeStats:
        """Consume until `stop` is set. The batch in hand is always finished first."""
        self.ensure_groups()
        total = self.recover()
        while not stop.is_set():
            try:
                total.add(self.poll())
            except redis.ConnectionError as e:
                log.warning("redis unavailable (%s); retrying", e)
                stop.wait(1.0)
        return total

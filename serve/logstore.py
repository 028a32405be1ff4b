"""Prompt and feedback logging to Redis (the layout is instructloop.keys).

A logged prompt is written twice in one MULTI: appended to the prompts stream (for the
learner) and stored under its id with a TTL (the feedback window), so feedback can be
validated against the samples that were actually served. When the labeling queue wants
it (serve/queue.py: n >= 2, drawn by --queue-share), the same MULTI enqueues it.

Feedback is accepted by one Lua script, atomically: it replays an idempotent retry,
refuses a second judgement of the same kind (comparison or demonstration) by
the same user of the same prompt, and otherwise appends
the record to the feedback stream and remembers the judgement; a comparison also closes
the judge's lease on the prompt's labeling-queue item (queue.CLOSE_TASK_LUA), so a lease
is closed if and only if its comparison is stored. The script's reply comes
only after Redis has applied (and, with appendfsync always, persisted) the write.

Group commit: the feedback scripts of concurrent SubmitFeedback calls, and the MULTIs of
concurrent prompt logs, go to Redis together: one flusher per kind sends what has queued
up while the previous round trip was out, in one pipeline, so one `appendfsync always`
fsync covers them all. Each caller still gets its own reply, and only after Redis has
applied and persisted its write; a pipeline that fails fails every caller in it
(Unavailable), as a single call would. A batch holds at most `max_batch` calls.

A replica remembers the prompts it logged (at most `prompt_cache_size`, each until its
TTL): feedback on them is validated without reading the record back from Redis. The
feedback script still checks that the prompt exists, so an expired prompt is refused
either way.

Every call has a deadline (`timeout_s`): a Redis that accepts connections but does not
answer (SIGSTOP, an fsync stall, a long script, a blackholed path) costs a caller at most
that long, then Unavailable; Generate answers with logged=false. After five timeouts in
a row a circuit breaker fails calls at once for a cooldown, so that a stalled Redis does
not cost every request the whole deadline. Connections come from a
bounded pool that waits for a free connection (within the same deadline) instead of
failing with "Too many connections" (one Redis; redis-py's cluster and Sentinel pools
fail such a call at once, Unavailable).

The URL may name one Redis, a Redis Cluster or a Sentinel-watched primary
(instructloop/redis_client.py). With `min_replicas_ack`, feedback is acknowledged only
after that many replicas have it (WAIT, see _send_feedback).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from instructloop.keys import DATA_FIELD, Keys
from instructloop.migrate import migrate_layout
from instructloop.redis_client import connect_async, is_cluster
from instructloop.v1 import api_pb2, records_pb2

from .errors import AlreadyExists, NotFound, Unavailable
from .queue import CLOSE_TASK_LUA

if TYPE_CHECKING:
    from .queue import LabelingQueue

log = logging.getLogger(__name__)

# KEYS: prompt, judgement, idempotency (the judgement again when none: a cluster routes
#       by every key, so none may be ''), feedback stream, and the labeling queue's
#       waiting set, leases, the judge's lease pointer, the prompt's item
# ARGV: feedback id, record bytes, content hash, judge ('' unless a comparison), prompt id,
#       '1' if KEYS[3] is an idempotency key
# Reply: {status, feedback id, the queue's close status ('' when not run)}
_SUBMIT_FEEDBACK = (
    CLOSE_TASK_LUA
    + """
local idem = ''
if ARGV[6] == '1' then idem = KEYS[3] end
if idem ~= '' then
  local prev = redis.call('GET', idem)
  if prev then
    local sep = string.find(prev, ' ', 1, true)
    local hash, fid = string.sub(prev, 1, sep - 1), string.sub(prev, sep + 1)
    if hash == ARGV[3] then return {'duplicate', fid, ''} end
    return {'key_reused', fid, ''}
  end
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then return {'not_found', '', ''} end
local judged = redis.call('GET', KEYS[2])
if judged then return {'already_judged', judged, ''} end
redis.call('XADD', KEYS[4], '*', 'data', ARGV[2])
if ttl < 0 then ttl = 86400000 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ttl)
if idem ~= '' then
  redis.call('SET', idem, ARGV[3] .. ' ' .. ARGV[1], 'PX', ttl)
end
local task = ''
if ARGV[4] ~= '' then
  task = close_task(KEYS[5], KEYS[6], KEYS[7], KEYS[8], ARGV[4], ARGV[5])
end
return {'ok', ARGV[1], task}
"""
)


class CircuitBreaker:
    """Fail fast while Redis keeps timing out. After `threshold` timeouts in a row the
    breaker opens: calls fail at once for `cooldown_s`, without waiting out their
    deadline (a refused connection fails fast by itself and does not count). Then calls
    go through again; the first success closes it, a timeout opens it for another
    cooldown. cooldown_s 0 turns it off."""

    def __init__(self, threshold: int = 5, cooldown_s: float = 2.0):
        self.threshold, self.cooldown_s = threshold, cooldown_s
        self.failures = 0
        self.open_until = 0.0

    def check(self, what: str) -> None:
        wait = self.open_until - time.monotonic()
        if wait > 0:
            raise Unavailable(
                f"{what}: Redis timed out {self.failures} times in a row; not tried again for "
                f"{wait:.1f}s"
            )

    def success(self) -> None:
        self.failures, self.open_until = 0, 0.0

    def failure(self) -> None:
        self.failures += 1
        if self.cooldown_s and self.failures >= self.threshold:
            self.open_until = time.monotonic() + self.cooldown_s


class GroupCommit:
    """Calls that arrive while a round trip is out go to Redis together in the next one.

    `send(items)` makes one round trip for a batch and returns one result per item (an
    Exception instance fails that item alone); an exception it raises fails the batch.
    `send_one(item)` is the round trip of one call alone: with max_batch 1, grouping is
    off and every call makes its own, concurrently.
    """

    def __init__(
        self,
        send: Callable[[list], Awaitable[list]],
        send_one: Callable[[object], Awaitable],
        max_batch: int = 256,
    ):
        self.send, self.send_one, self.max_batch = send, send_one, max_batch
        self._waiting: list[tuple[object, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None

    async def submit(self, item: object):
        if self.max_batch <= 1:
            return await self.send_one(item)
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._waiting:
            batch = self._waiting[: self.max_batch]
            del self._waiting[: self.max_batch]
            batch = [(i, f) for i, f in batch if not f.done()]  # a caller that gave up
            if not batch:
                continue
            try:
                results = await self.send([item for item, _ in batch])
            except BaseException as e:  # noqa: BLE001 - every caller gets it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                if isinstance(e, asyncio.CancelledError):
                    raise
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)


class PromptCache:
    """The prompt records this replica logged, newest last: at most `size`, each until
    its TTL."""

    def __init__(self, size: int, ttl_s: float):
        self.size, self.ttl_s = size, ttl_s
        self._records: OrderedDict[str, tuple[float, records_pb2.PromptRecord]] = OrderedDict()

    def put(self, record: records_pb2.PromptRecord) -> None:
        if self.size <= 0:
            return
        self._records[record.prompt_id] = (time.monotonic() + self.ttl_s, record)
        while len(self._records) > self.size:
            self._records.popitem(last=False)

    def get(self, prompt_id: str) -> records_pb2.PromptRecord | None:
        hit = self._records.get(prompt_id)
        if hit is None:
            return None
        if hit[0] < time.monotonic():
            del self._records[prompt_id]
            return None
        return hit[1]


class RedisSettingsError(Exception):
    """The Redis is configured in a way that breaks a guarantee of the service."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class FeedbackResult:
    feedback_id: str
    duplicate: bool
    task: str = ""  # what a comparison did to the labeling queue (CLOSE_TASK_LUA's status)


def judgement_kind(req: api_pb2.SubmitFeedbackRequest) -> str:
    return "demonstration" if req.WhichOneof("kind") == "demonstration" else "comparison"


def content_hash(req: api_pb2.SubmitFeedbackRequest) -> str:
    """Hash of what a feedback request says, ignoring its idempotency key."""
    body = api_pb2.SubmitFeedbackRequest()
    body.CopyFrom(req)
    body.idempotency_key = ""
    return hashlib.sha256(body.SerializeToString(deterministic=True)).hexdigest()[:32]


class LogStore:
    """Async Redis access for the server: log prompts, look them up, accept feedback."""

    def __init__(
        self,
        url: str,
        keys: Keys,
        prompt_ttl_s: int,
        timeout_s: float = 2.0,
        max_connections: int = 64,
        breaker_cooldown_s: float = 2.0,
        prompt_cache_size: int = 4096,
        max_batch: int = 256,
        min_replicas_ack: int = 0,
        replica_ack_timeout_s: float = 1.0,
    ):
        self.keys = keys
        self.breaker = CircuitBreaker(cooldown_s=breaker_cooldown_s)
        self.prompt_ttl_s = prompt_ttl_s
        self.timeout_s = timeout_s
        self.redis = connect_async(url, timeout_s=timeout_s, max_connections=max_connections)
        self.cluster = is_cluster(self.redis)
        if min_replicas_ack and self.cluster:
            raise ValueError(
                "--redis-min-replicas-ack is for one Redis or Sentinel, not a Redis Cluster"
            )
        if min_replicas_ack and not 0 < replica_ack_timeout_s < timeout_s:
            raise ValueError(
                f"--redis-replica-ack-timeout-s ({replica_ack_timeout_s:g}) must be more than 0 "
                f"and less than --redis-timeout-s ({timeout_s:g})"
            )
        self.min_replicas_ack = min_replicas_ack
        self.replica_ack_timeout_ms = int(replica_ack_timeout_s * 1000)
        self._submit = self.redis.register_script(_SUBMIT_FEEDBACK)
        self._feedback = GroupCommit(self._send_feedback, self._send_one_feedback, max_batch)
        self._prompts = GroupCommit(
            self._send_prompts, lambda record: self._send_prompts([record]), max_batch
        )
        self.cache = PromptCache(prompt_cache_size, prompt_ttl_s)
        # The labeling queue, when the server runs one (app.py sets it): log_prompt
        # enqueues the prompts it wants in the log's own MULTI.
        self.queue: LabelingQueue | None = None

    @contextlib.asynccontextmanager
    async def call(self, what: str) -> AsyncIterator[None]:
        """One Redis call under the deadline and the circuit breaker; any failure becomes
        Unavailable(what ...)."""
        self.breaker.check(what)
        try:
            async with asyncio.timeout(self.timeout_s):
                yield
        except (TimeoutError, RedisTimeoutError) as e:
            self.breaker.failure()
            raise Unavailable(f"{what}: Redis did not answer within {self.timeout_s:g}s") from e
        except RedisError as e:  # refused or reset: fails fast by itself, no breaker needed
            raise Unavailable(f"{what}: {e}") from e
        self.breaker.success()

    async def check_settings(self) -> list[str]:
        """Warnings about the Redis's durability settings; RedisSettingsError when a setting
        breaks a guarantee (an eviction policy could evict idempotency and one-judgement
        keys, and a retried feedback would be stored twice). In a cluster: the settings
        of the master that holds the data path (its feedback stream's slot)."""
        try:
            async with self.call("could not read the Redis settings"):
                node = {}
                if self.cluster:
                    await self.redis.initialize()
                    node["target_nodes"] = self.redis.get_node_from_key(self.keys.feedback_stream)
                got = await self.redis.config_get("maxmemory*", **node)  # one pattern: Redis 6
                got.update(await self.redis.config_get("append*", **node))
        except Unavailable as e:
            return [f"{e}; durability settings not checked"]
        except Exception as e:  # managed Redis services often forbid CONFIG
            return [f"could not read the Redis settings ({e}); durability settings not checked"]
        got = {_text(k): _text(v) for k, v in got.items()}
        policy = got.get("maxmemory-policy", "noeviction")
        if policy != "noeviction":
            raise RedisSettingsError(
                f"Redis evicts keys (maxmemory-policy {policy}): idempotency and one-judgement "
                "keys could be evicted and a retried feedback stored twice; set "
                "maxmemory-policy noeviction (a full Redis then refuses writes)"
            )
        warnings = []
        if got.get("appendonly", "yes") != "yes":
            warnings.append(
                "Redis runs without AOF (appendonly no): acknowledged feedback is lost if "
                "Redis crashes; set appendonly yes and appendfsync always"
            )
        elif got.get("appendfsync", "always") != "always":
            warnings.append(
                f"Redis fsyncs its AOF {got.get('appendfsync')}, not always: a crash can lose "
                "up to a second of acknowledged feedback; set appendfsync always"
            )
        if got.get("maxmemory", "0") == "0":
            warnings.append("Redis has no maxmemory: it grows until the host runs out of memory")
        return warnings

    async def migrate_layout(self) -> None:
        """Move keys of the layout before hash tags to their new names (instructloop/
        migrate.py). A Redis that does not answer is warned about and skipped: the keys
        move at the next start."""
        try:
            await migrate_layout(self.redis, self.keys)
        except RedisError as e:
            log.warning("could not check for keys of the old layout (%s); not moved", e)

    async def ping(self) -> None:
        async with self.call("Redis is unreachable"):
            await self.redis.ping()

    async def log_prompt(self, record: records_pb2.PromptRecord) -> None:
        """Append the record to the prompts stream and store it under its id, in one MULTI
        (with the prompts of other calls in flight: group commit)."""
        async with self.call("could not log the prompt to Redis"):
            await self._prompts.submit(record)
        self.cache.put(record)

    async def _send_prompts(self, records: list[records_pb2.PromptRecord]) -> list[None]:
        async with self.redis.pipeline(transaction=True) as pipe:
            for record in records:
                data = record.SerializeToString()
                pipe.xadd(self.keys.prompts_stream, {DATA_FIELD: data})
                pipe.set(self.keys.prompt(record.prompt_id), data, ex=self.prompt_ttl_s)
                if self.queue is not None and self.queue.wants(record):
                    await self.queue.enqueue(pipe, record)
            await pipe.execute()
        return [None] * len(records)

    async def get_prompt(self, prompt_id: str) -> records_pb2.PromptRecord:
        cached = self.cache.get(prompt_id)
        if cached is not None:
            return cached
        async with self.call("Redis is unreachable"):
            data = await self.redis.get(self.keys.prompt(prompt_id))
        if data is None:
            raise NotFound(
                f"prompt {prompt_id} is unknown or expired (prompts accept feedback for "
                f"{self.prompt_ttl_s}s, and only when logged)"
            )
        record = records_pb2.PromptRecord()
        record.ParseFromString(data)
        return record

    async def submit_feedback(self, record: records_pb2.FeedbackRecord) -> FeedbackResult:
        req = record.feedback
        kind = judgement_kind(req)
        judgement = self.keys.judgement(req.prompt_id, req.user_id, kind)
        idem = (
            self.keys.idempotency(req.user_id, req.idempotency_key)
            if req.idempotency_key
            else judgement
        )
        keys = [
            self.keys.prompt(req.prompt_id),
            judgement,
            idem,
            self.keys.feedback_stream,
            self.keys.queue_waiting,
            self.keys.queue_leases,
            self.keys.queue_lease_of(req.user_id),
            self.keys.queue_item(req.prompt_id),
        ]
        judge = req.user_id if kind == "comparison" else ""  # a demonstration closes nothing
        args = [
            record.feedback_id,
            record.SerializeToString(),
            content_hash(req),
            judge,
            req.prompt_id,
            "1" if req.idempotency_key else "",
        ]
        async with self.call("could not store feedback in Redis"):
            status, fid, task = await self._feedback.submit((keys, args))
        status, fid = status.decode(), fid.decode()
        if status == "ok":
            return FeedbackResult(fid, duplicate=False, task=task.decode())
        if status == "duplicate":
            return FeedbackResult(fid, duplicate=True)
        if status == "not_found":
            raise NotFound(f"prompt {req.prompt_id} expired before the feedback was stored")
        if status == "already_judged":
            raise AlreadyExists(
                f"user {req.user_id!r} already sent a {judgement_kind(req)} for prompt "
                f"{req.prompt_id} (feedback {fid}); one per user per prompt"
            )
        raise AlreadyExists(
            f"idempotency key {req.idempotency_key!r} was already used by user "
            f"{req.user_id!r} for different feedback ({fid}); use a new key"
        )

    async def _send_one_feedback(self, call: tuple[list, list]):
        """The round trip of one feedback call alone (group commit off)."""
        if not self.min_replicas_ack:
            return await self._submit(keys=call[0], args=call[1])
        (result,) = await self._send_feedback([call])
        if isinstance(result, Exception):
            raise result
        return result

    async def _send_feedback(self, calls: list[tuple[list, list]]) -> list:
        """The feedback scripts of a batch, in one pipeline of EVALSHAs (each script stays
        atomic). A Redis that does not have the script (restarted, flushed) answers those
        calls NOSCRIPT, having run nothing: the script is loaded and they are sent again.

        With min_replicas_ack, the pipeline ends with WAIT on the same connection: Redis
        answers once that many replicas have the writes (or the timeout passed). If fewer
        did, every call of the batch fails Unavailable: its write is on the primary and
        may or may not survive a failover, and a retry with the same idempotency key is
        safe either way (it is stored once, or answered as the duplicate it is)."""
        results: list = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                for i in todo:
                    keys, args = calls[i]
                    # execute_command: redis-py's cluster pipeline blocks its evalsha()
                    # method, not the command, which it routes by KEYS like any other.
                    pipe.execute_command("EVALSHA", self._submit.sha, len(keys), *keys, *args)
                if self.min_replicas_ack:
                    pipe.execute_command("WAIT", self.min_replicas_ack, self.replica_ack_timeout_ms)
                replies = await pipe.execute(raise_on_error=False)
            if self.min_replicas_ack:
                acked = replies.pop()
                if isinstance(acked, Exception) or acked < self.min_replicas_ack:
                    acked = "?" if isinstance(acked, Exception) else acked
                    unsure = Unavailable(
                        f"feedback written to the Redis primary, but {acked} of the "
                        f"{self.min_replicas_ack} replicas required (--redis-min-replicas-ack) "
                        f"confirmed it within {self.replica_ack_timeout_ms} ms: it may or may "
                        "not survive a failover; retry with the same idempotency key"
                    )
                    replies = [r if isinstance(r, NoScriptError) else unsure for r in replies]
            missing = []
            for i, reply in zip(todo, replies, strict=True):
                if isinstance(reply, NoScriptError) and attempt == 0:
                    missing.append(i)
                else:
                    results[i] = reply
            if not missing:
                break
            await self.redis.script_load(_SUBMIT_FEEDBACK)
            todo = missing
        return results

    async def close(self) -> None:
        if self.cluster:
            await self.redis.aclose()  # closes every node's connections
        else:
            await self.redis.aclose(close_connection_pool=True)

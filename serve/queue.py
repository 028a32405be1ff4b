"""The labeling queue: labelers are handed prompts other users sent (the layout is
instructloop.keys, "labeling queue").

InstructGPT's labelers judged prompts customers had sent. Here a share of the logged
prompts with n >= 2 (--queue-share) becomes a queue item in the same MULTI that logs it,
and a labeler asks for work with NextTask:

- an item is leased to one labeler at a time for --queue-lease-s, and handed to
  --queue-overlap distinct labelers in all (the overlap lets the learner measure
  agreement); a labeler holds one lease at most, and NextTask returns it again while it
  is live, so a retried call never strands a second item;
- never the labeler's own prompt, nor one it leased, skipped or judged before;
- a comparison (ranking, choice or rating) by the labeler closes its lease, in the
  script that stores it (CLOSE_TASK_LUA, run by logstore's SubmitFeedback script): the
  lease is closed if and only if the comparison is stored; when `overlap` labelers have
  judged the item it leaves the queue. A demonstration alone does
  not close it: the queue asks for the comparison the reward model and the agreement
  measure need, and a demonstration is an extra the labeler may add beside it. A
  comparison sent without a lease (or after the lease expired) counts too; the owner's
  own judgement does not (the queue exists to get other people's);
- SkipTask gives an item back (it returns for others, never to the skipper); "cannot
  rank" does the same and counts: --queue-drop-cannot-rank distinct labelers (default 2)
  drop it. Every skip's reason goes to a capped stream (keys.QUEUE_SKIPS_MAXLEN). The
  same skip sent again (a retry) succeeds and changes nothing.

Every step is one Lua script, so it is atomic with the state it reads, and as durable as
feedback (AOF, fsync always). Expired leases are reclaimed at the start of NextTask's
script, before it picks, so an item returns to the queue the moment its lease runs out
(as seen by the next labeler). A pick looks at a bounded number of candidates: the
oldest --queue-scan, then as many from a random place (a labeler who skipped or judged
many of the oldest items still finds newer ones); NOT_FOUND says what it saw.

Times are Redis's own (TIME inside the scripts), so every replica agrees on expiry.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline

from instructloop.keys import QUEUE_SKIPS_MAXLEN
from instructloop.v1 import api_pb2, records_pb2

from .config import Limits, QueueConfig
from .errors import ApiError, InvalidArgument, NotFound

if TYPE_CHECKING:
    from .logstore import LogStore

RECLAIM_PER_CALL = 64  # expired leases one NextTask reclaims at most (oldest first)

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: waiting, item. ARGV: prompt id, owner, overlap, ttl ms, max waiting, item prefix
# Reply: items dropped to make room
_ENQUEUE = (
    _NOW
    + """
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[5]) + 1
if over > 0 then
  local old = redis.call('ZPOPMIN', KEYS[1], over)
  for i = 1, #old, 2 do redis.call('DEL', ARGV[6] .. old[i]) end
else
  over = 0
end
redis.call('HSET', KEYS[2], 'owner', ARGV[2], 'at', now, 'need', ARGV[3], 'taken', 0,
           'done', 0, 'cannot', 0, 'leases', 0)
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[1], now, ARGV[1])
return over
"""
)

# Shared by the scripts: forget a labeler's one-lease pointer if it names this item.
_FORGET = """
local function forget(key, pid)
  local held = redis.call('GET', key)
  if held and string.sub(held, 1, #pid + 1) == pid .. ' ' then redis.call('DEL', key) end
end
"""

# KEYS: waiting, leases, the caller's lease pointer
# ARGV: user, lease ms, scan, random offset, item prefix, prompt prefix, lease-of prefix,
#       reclaim at most
# Reply: {status, prompt id, lease number, expiry ms, overlap, waiting, leased, record,
#         own, seen, scanned}; status 'leased', 'held' or 'none'
_NEXT = (
    _NOW
    + _FORGET
    + """
local user, items, prompts = ARGV[1], ARGV[5], ARGV[6]

-- 1. Reclaim expired leases: the item gets its place back.
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, ARGV[8])
for _, m in ipairs(expired) do
  redis.call('ZREM', KEYS[2], m)
  local sep = string.find(m, ' ', 1, true)
  local pid, who = string.sub(m, 1, sep - 1), string.sub(m, sep + 1)
  local state = redis.call('HGET', items .. pid, 'u:' .. who)
  if state and string.sub(state, 1, 1) == 'L' then
    redis.call('HSET', items .. pid, 'u:' .. who, 'X ' .. string.match(state, '^L (%d+)'))
    local taken = redis.call('HINCRBY', items .. pid, 'taken', -1)
    local f = redis.call('HMGET', items .. pid, 'need', 'at')
    if taken < tonumber(f[1]) then redis.call('ZADD', KEYS[1], 'NX', f[2], pid) end
  end
  forget(ARGV[7] .. who, pid)
end

local function counts()
  return redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2])
end

-- 2. The caller's live lease, if it holds one: the same task again.
local held = redis.call('GET', KEYS[3])
if held then
  local pid, no, exp = string.match(held, '^(%S+) (%d+) (%d+)$')
  local f = redis.call('HMGET', items .. pid, 'u:' .. user, 'need')
  local record = redis.call('GET', prompts .. pid)
  if f[1] == 'L ' .. no .. ' ' .. exp and tonumber(exp) > now and record then
    local waiting, leased = counts()
    return {'held', pid, no, exp, f[2], waiting, leased, record, 0, 0, 0}
  end
  redis.call('DEL', KEYS[3])
end

-- 3. Pick: the oldest `scan` items, then `scan` from a random place.
local scan = tonumber(ARGV[3])
local windows = {redis.call('ZRANGE', KEYS[1], 0, scan - 1)}
local n = redis.call('ZCARD', KEYS[1])
if n > scan then
  local start = scan + tonumber(ARGV[4]) % (n - scan)
  windows[2] = redis.call('ZRANGE', KEYS[1], start, start + scan - 1)
end
local own, seen, scanned = 0, 0, 0
for _, window in ipairs(windows) do
  for _, pid in ipairs(window) do
    scanned = scanned + 1
    local item = items .. pid
    local f = redis.call('HMGET', item, 'owner', 'need', 'taken', 'u:' .. user)
    if not f[2] then
      redis.call('ZREM', KEYS[1], pid)  -- expired with its prompt, or dropped
    elseif f[1] == user then
      own = own + 1
    elseif f[4] then
      seen = seen + 1
    elseif tonumber(f[3]) >= tonumber(f[2]) then
      redis.call('ZREM', KEYS[1], pid)  -- no free place
    else
      local record = redis.call('GET', prompts .. pid)
      if not record then
        redis.call('ZREM', KEYS[1], pid)
        redis.call('DEL', item)
      else
        local no = redis.call('HINCRBY', item, 'leases', 1)
        local exp = now + tonumber(ARGV[2])
        redis.call('HSET', item, 'u:' .. user, 'L ' .. no .. ' ' .. exp)
        if redis.call('HINCRBY', item, 'taken', 1) >= tonumber(f[2]) then
          redis.call('ZREM', KEYS[1], pid)
        end
        redis.call('ZADD', KEYS[2], exp, pid .. ' ' .. user)
        redis.call('SET', KEYS[3], pid .. ' ' .. no .. ' ' .. exp, 'PX', ARGV[2])
        local waiting, leased = counts()
        return {'leased', pid, no, exp, f[2], waiting, leased, record, 0, 0, 0}
      end
    end
  end
end
local waiting, leased = counts()
return {'none', '', 0, 0, 0, waiting, leased, '', own, seen, scanned}
"""
)

# KEYS: waiting, leases, the caller's lease pointer, item, skips stream
# ARGV: user, prompt id, lease number, cannot rank (0/1), drop at, record, stream maxlen
# Reply: {status, dropped (0/1), waiting, state}; status 'ok', 'unknown' or 'closed'.
# The same skip again (a retry) is 'ok' and changes nothing.
_SKIP = (
    _FORGET
    + """
local user, pid = ARGV[1], ARGV[2]
local state = redis.call('HGET', KEYS[4], 'u:' .. user)
if not state then return {'unknown', 0, redis.call('ZCARD', KEYS[1]), ''} end
local kind, no = string.match(state, '^(%a) ?(%d*)')
local cannot = ARGV[4] == '1'
if kind == (cannot and 'C' or 'S') and no == ARGV[3] then  -- a retry: done already
  return {'ok', 0, redis.call('ZCARD', KEYS[1]), kind}
end
if kind == 'J' or kind == 'S' or kind == 'C' then
  return {'closed', 0, redis.call('ZCARD', KEYS[1]), kind}
end
if no ~= ARGV[3] then return {'unknown', 0, redis.call('ZCARD', KEYS[1]), kind} end
if kind == 'L' then  -- live (or expired, not yet reclaimed): free its place
  redis.call('ZREM', KEYS[2], pid .. ' ' .. user)
  redis.call('HINCRBY', KEYS[4], 'taken', -1)
  forget(KEYS[3], pid)
end
redis.call('HSET', KEYS[4], 'u:' .. user, (cannot and 'C ' or 'S ') .. no)
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[7], '*', 'data', ARGV[6])
if cannot and redis.call('HINCRBY', KEYS[4], 'cannot', 1) >= tonumber(ARGV[5]) then
  redis.call('DEL', KEYS[4])
  redis.call('ZREM', KEYS[1], pid)
  return {'ok', 1, redis.call('ZCARD', KEYS[1]), kind}
end
local f = redis.call('HMGET', KEYS[4], 'taken', 'need', 'at')
if tonumber(f[1]) < tonumber(f[2]) then redis.call('ZADD', KEYS[1], 'NX', f[3], pid) end
return {'ok', 0, redis.call('ZCARD', KEYS[1]), kind}
"""
)

# The close step of SubmitFeedback's script (logstore._SUBMIT_FEEDBACK runs it right after
# it stores a comparison, atomically with it): the judge's lease on the prompt's item
# becomes a judgement, or a judgement sent without a lease takes a place; with `need`
# judgements the item leaves the queue.
# Returns 'none' (not a queue item), 'own', 'already', 'closed' or 'finished'.
CLOSE_TASK_LUA = (
    _FORGET
    + """
local function close_task(waiting, leases, lease_of, item, user, pid)
  local f = redis.call('HMGET', item, 'owner', 'need', 'u:' .. user)
  if not f[2] then return 'none' end
  if f[1] == user then return 'own' end
  if f[3] == 'J' then return 'already' end
  redis.call('HSET', item, 'u:' .. user, 'J')
  if f[3] and string.sub(f[3], 1, 1) == 'L' then  -- the lease becomes a judgement
    redis.call('ZREM', leases, pid .. ' ' .. user)
    forget(lease_of, pid)
  elseif redis.call('HINCRBY', item, 'taken', 1) >= tonumber(f[2]) then
    redis.call('ZREM', waiting, pid)
  end
  if redis.call('HINCRBY', item, 'done', 1) >= tonumber(f[2]) then
    redis.call('DEL', item)
    redis.call('ZREM', waiting, pid)
    return 'finished'
  end
  return 'closed'
end
"""
)


class TaskClosed(ApiError):
    """SkipTask on a lease the caller already closed (FAILED_PRECONDITION)."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def check_labeler_id(user_id: str, limits: Limits) -> None:
    """The caller's id as the queue keys it: set (the credential's, or in open mode the
    request's) and within --max-id-chars."""
    if not user_id:
        raise InvalidArgument("user_id is required without a credential (open mode)")
    if len(user_id) > limits.max_id_chars:
        raise InvalidArgument(
            f"user_id is {len(user_id)} characters; the limit is {limits.max_id_chars}"
        )


def task_id(prompt_id: str, number: int) -> str:
    return f"{prompt_id}/{number}"


def parse_task_id(value: str, max_chars: int) -> tuple[str, int]:
    """(prompt id, lease number) of a Task.task_id; InvalidArgument if it is not one."""
    prompt_id, _, number = value.rpartition("/")
    if not prompt_id or not number.isdigit() or len(value) > max_chars:
        raise InvalidArgument(f"task_id {value[:80]!r} is not a task id from NextTask")
    return prompt_id, int(number)


@dataclass
class Lease:
    """One NextTask answer: the item leased to the caller and the queue around it."""

    prompt_id: str
    number: int  # 1-based: which lease of this item it is
    expires_ms: int  # Redis time
    overlap: int
    waiting: int  # items with a free place, after this lease
    leased: int  # live leases, this one included
    record: records_pb2.PromptRecord
    again: bool  # the caller's live lease, handed out before

    @property
    def task_id(self) -> str:
        return task_id(self.prompt_id, self.number)


class LabelingQueue:
    def __init__(self, store: LogStore, cfg: QueueConfig, limits: Limits):
        cfg.check()
        self.store = store
        self.keys = store.keys
        self.cfg = cfg
        self.limits = limits
        redis = store.redis
        self._enqueue = redis.register_script(_ENQUEUE)
        self._next = redis.register_script(_NEXT)
        self._skip = redis.register_script(_SKIP)

    def wants(self, record: records_pb2.PromptRecord) -> bool:
        """Whether this logged prompt becomes a queue item (n >= 2, drawn by the share)."""
        share = self.cfg.queue_share
        return len(record.samples) >= 2 and share > 0 and random.random() < share

    async def enqueue(
        self, pipe: Pipeline | ClusterPipeline, record: records_pb2.PromptRecord
    ) -> None:
        """Add the item to `pipe`, the MULTI that logs its prompt (same TTL). Buffered:
        nothing is sent before the pipeline executes."""
        pid = record.prompt_id
        keys = [self.keys.queue_waiting, self.keys.queue_item(pid)]
        args = [
            pid,
            record.user_id,
            self.cfg.queue_overlap,
            self.store.prompt_ttl_s * 1000,
            self.cfg.queue_max,
            self.keys.queue_item_prefix,
        ]
        if self.store.cluster:
            # A cluster pipeline does not load scripts before its MULTI (a single Redis's
            # does), and an EVALSHA the node lacks would fail the log call: send the text.
            pipe.eval(_ENQUEUE, len(keys), *keys, *args)
        else:
            await self._enqueue(keys=keys, args=args, client=pipe)

    async def next_task(self, user_id: str) -> Lease:
        """Lease an item to user_id (or return its live lease); NotFound when none fits."""
        keys = [self.keys.queue_waiting, self.keys.queue_leases, self.keys.queue_lease_of(user_id)]
        args = [
            user_id,
            int(self.cfg.queue_lease_s * 1000),
            self.cfg.queue_scan,
            random.randrange(1 << 31),
            self.keys.queue_item_prefix,
            self.keys.prompt(""),
            self.keys.queue_lease_of_prefix,
            RECLAIM_PER_CALL,
        ]
        async with self.store.call("could not read the labeling queue"):
            reply = await self._next(keys=keys, args=args)
        status, pid, number, expires, overlap, waiting, leased, data, own, seen, scanned = reply
        status = _text(status)
        if status == "none":
            raise NotFound(self._why_none(user_id, waiting, leased, own, seen, scanned))
        return Lease(
            prompt_id=_text(pid),
            number=int(number),
            expires_ms=int(expires),
            overlap=int(overlap),
            waiting=int(waiting),
            leased=int(leased),
            record=records_pb2.PromptRecord.FromString(data),
            again=status == "held",
        )

    def _why_none(self, user_id, waiting, leased, own, seen, scanned) -> str:
        if not waiting:
            why = f"the labeling queue is empty ({leased} items are leased to labelers now)"
            if self.cfg.queue_share == 0:
                why += (
                    "; this replica enqueues no prompts (--queue-share 0): start the server "
                    "with --queue-share > 0 to hand out prompts users send"
                )
            return why
        return (
            f"no task for user {user_id!r}: {waiting} items wait, and of the {scanned} looked "
            f"at, {own} are its own prompts and {seen} it already leased, skipped or judged "
            "(the rest expired or were full); try again later"
        )

    async def skip(self, request: api_pb2.SkipTaskRequest) -> tuple[bool, int]:
        """Give the caller's lease back (request.user_id is the caller; the request is
        what the skips stream keeps). Returns (dropped, waiting). Raises InvalidArgument,
        NotFound or TaskClosed."""
        user_id = request.user_id
        pid, number = parse_task_id(request.task_id, self.limits.max_id_chars + 24)
        most = self.limits.max_skip_reason_chars
        if len(request.reason) > most:
            raise InvalidArgument(f"reason has {len(request.reason)} characters; at most {most}")
        if request.cannot_rank and not request.reason.strip():
            raise InvalidArgument("cannot_rank needs a reason: say why the item cannot be ranked")
        keys = [
            self.keys.queue_waiting,
            self.keys.queue_leases,
            self.keys.queue_lease_of(user_id),
            self.keys.queue_item(pid),
            self.keys.queue_skips,
        ]
        args = [
            user_id,
            pid,
            number,
            int(request.cannot_rank),
            self.cfg.queue_drop_cannot_rank,
            request.SerializeToString(),
            QUEUE_SKIPS_MAXLEN,
        ]
        async with self.store.call("could not update the labeling queue"):
            status, dropped, waiting, state = await self._skip(keys=keys, args=args)
        status, state = _text(status), _text(state)
        if status == "unknown":
            raise NotFound(
                f"task {request.task_id[:80]!r} is not leased to user {user_id!r}: the item "
                "left the queue (judged by enough labelers, dropped, or expired with its "
                "prompt), or the task id is not from this user's NextTask"
            )
        if status == "closed":
            done = {"J": "judged", "S": "skipped", "C": "marked as cannot rank"}[state]
            raise TaskClosed(
                f"user {user_id!r} already {done} task {request.task_id[:80]!r}; nothing to skip"
            )
        return bool(dropped), int(waiting)

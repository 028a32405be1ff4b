"""One learner per deployment: a lease in Redis that a second learner waits for.

Two learners on one Redis would split the streams' entries between them (one consumer
group), train on halves and both promote. The lease is redis-py's Lock (SET NX PX, a Lua
compare-and-extend) with a TTL, renewed by a thread every third of the TTL. A learner
that cannot renew in time (a partition, a paused process) has lost it: the lease thread
sets the stop event, the round in hand is abandoned at its next phase boundary, and the
process exits with status 1 so that its supervisor restarts it, as a waiter.

The lease's value names its holder (consumer name and a random suffix), so a waiting
learner can say whom it waits for.
"""

from __future__ import annotations

import logging
import threading
import uuid

import redis
from redis.exceptions import LockError

log = logging.getLogger(__name__)


class LearnerLease:
    def __init__(self, client: redis.Redis, key: str, holder: str, ttl_s: float = 30.0):
        self.client = client
        self.key = key
        self.ttl_s = ttl_s
        self.token = f"{holder} {uuid.uuid4().hex[:8]}"
        self.lock = client.lock(key, timeout=ttl_s, thread_local=False)
        self.lost = threading.Event()
        self._done = threading.Event()
        self._renewer: threading.Thread | None = None

    def holder(self) -> str:
        """Who holds the lease now ('' when nobody)."""
        value = self.client.get(self.key)
        return value.decode(errors="replace") if value else ""

    def acquire(self, stop: threading.Event, poll_s: float = 1.0) -> bool:
        """Wait until this process holds the lease (True) or `stop` is set (False)."""
        announced = ""
        while not stop.is_set():
            try:
                if self.lock.acquire(blocking=False, token=self.token):
                    log.info("learner lease %s acquired (ttl %gs)", self.key, self.ttl_s)
                    self._renewer = threading.Thread(
                        target=self._renew, args=(stop,), name="learner-lease", daemon=True
                    )
                    self._renewer.start()
                    return True
                holder = self.holder()
                if holder and holder != announced:
                    log.warning(
                        "another learner holds the lease (%s); waiting until it stops", holder
                    )
                    announced = holder
            except redis.ConnectionError as e:
                log.warning("redis unavailable (%s); waiting for the learner lease", e)
            stop.wait(poll_s)
        return False

    def _renew(self, stop: threading.Event) -> None:
        while not self._done.wait(self.ttl_s / 3):
            try:
                self.lock.reacquire()
            except LockError:
                log.error(
                    "learner lease lost (now held by %r): stopping this learner",
                    self._safe_holder(),
                )
                self.lost.set()
                stop.set()
                return
            except redis.RedisError as e:  # keep trying until the TTL runs out
                log.warning("could not renew the learner lease: %s", e)

    def _safe_holder(self) -> str:
        try:
            return self.holder()
        except redis.RedisError:
            return "unknown"

    def release(self) -> None:
        self._done.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        if self._renewer is None or self.lost.is_set():
            return
        try:
            self.lock.release()
        except (LockError, redis.RedisError) as e:
            log.warning("could not release the learner lease (it expires by itself): %s", e)

"""Follow the registry's `current` (and `canary`) alias on this replica.

A RegistryEvent on the pub/sub channel wakes the follower at once; a poll every few
seconds is the fallback, so a missed message still converges. Before a swap the
version's files are verified against its manifest checksum; a missing, partial or
corrupt version is refused, the old version keeps serving, and the refusal shows in
GetModel, the logs, the metrics and this replica's heartbeat in the registry.

A full-weight swap takes the replica out of load balancers while it drains: with
`health`, it reports NOT_SERVING for `drain_grace_s` before the engine pauses, and
SERVING again once the swap ended (done or refused). With `turn` (rolling swaps), it
first waits for the fleet's one swap turn (serve/swapturn.py), and holds it another
`drain_grace_s` after SERVING, so balancers have taken it back before the next replica
leaves: at most one replica of the fleet is out at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
import uuid
from pathlib import Path

from redis.exceptions import RedisError

from instructloop.registry import CURRENT, Registry, RegistryError
from instructloop.store import ModelStore, VersionError
from instructloop.v1 import admin_pb2, records_pb2

from .engine import Engine, EngineError, VersionNotLoaded
from .health import ServingHealth
from .metrics import Metrics
from .swapturn import SwapTurn

log = logging.getLogger(__name__)
RETRY_REFUSED_S = 30.0


class SwapRefused(Exception):
    """A version could not be served here; the previous one keeps serving."""


class VersionFollower:
    def __init__(
        self,
        engine: Engine,
        registry: Registry,
        store: ModelStore,
        metrics: Metrics,
        poll_interval_s: float = 5.0,
        replica_id: str = "",
        *,
        health: ServingHealth | None = None,
        turn: SwapTurn | None = None,
        drain_grace_s: float = 0.0,
    ):
        self.engine = engine
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self.poll_interval_s = poll_interval_s
        self.replica_id = replica_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        self.last_swap_error = ""
        self.canary: tuple[str, float] | None = None
        self._refused: dict[str, float] = {}  # version -> when; retried after a while
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._heartbeats = 0
        self._base: admin_pb2.VersionInfo | None = None  # set until registered
        self.health = health
        self.turn = turn
        self.drain_grace_s = drain_grace_s
        self._live = False  # False during the first sync: no balancer sends calls yet

    @property
    def mode(self) -> str:
        return "lora" if self.engine.supports_adapters else "full"

    # ---- lifecycle --------------------------------------------------------------------

    async def start(self, base: admin_pb2.VersionInfo) -> None:
        """Register the base and follow the registry. A Redis that does not answer does
        not stop the server from starting: it serves the base (unlogged), and the poll
        loop registers the base and converges once Redis answers."""
        self._base = base
        try:
            await self._sync()
        except RedisError as e:
            log.warning(
                "registry unreachable at start (%s): serving the base %s, following the "
                "registry once Redis answers", e, base.id,
            )  # fmt: skip
        self._live = True
        self._tasks = [
            asyncio.create_task(self._listen(), name="registry-listen"),
            asyncio.create_task(self._poll(), name="registry-poll"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.registry.forget_replica(self.replica_id)
        except Exception as e:  # Redis may be gone at shutdown
            log.warning("could not remove replica heartbeat: %s", e)

    async def _listen(self) -> None:
        while True:
            try:
                async for data in self.registry.events():
                    self._wake.set()
                    self._observe_event(data)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("registry events unavailable (%s); polling meanwhile", e)
                await asyncio.sleep(self.poll_interval_s)

    def _observe_event(self, data: bytes) -> None:
        """The age of a registry event on arrival: the swap's first part."""
        event = records_pb2.RegistryEvent()
        with contextlib.suppress(Exception):  # an event we cannot read still wakes us
            event.ParseFromString(data)
            if event.HasField("at"):
                age = time.time() - event.at.ToNanoseconds() / 1e9
                self.metrics.swap_phase_seconds.labels("event").observe(max(0.0, age))

    async def _poll(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval_s)
            self._wake.clear()
            try:
                await self._sync()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("could not reach the registry: %s", e)

    async def _sync(self) -> None:
        """Register the base if that is still to do, then converge."""
        if self._base is not None:
            await self.registry.ensure_base(self._base)
            self._base = None
        await self.converge()

    # ---- converge ---------------------------------------------------------------------

    async def converge(self) -> None:
        """Bring this replica to the registry's current (and canary) version."""
        async with self._lock:
            target = await self.registry.alias(CURRENT)
            if target and target != self.engine.version and self._may_try(target):
                await self._try(target, self._serve)
            await self._follow_canary()
            self._heartbeats += 1
            if self._heartbeats % 100 == 1:  # now and then: forget replicas long dead
                await self.registry.replicas()
            await self.registry.heartbeat(
                admin_pb2.ReplicaStatus(
                    replica_id=self.replica_id,
                    version=self.engine.version,
                    last_swap_error=self.last_swap_error,
                    mode=self.mode,
                )
            )

    def _may_try(self, version: str) -> bool:
        refused_at = self._refused.get(version)
        return refused_at is None or time.monotonic() - refused_at > RETRY_REFUSED_S

    async def _try(self, version: str, action) -> bool:
        try:
            await action(version)
        except (SwapRefused, VersionError, RegistryError, EngineError, VersionNotLoaded) as e:
            self._refused[version] = time.monotonic()
            self.last_swap_error = f"refused {version}: {e}"
            self.metrics.swaps.labels(self.mode, "refused").inc()
            log.error(
                "swap refused; still serving %s",
                self.engine.version,
                extra={"version": version, "error": str(e)},
            )
            return False
        self._refused.pop(version, None)
        return True

    async def _checked_dir(self, info: admin_pb2.VersionInfo) -> str:
        """The version's directory, after verifying it: its registry entry is signed with
        the deployment's key, and its files match the checksum the signed entry names
        (hashing runs off the event loop)."""
        self.registry.verify(info)
        if info.kind == "base":
            if not (Path(info.path) / "config.json").exists():
                raise SwapRefused(f"base model directory {info.path} is missing")
            return info.path
        manifest = await asyncio.to_thread(self.store.verify, info.id)
        if manifest.kind != info.kind:
            raise SwapRefused(f"manifest says {manifest.kind}, registry says {info.kind}")
        if manifest.checksum != info.checksum:
            raise SwapRefused(
                f"the store's {info.id} has checksum {manifest.checksum[:12]}…, its signed "
                f"registry entry names {info.checksum[:12]}…: refused"
            )
        return str(self.store.path(info.id))

    async def _serve(self, version: str) -> None:
        started = time.perf_counter()
        info = await self.registry.get(version)
        if version == self.engine.weights_version:
            # Back to the full weights already loaded (e.g. from one of their adapters).
            await self.engine.set_current(version)
            self._served(version, info.kind, started)
            return
        path = await self._checked_dir(info)
        phases = {"verify": time.perf_counter() - started}
        if info.kind == "lora":
            loaded = time.perf_counter()
            await self._load_adapter(info, path)
            await self.engine.set_current(version)
            phases["load"] = time.perf_counter() - loaded
        else:
            phases.update(await self._swap_full(path, version))
        for phase, seconds in phases.items():
            self.metrics.swap_phase_seconds.labels(phase).observe(seconds)
        self._served(version, info.kind, started)

    def _served(self, version: str, kind: str, started: float) -> None:
        elapsed = time.perf_counter() - started
        self.metrics.swaps.labels(self.mode, "ok").inc()
        self.metrics.swap_seconds.labels(kind).observe(elapsed)
        self.metrics.set_version(version)
        self.last_swap_error = ""
        log.info("now serving", extra={"version": version, "kind": kind, "seconds": elapsed})

    async def _swap_full(self, path: str, version: str) -> dict[str, float]:
        """A full-weight swap, out of the balancer: in turn (rolling), NOT_SERVING for
        the grace, drain and load, SERVING again (also when it fails), and the turn kept
        for another grace. The seconds of its parts."""
        if not self._live:  # the first sync, before the server takes calls
            return await self.engine.swap_full(path, version)
        phases: dict[str, float] = {}
        async with contextlib.AsyncExitStack() as stack:
            if self.turn is not None:
                phases["turn"] = await stack.enter_async_context(self.turn.hold(version))
            t0 = time.perf_counter()
            if self.health is not None:
                await self.health.set_swapping(True)
            log.info("swap to %s: NOT_SERVING at t=%.3f", version, time.time())
            try:
                await asyncio.sleep(self.drain_grace_s)
                phases["grace"] = time.perf_counter() - t0
                phases.update(await self.engine.swap_full(path, version))
            finally:
                if self.health is not None:
                    await self.health.set_swapping(False)
                log.info("swap to %s: SERVING at t=%.3f", version, time.time())
            if self.turn is not None:  # balancers see this replica back before the next leaves
                t1 = time.perf_counter()
                await asyncio.sleep(self.drain_grace_s)
                phases["grace"] += time.perf_counter() - t1
        return phases

    async def _load_adapter(self, info: admin_pb2.VersionInfo, path: str) -> None:
        if not self.engine.supports_adapters:
            raise SwapRefused(f"{info.id} is a LoRA adapter; this replica runs without LoRA")
        if self.engine.weights_version != info.base_model:
            base = await self.registry.get(info.base_model)
            await self._swap_full(await self._checked_dir(base), base.id)
        await self.engine.load_adapter(path, info.id)

    async def _follow_canary(self) -> None:
        version, share = await self.registry.canary()
        if not version or not self.engine.supports_adapters:
            self.canary, self.engine.keep = None, set()
            return
        if version not in self.engine.loaded_versions() and self._may_try(version):

            async def load(v: str) -> None:
                info = await self.registry.get(v)
                if info.kind != "lora" or info.base_model != self.engine.weights_version:
                    raise SwapRefused(f"canary {v} must be a LoRA adapter on the current weights")
                await self.engine.load_adapter(await self._checked_dir(info), v)

            await self._try(version, load)
        if version in self.engine.loaded_versions():
            self.canary, self.engine.keep = (version, share), {version}

    # ---- routing ----------------------------------------------------------------------

    def route(self, pin: str) -> tuple[str | None, bool]:
        """(version, is_canary) for a new request: its pin, else the canary for a share of
        traffic, else (None, False), meaning current."""
        if pin:
            return pin, False
        if self.canary and random.random() < self.canary[1]:
            return self.canary[0], True
        return None, False

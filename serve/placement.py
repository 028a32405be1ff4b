"""Which CPU cores a vLLM CPU engine's processes and the API front end run on.

vLLM's CPU worker binds its compute (OpenMP) threads to fixed cores and leaves the other
cores free, but pins nothing else. Its engine-core process busy-polls (sched_yield in a
loop) for the worker's result while the worker computes, so both engine processes look
CPU-bound to the kernel, and the front end, its clients and Redis end up queued behind
one of them. Measured on 2 cores (bench/serve, 2026-11): the client's event loop stalled
up to 0.3 s waiting for a core, calls reached the server's handler up to 0.7 s after they
were sent, the engine held half the requests it was offered, and Redis took up to 0.5 s
to answer an XADD it serves in 0.2 ms on an idle machine.

The placement: the front end (this process, every thread) and the embedded Redis get the
free cores. With one free core (vLLM's default leaves one) the engine core shares one of
the worker's cores: on CPU vLLM does not schedule ahead (no async scheduling), so the
engine core's real work runs while the worker waits for it, and the front end keeps a
core no busy-poller uses. It costs the engine some throughput of its own (bench/serve,
README). With two or more free cores (VLLM_CPU_NUM_OF_RESERVED_CPU) the engine core gets
one of them to itself; not measured, these machines have 2 cores. With no free core, or
a worker that is not bound (GPU hosts, VLLM_CPU_OMP_THREADS_BIND=nobind), nothing moves.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

import psutil

# The process titles vLLM sets (setproctitle); /proc's comm keeps 15 characters.
ENGINE_CORE_PREFIX = "VLLM::EngineCor"
WORKER_PREFIX = "VLLM::Worker"


@dataclass(frozen=True)
class Plan:
    engine_core: frozenset[int]
    frontend: frozenset[int]


def plan(allowed: set[int], worker: set[int]) -> Plan | None:
    """Cores for the engine core and the front end, given the cores this process may use
    and the cores the worker is bound to; None when nothing should move."""
    free = set(allowed) - set(worker)
    if not worker or not free:
        return None
    if len(free) >= 2:
        core = {min(free)}
        return Plan(frozenset(core), frozenset(free - core))
    return Plan(frozenset({max(worker)}), frozenset(free))


def pin(pid: int, cpus: Iterable[int]) -> None:
    """Bind every thread of a process (threads it starts later inherit the binding)."""
    cpus = set(cpus)
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(tid), cpus)


def engines_of(frontend_pid: int) -> tuple[list[int], set[int]]:
    """The engine-core processes a front end started (its direct children) and the
    union of the cores their workers are bound to."""
    cores, worker_cpus = [], set()
    for child in psutil.Process(frontend_pid).children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if not child.name().startswith(ENGINE_CORE_PREFIX):
                continue
            cores.append(child.pid)
            for w in child.children(recursive=True):
                if w.name().startswith(WORKER_PREFIX):
                    worker_cpus |= set(w.cpu_affinity())
    return cores, worker_cpus


def place(frontends: Iterable[int], others: Iterable[int] = ()) -> Plan | None:
    """Apply the placement to front ends, their engines and `others` (processes that serve
    alongside them, e.g. the embedded Redis). Returns what was applied."""
    frontends = list(frontends)
    cores, worker_cpus = [], set()
    for pid in frontends:
        c, w = engines_of(pid)
        cores += c
        worker_cpus |= w
    p = plan(os.sched_getaffinity(frontends[0]), worker_cpus)
    if p is None:
        return None
    for pid in cores:
        pin(pid, p.engine_core)
    for pid in (*frontends, *others):
        pin(pid, p.frontend)
    return p

"""CPU placement of a vLLM CPU engine: the plan, and the real server applying it."""

from __future__ import annotations

import os

import pytest

from instructloop.serve import placement


def _threads_affinity(pid: int) -> list[set[int]]:
    return [os.sched_getaffinity(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")]


@pytest.mark.parametrize(
    ("allowed", "worker", "engine_core", "frontend"),
    [
        ({0, 1}, {0}, {0}, {1}),  # one free core: the engine core joins the worker
        ({0, 1, 2, 3}, {0, 1, 2}, {2}, {3}),  # ... one of the worker's cores, not all
        ({0, 1, 2, 3}, {0, 1}, {2}, {3}),  # two free: the engine core gets one to itself
        ({0, 1, 2, 3, 4, 5}, {0, 1, 2}, {3}, {4, 5}),
    ],
)
def test_plan_keeps_the_front_end_off_busy_cores(allowed, worker, engine_core, frontend):
    plan = placement.plan(allowed, worker)
    assert plan == placement.Plan(frozenset(engine_core), frozenset(frontend))
    assert not plan.frontend & (worker | plan.engine_core)


@pytest.mark.parametrize(
    ("allowed", "worker"),
    [
        ({0, 1}, set()),  # no bound worker (GPU host, or nobind)
        ({0, 1}, {0, 1}),  # the worker holds every core
        ({0, 1}, {0, 1, 2, 3}),
    ],
)
def test_plan_moves_nothing_without_a_free_core_or_a_bound_worker(allowed, worker):
    assert placement.plan(allowed, worker) is None


def test_server_runs_its_threads_on_the_free_cores_and_its_engine_core_beside_the_worker(server):
    pid = server.proc.pid
    cores, worker_cpus = placement.engines_of(pid)
    assert cores, "the server has no vLLM engine-core child"
    expected = placement.plan(os.sched_getaffinity(0), worker_cpus)  # the server's start set
    if expected is None:
        assert all(a == os.sched_getaffinity(0) for a in _threads_affinity(pid))
        return
    assert all(a == expected.frontend for a in _threads_affinity(pid))
    for core in cores:
        assert all(a == expected.engine_core for a in _threads_affinity(core))
    assert "cpu placement: front end on cores" in server.log_path.read_text()

"""The whole loop, as a user runs it: `instructloop up`, then simulated users.

Real parts only: `instructloop up` as a subprocess (its embedded redis-server, the real
server on vLLM, the real learner training SFT -> RM -> PPO on the tiny model), and the
simulator talking to it through the public gRPC API and the Admin API. A short version
of the README's run: a few hundred comparisons and a couple of rounds.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from instructloop.clients import Client
from instructloop.clients.admin import AdminClient
from instructloop.loop.labelers import compare, correct_concise, shouting
from instructloop.loop.simulate import SimulateConfig, Simulation
from instructloop.loop.tasks import answer
from instructloop.redis_embedded import free_port

UP_TIMEOUT_S = 420
# Faster rounds than `up`'s defaults: a test has minutes, not twenty of them.
LEARN_ARGS = (
    "--min-comparisons 100 --max-wait-s 60 --ppo-iterations 4 "
    "--gate-prompts 16 --gate-samples-per-prompt 1"
)
GREEDY_PROMPTS = ["reverse: abc\n", "sort: d b a\n", "uppercase: the day\n"]


def test_labelers_rank_by_their_own_preference():
    prompt = "reverse: abc\n"
    assert answer(prompt) == "cba"
    ranking = correct_concise(prompt, ["xyzxyz cba", "cba", "cab", "cab"])
    assert ranking[0] == 1 and ranking[1] == (2, 3) and ranking[2] == 0
    assert compare(correct_concise, prompt, "cba", "CBA") == 1.0
    assert compare(shouting, prompt, "cba", "CBA") == 0.0  # the other preference
    assert compare(shouting, prompt, "AB", "CD") == 0.5  # a tie counts half
    assert shouting.demonstrate(prompt) == "CBA"


def _start_up(data: Path, port: int, metrics_port: int) -> tuple[subprocess.Popen, Path]:
    log_path = data.parent / f"up-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "instructloop.cli", "up", "--data-dir", str(data),
                "--port", str(port), "--metrics-port", str(metrics_port),
                "--learn-args", LEARN_ARGS,
            ],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + UP_TIMEOUT_S
    while "instructloop is up" not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_up(proc)
            pytest.fail(f"up did not come up:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.5)
    return proc, log_path


def _stop_up(proc: subprocess.Popen, sig: int = signal.SIGINT) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _greedy(client: Client) -> list[str]:
    return [
        client.generate(p, n=1, temperature=0, max_tokens=16, log=False).samples[0].text
        for p in GREEDY_PROMPTS
    ]


def _wait_version(client: Client, version: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.get_model().version != version:
        assert time.monotonic() < deadline, f"the server did not switch to {version}"
        time.sleep(0.5)


def test_up_simulate_promotes_hot_swaps_beats_v0_rollback_restores_and_up_resumes(tmp_path):
    data = tmp_path / "loop"
    port, metrics_port = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    proc, log_path = _start_up(data, port, metrics_port)
    try:
        with Client(target) as client:
            assert client.get_model().version == "v0"
            v0_greedy = _greedy(client)

            cfg = SimulateConfig(
                target=target, data_dir=str(data), users=30, rate=0, concurrency=4,
                max_comparisons=400, max_minutes=6, settle_s=90, eval_prompts=60,
                target_win_rate=0.6, poll_s=1.0, out=str(tmp_path / "sim"), live=False,
            )  # fmt: skip
            report = asyncio.run(Simulation(cfg).run())

            promoted = [v for v in report["versions"] if v["status"] == "promoted"]
            assert promoted, f"no version passed the gate: {report['versions']}"
            served = [s["version"] for s in report["served"]]
            assert served[0] == "v0" and len(served) > 1, f"never hot-swapped: {served}"
            best = report["best"]
            assert best is not None and best["labeler_win_rate"] > 0.5, report["versions"]
            assert best["id"] in {v["id"] for v in promoted}
            new_version = client.get_model().version
            assert new_version != "v0"

            with AdminClient(target, token=(data / "admin-token").read_text().strip()) as admin:
                # Freeze first: a round still running must not promote over the rollback.
                admin.freeze(reason="test: keep v0")
                admin.rollback("v0", reason="test: back to the base model")
                _wait_version(client, "v0")
                assert _greedy(client) == v0_greedy  # v0's outputs are back
    finally:
        code = _stop_up(proc)
    out = log_path.read_text()
    assert code == 0, out[-4000:]
    assert out.index("stopping the learner") < out.index("stopping the server"), out[-2000:]
    assert "learner stopped" in (data / "logs" / "learner.log").read_text()

    # A second `up` on the same data dir resumes: the versions, aliases and dataset are there.
    proc, _ = _start_up(data, port, metrics_port)
    try:
        with (
            Client(target) as client,
            AdminClient(target, token=(data / "admin-token").read_text().strip()) as admin,
        ):
            assert client.get_model().version == "v0"  # the rollback survived
            ids = {v.id for v in admin.list_versions().versions}
            assert {v["id"] for v in promoted} <= ids
            assert (data / "learner" / "dataset.sqlite3").exists()
    finally:
        assert _stop_up(proc, signal.SIGTERM) == 0

"""The whole loop, as a user runs it: `instructloop up`, then simulated users.

Real parts only: `instructloop up` as a subprocess (its embedded redis-server, the real
server on vLLM, the real learner training SFT -> RM -> PPO on the pretrained base), and
the simulator talking to it through the public gRPC API and the Admin API. A short
version of the README's runs: a few hundred comparisons and a couple of rounds, on the
default base (the shipped weights that `up` copies into its data dir).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import report_row

from instructloop.cli import main as instructloop_main
from instructloop.clients import Client
from instructloop.clients.admin import AdminClient
from instructloop.learner.config import RoundConfig
from instructloop.loop.labelers import (
    brief,
    compare,
    correct_concise,
    load_population,
    population_win_rate,
    shouting,
    vowels,
)
from instructloop.loop.simulate import SimulateConfig, Simulation
from instructloop.loop.tasks import answer
from instructloop.redis_embedded import free_port

UP_TIMEOUT_S = 420
# Faster rounds than `up`'s defaults: a test has minutes, not twenty of them. The gate
# keeps the learner's default threshold (asserted below).
LEARN_ARGS = "--min-comparisons 100 --max-wait-s 60 --ppo-iterations 8"
LABELERS = "instructloop.loop.labelers"
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
    assert compare(brief, prompt, "ab", "abcd") == 1.0 and compare(brief, prompt, "", "ab") == 0.0
    assert compare(vowels, prompt, "aei", "xyz") == 1.0 and compare(vowels, prompt, "", "z") == 0.0
    assert not hasattr(brief, "demonstrate") and not hasattr(vowels, "demonstrate")


def test_adversaries_rank_against_the_honest_labeler():
    import random

    from instructloop.loop import adversaries

    prompt, texts = "reverse: abc\n", ["cba", "xx", "cb", "cab"]
    honest = [t[0] if isinstance(t, tuple) else t for t in correct_concise(prompt, texts)]
    rng = random.Random(0)
    inverse = adversaries.rank("inverse", correct_concise, prompt, texts, ["v1"] * 4, "v1", rng)
    assert [t[0] for t in inverse] == honest[::-1]
    assert adversaries.demonstration("inverse", correct_concise, prompt, texts) == "xx"
    shuffled = adversaries.rank("random", correct_concise, prompt, texts, ["v1"] * 4, "v1", rng)
    assert sorted(shuffled) == [0, 1, 2, 3]
    versions = ["v1", "v2", "v1", "v2"]  # v2 is the canary of an arena response
    pushed = adversaries.rank("promote-canary", correct_concise, prompt, texts, versions, "v1", rng)
    assert set(pushed[:2]) == {1, 3} and pushed[2] == 0, pushed


def broken_labeler(prompt, samples):
    raise ZeroDivisionError("this labeler always fails")


def test_up_rotates_each_process_log_at_its_bound(tmp_path):
    """`up`'s children write through a pipe into a rotating file: a real child that
    prints 17 KB into a 4 KB bound with 2 backups leaves three files, none over the
    bound, holding the output's end in order (its start dropped); its last line is in
    the file once _stop has returned."""
    from instructloop.loop import up

    log = tmp_path / "server.log"
    proc = up._spawn(["serve", "--help"], log, max_bytes=4096, backups=2)
    assert proc.wait(timeout=120) == 0
    assert up._stop("server", proc) == 0
    files = [tmp_path / "server.log.2", tmp_path / "server.log.1", log]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files)
    assert all(0 < p.stat().st_size <= 4096 for p in files), [p.stat().st_size for p in files]
    text = subprocess.run(
        [sys.executable, "-m", "instructloop.cli", "serve", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    kept = "".join(p.read_text() for p in files)
    assert len(text) > 3 * 4096 and text.endswith(kept) and len(kept) > 2 * 4096


def test_simulate_counts_a_labeler_that_raises_and_stops_when_every_user_has_died(server, tmp_path):
    """A labeler's exception ends its user, is counted and shown, and once every user
    has died the run stops at once with exit code 1 instead of idling to --max-minutes."""
    t0 = time.monotonic()
    code = instructloop_main([
        "simulate", "--target", server.target, "--data-dir", str(server.log_path.parent),
        "--labeler", f"{__name__}:broken_labeler", "--users", "30", "--concurrency", "3",
        "--rate", "0", "--eval-prompts", "20", "--max-minutes", "5", "--no-live",
        "--out", str(tmp_path / "sim"),
    ])  # fmt: skip
    assert code == 1
    assert time.monotonic() - t0 < 120  # it did not wait for --max-minutes
    report = json.loads((tmp_path / "sim" / "report.json").read_text())
    assert report["dead_users"] == 3 and report["errors"] >= 3
    assert "every simulated user has died" in report["failed"]
    assert "ZeroDivisionError: this labeler always fails" in report["last_error"]
    assert report["comparisons"] == 0
    assert report["detection"]["honest"] == 30 and report["detection"]["adversaries"] == 0
    v0 = next(v for v in report["versions"] if v["id"] == "v0")
    assert v0["exact_match"] == 0.0 and v0["eval_n"] == 20  # measured before traffic


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


def _user_token(data: Path) -> str:
    """The local labeler's credential, which `up` writes on first start."""
    return (data / "user-token").read_text().strip()


def test_up_simulate_aligns_the_base_by_exact_match_rollback_restores_and_up_resumes(tmp_path):
    data = tmp_path / "loop"
    port, metrics_port = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    proc, log_path = _start_up(data, port, metrics_port)
    try:
        with Client(target, token=_user_token(data)) as client:
            assert client.get_model().version == "v0"
            v0_greedy = _greedy(client)

            cfg = SimulateConfig(
                target=target, data_dir=str(data), users=30, rate=0, concurrency=4,
                max_comparisons=400, max_minutes=9, settle_s=120, eval_prompts=200,
                target_win_rate=0, target_exact_match=0.5, poll_s=1.0,
                out=str(tmp_path / "sim"), live=False,
                labeler=f"{LABELERS}:correct_concise,{LABELERS}:correct_polite",
                heldout_labeler=f"{LABELERS}:shouting",
            )  # fmt: skip
            sim = Simulation(cfg)
            report = asyncio.run(sim.run())
            versions = {v["id"]: v for v in report["versions"]}

            # The base does not follow the task format: greedy exact-match <= 10%.
            base_em = versions["v0"]["exact_match"]
            assert base_em <= 0.1, versions["v0"]
            promoted = [v for v in versions.values() if v["status"] == "promoted"]
            assert promoted, f"no version passed the gate: {report['versions']}"
            # Every promotion passed the learner's default gate, not a lowered one.
            default = RoundConfig().win_rate_threshold
            assert all(v["gate_threshold"] == default for v in promoted), promoted
            assert all(v["gate_win_rate"] > default for v in promoted), promoted
            # A margin that noise cannot explain: the binomial standard error of a rate
            # on 200 prompts is at most 0.035, so 0.15 is more than 4 of them (and the
            # base's 0-10% leaves no room for luck on its side).
            best = max(promoted, key=lambda v: v["exact_match"])
            assert best["exact_match"] >= base_em + 0.15, report["versions"]
            # The round's SFT-only policy was published and measured against.
            assert any(v["status"] == "sft" for v in versions.values()), report["versions"]
            assert any(v["labeler_win_rate_vs_sft"] is not None for v in promoted), promoted
            served = [s["version"] for s in report["served"]]
            assert served[0] == "v0" and len(served) > 1, f"never hot-swapped: {served}"
            # The win rates are the populations' (prompt i to member i mod n), the
            # training one's (correct_concise, correct_polite) and the held-out one's.
            prompts, answers = report["eval"]["prompts"], report["eval"]["answers"]
            training = load_population(cfg.labeler)
            for v in promoted:
                a, v0 = answers[v["id"]]["sampled"], answers["v0"]["sampled"]
                assert v["labeler_win_rate"] == population_win_rate(training, prompts, a, v0)
                assert v["labeler_win_rate_heldout"] == population_win_rate(
                    [shouting], prompts, a, v0
                )
            assert any(v["labeler_win_rate_vs_sft_heldout"] is not None for v in promoted)
            # The alignment tax: every measured version's corpus loss, against v0's.
            v0_loss = versions["v0"]["corpus_loss"]
            assert v0_loss < 1.5 and versions["v0"]["corpus_tax"] == 0.0, versions["v0"]
            for v in promoted:
                assert v["corpus_tax"] == pytest.approx(v["corpus_loss"] - v0_loss), v
            for v in report["versions"]:
                report_row(
                    "simulate: every version's measures (training | held-out labelers)",
                    v["id"], v["status"], f"exact {v['exact_match']}",
                    f"win vs v0 {v['labeler_win_rate']} | {v['labeler_win_rate_heldout']}",
                    f"vs SFT {v['labeler_win_rate_vs_sft']} | "
                    f"{v['labeler_win_rate_vs_sft_heldout']}",
                    f"corpus loss {v['corpus_loss']} (tax {v['corpus_tax']})",
                )  # fmt: skip

            with AdminClient(target, token=(data / "admin-token").read_text().strip()) as admin:
                # Freeze first: a round still running must not promote over the checks.
                admin.freeze(reason="test: hold the served version")
                time.sleep(2)  # a promotion in flight has reached the server
                current = client.get_model().version
                assert current != "v0"
                if current not in sim.answers:
                    sim._refresh_versions(admin)
                    sim._evaluate(current)
                # The measures decode what the server serves: the checkpoint's greedy
                # answers (transformers) are the server's (vLLM).
                prompts = sim.eval_prompts[:40]
                served_greedy = [
                    client.generate(p, n=1, temperature=0, max_tokens=16, log=False)
                    .samples[0].text.strip()
                    for p in prompts
                ]  # fmt: skip
                same = sum(
                    a == b.strip()
                    for a, b in zip(served_greedy, sim.answers[current].greedy, strict=False)
                )
                assert same >= 0.9 * len(prompts), (served_greedy, sim.answers[current].greedy)

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
            Client(target, token=_user_token(data)) as client,
            AdminClient(target, token=(data / "admin-token").read_text().strip()) as admin,
        ):
            assert client.get_model().version == "v0"  # the rollback survived
            ids = {v.id for v in admin.list_versions().versions}
            assert {v["id"] for v in promoted} <= ids
            assert (data / "learner" / "dataset.sqlite3").exists()
    finally:
        assert _stop_up(proc, signal.SIGTERM) == 0

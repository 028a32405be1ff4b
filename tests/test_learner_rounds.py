"""Learner rounds end to end: real redis-server, real registry and store, real training.

Records are XADDed as the server logs them; the learner consumes them, runs SFT? -> RM ->
PPO -> gate, publishes a version and (if the gate passed and nothing is frozen) promotes
it. Training is a few steps on the tiny local model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from conftest import saved_dtypes

from instructloop.keys import DATA_FIELD, Keys
from instructloop.learner import rounds, synthetic
from instructloop.learner.config import (
    LearnerConfig,
    PPOConfig,
    RewardConfig,
    RoundConfig,
    SFTStepConfig,
)
from instructloop.learner.consumer import ConsumerConfig
from instructloop.learner.dataset import Dataset, DatasetConfig, user_split
from instructloop.learner.device import resolve_device
from instructloop.learner.main import Configs, run
from instructloop.redis_embedded import EmbeddedRedis, free_port
from instructloop.registry import Registry
from instructloop.secretfile import load_secret
from instructloop.store import ModelStore
from instructloop.users import UserStore
from instructloop.v1 import admin_pb2

HELDOUT = 0.25
PERMISSIVE = dict(win_rate_threshold=-1.0, max_kl=1e9)


# 2 shared cores: one torch thread is several times faster than two under load.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = EmbeddedRedis(tmp_path_factory.mktemp("rounds-redis"), port=free_port()).start()
    yield server
    server.stop()


# ---------------------------------------------------------------------------- helpers


def registry_call(url: str, prefix: str, fn):
    """Run `await fn(registry)` on a fresh redis.asyncio client (as another process would)."""

    async def go():
        client = aioredis.Redis.from_url(url)
        try:
            return await fn(Registry(client, Keys(prefix)))
        finally:
            await client.aclose()

    return asyncio.run(go())


def register_base(url: str, prefix: str, model_dir: Path) -> None:
    """What the server does on start: v0 = the model it serves, `current` -> v0."""
    info = admin_pb2.VersionInfo(id="v0", kind="base", path=str(model_dir))
    info.base_model = str(model_dir)
    registry_call(url, prefix, lambda reg: reg.ensure_base(info))


def xadd(client, keys: Keys, pairs) -> set[str]:
    """Log (prompt, feedback) records like the server; returns the feedback ids."""
    for prompt, feedback in pairs:
        client.xadd(keys.prompts_stream, {DATA_FIELD: prompt.SerializeToString()})
        client.xadd(keys.feedback_stream, {DATA_FIELD: feedback.SerializeToString()})
    return {f.feedback_id for _, f in pairs}


def split_salt(tmp: Path) -> bytes:
    """The deployment's split key as the learner reads it: tmp/split-salt, beside its data
    dir (created here if the learner has not run yet; the learner then reads this one)."""
    return load_secret(tmp / "split-salt", "split salt")


def train_ids(pairs, tmp: Path) -> set[str]:
    salt = split_salt(tmp)
    return {
        f.feedback_id for _, f in pairs if user_split(f.feedback.user_id, HELDOUT, salt) == "train"
    }


def configs(tmp: Path, url: str, prefix: str, kind: str = "full", **gate) -> Configs:
    return Configs(
        learner=LearnerConfig(
            redis_url=url, redis_prefix=prefix, model_store=str(tmp / "store"),
            data_dir=str(tmp / "learner"), heldout_fraction=HELDOUT, max_rounds=1,
        ),
        consumer=ConsumerConfig(consumer="test", block_ms=50),
        round=RoundConfig(
            min_comparisons=20, kind=kind, gate_prompts=8, gate_samples_per_prompt=1, **gate
        ),
        sft=SFTStepConfig(min_demonstrations=4, max_steps=3, batch_size=4, learning_rate=1e-3),
        rm=RewardConfig(learning_rate=1e-3, batch_prompts=8, max_length=64),
        ppo=PPOConfig(
            iterations=2, rollout_prompts=8, minibatch_size=8, ppo_epochs=1,
            max_new_tokens=8, max_prompt_length=32, learning_rate=1e-4,
        ),
    )  # fmt: skip


def audit(url: str, prefix: str):
    return registry_call(url, prefix, lambda reg: reg.audit_log())


# ---------------------------------------------------------------------------- rounds


def test_rounds_publish_and_promote_only_through_the_gate_and_never_while_frozen(
    tiny_model, redis_server, tmp_path
):
    url, prefix = redis_server.url, "rounds"
    r, keys = redis_server.client(), Keys(prefix)
    register_base(url, prefix, tiny_model)
    store = ModelStore(tmp_path / "store")
    current = lambda: registry_call(url, prefix, lambda reg: reg.alias("current"))  # noqa: E731

    # ---- round 1, permissive gate: published, verified, promoted by the learner
    data1 = synthetic.preference_data(40, k=4, n_users=20, seed=10)
    xadd(r, keys, data1)
    assert run(configs(tmp_path, url, prefix, **PERMISSIVE)) == 0
    [m1] = store.list()
    assert m1.id == "v1" and store.verify("v1").checksum == m1.checksum
    assert m1.kind == "full" and m1.parent == "v0" and m1.base_model == "v0"
    # Held-out users never train.
    assert sorted(m1.feedback_ids) == sorted(train_ids(data1, tmp_path))
    assert m1.gate["passed"] is True and m1.gate["win_rate_threshold"] == -1.0
    for key in ("rm_heldout_accuracy", "win_rate", "kl", "reward", "ppo_score_last"):
        assert key in m1.metrics
    assert 0.0 <= m1.metrics["win_rate"] <= 1.0 and m1.metrics["rm_heldout_pairs"] > 0
    assert current() == "v1"
    promote = [a for a in audit(url, prefix) if a.action == "auto-promote"]
    assert [(a.actor, a.from_version, a.to_version) for a in promote] == [("learner", "v0", "v1")]
    info = registry_call(url, prefix, lambda reg: reg.get("v1"))
    assert info.gate.passed and info.feedback_count == len(m1.feedback_ids)
    # What the server loads: float32 tensors and config, whatever device trained them
    # ('auto' here: the GPU where there is one); the version records that device.
    ppo_record = json.loads((store.path("v1") / "instructloop_ppo.json").read_text())
    assert ppo_record["metrics"]["device"] == str(resolve_device("auto"))
    assert saved_dtypes(store.path("v1")) == ({"F32"}, "float32")

    # A crash after publishing but before the learner saved its state: the restarted
    # learner adopts v1 as round 1 instead of training and publishing it a second time.
    (tmp_path / "learner" / "state.json").unlink()
    assert run(configs(tmp_path, url, prefix, **PERMISSIVE)) == 0
    assert [m.id for m in store.list()] == ["v1"]
    state = json.loads((tmp_path / "learner" / "state.json").read_text())
    assert state["round"] == 1 and state["last_version"] == "v1" and state["rm_dir"]

    # A crash between the store write and the registry write: v1 is in the store only,
    # and `current` never moved. The restart registers it and promotes it, once.
    (tmp_path / "learner" / "state.json").unlink()
    r.hdel(keys.versions, "v1")
    r.hset(keys.aliases, "current", "v0")
    assert run(configs(tmp_path, url, prefix, **PERMISSIVE)) == 0
    assert [m.id for m in store.list()] == ["v1"] and current() == "v1"
    assert registry_call(url, prefix, lambda reg: reg.get("v1")).checksum == m1.checksum
    registered = [a.to_version for a in audit(url, prefix) if a.action == "register"]
    assert registered.count("v1") == 2  # first publish, then the restart's repair

    # ---- round 2, impossible gate: registered as rejected, `current` stays; trained on
    # the new comparisons only (warm-started RM, one epoch over what is new)
    data2 = synthetic.preference_data(40, k=4, n_users=20, seed=11)
    xadd(r, keys, data2)
    assert run(configs(tmp_path, url, prefix, win_rate_threshold=1.0, max_kl=1e9)) == 0
    m2 = store.verify("v2")
    assert m2.gate["passed"] is False and "win rate" in m2.gate["reason"]
    assert m2.parent == "v1"  # PPO started from the serving version
    # The round's RM is retrained on every training comparison so far (the default).
    assert sorted(m2.feedback_ids) == sorted(
        train_ids(data1, tmp_path) | train_ids(data2, tmp_path)
    )
    info = registry_call(url, prefix, lambda reg: reg.get("v2"))
    assert not info.gate.passed and info.gate.measures["win_rate"] == m2.gate["win_rate"]
    assert current() == "v1"

    # ---- round 3 while an operator froze promotion: passes the gate, is not promoted
    registry_call(url, prefix, lambda reg: reg.freeze("operator", "investigating"))
    xadd(r, keys, synthetic.preference_data(40, k=4, n_users=20, seed=12))
    assert run(configs(tmp_path, url, prefix, **PERMISSIVE)) == 0
    m3 = store.verify("v3")
    assert m3.gate["passed"] is True
    assert current() == "v1"
    assert not [a for a in audit(url, prefix) if a.to_version == "v3" and a.action != "register"]
    assert [m.id for m in store.list()] == ["v1", "v2", "v3"]
    state = json.loads((tmp_path / "learner" / "state.json").read_text())
    assert state["round"] == 3 and state["last_version"] == "v3"


@pytest.mark.parametrize("fault", ["unloadable serving version", "store full"])
def test_a_failing_round_backs_off_and_is_recorded_instead_of_crashing(
    fault, tiny_model, redis_server, tmp_path
):
    url, prefix = redis_server.url, f"failing-{fault[:5]}"
    r, keys = redis_server.client(), Keys(prefix)
    cfgs = configs(tmp_path, url, prefix, **PERMISSIVE)
    if fault == "store full":
        register_base(url, prefix, tiny_model)
        cfgs.learner.store_max_gib = 1e-4  # 100 KiB: no checkpoint fits
    else:
        broken = tmp_path / "not-a-model"
        broken.mkdir()
        register_base(url, prefix, broken)
    xadd(r, keys, synthetic.preference_data(30, k=4, n_users=20, seed=3))
    cfgs.learner.round_retry_s = 0.2
    dead = tmp_path / "learner" / "failed-rounds.jsonl"
    stop = threading.Event()

    def stop_after_three_failures():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not stop.is_set():
            if dead.exists() and len(dead.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        stop.set()

    watcher = threading.Thread(target=stop_after_three_failures)
    watcher.start()
    assert run(cfgs, stop) == 0  # the process lives on
    watcher.join()
    records = [json.loads(line) for line in dead.read_text().splitlines()]
    assert [x["attempt"] for x in records[:3]] == [1, 2, 3]
    assert [x["retry_in_s"] for x in records[:3]] == [0.2, 0.4, 0.8]
    assert all(x["round"] == 1 and x["error"] for x in records)
    if fault == "store full":
        assert "StoreFull" in records[0]["error"] and "bound of" in records[0]["error"]
    gaps = [b["at"] - a["at"] for a, b in zip(records, records[1:3], strict=False)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4
    assert ModelStore(tmp_path / "store").list() == []
    # The serving version stays: nothing was registered or promoted.
    assert registry_call(url, prefix, lambda reg: reg.alias("current")) == "v0"
    assert [v.id for v in registry_call(url, prefix, lambda reg: reg.list())] == ["v0"]
    assert r.xpending(keys.feedback_stream, "learner")["pending"] == 0  # consumed meanwhile


def test_learn_resolves_the_device_once_and_refuses_an_unknown_one(capsys):
    from instructloop.cli import main

    cfgs = Configs(
        learner=LearnerConfig(device="auto"), consumer=ConsumerConfig(), round=RoundConfig(),
        sft=SFTStepConfig(), rm=RewardConfig(), ppo=PPOConfig(),
    )  # fmt: skip
    assert cfgs.learner.device in ("cpu", "cuda")  # the trainers never see 'auto'
    # Refused before anything is consumed or trained, with a message a person can act on.
    assert main(["learn", "--device", "gpu0"]) == 2
    assert "--device 'gpu0'" in capsys.readouterr().err


def test_sft_runs_on_demonstrations_and_becomes_the_reference_lora(
    tiny_model, redis_server, tmp_path
):
    url, prefix = redis_server.url, "sft"
    r, keys = redis_server.client(), Keys(prefix)
    register_base(url, prefix, tiny_model)
    # A fixed split key: with a random one, now and then no held-out user has a prompt,
    # the gate has nothing to evaluate and the adapter is not promoted.
    (tmp_path / "split-salt").write_text("5eed" * 16 + "\n")
    data = synthetic.preference_data(24, k=4, n_users=20, seed=20)
    demos = [
        (p, synthetic.demonstration_record(f"demo{i}", p, " good good answer", p.user_id))
        for i, (p, _) in enumerate(data[:12])
    ]
    xadd(r, keys, data + demos)
    train_demos = train_ids(demos, tmp_path)
    assert len(train_demos) >= 4  # enough for SFT (min_demonstrations=4)

    assert run(configs(tmp_path, url, prefix, kind="lora", **PERMISSIVE)) == 0
    store = ModelStore(tmp_path / "store")
    # The SFT weights are a version of their own (never promoted), the adapter sits on them.
    sft, adapter = store.verify("v1"), store.verify("v2")
    assert sft.kind == "full" and sft.gate["passed"] is False
    assert sorted(sft.feedback_ids) == sorted(train_demos)
    assert adapter.kind == "lora" and adapter.base_model == "v1" and adapter.parent == "v0"
    assert set(adapter.feedback_ids) == train_ids(data, tmp_path) | train_demos
    assert adapter.gate["reference"] == "sft" and adapter.metrics["sft_demonstrations"] > 0
    assert not (store.path("v2") / "model.safetensors").exists()
    assert adapter.gate["passed"] is True, adapter.gate
    assert registry_call(url, prefix, lambda reg: reg.alias("current")) == "v2"

    # SFT changed the weights, and PPO's KL was measured against them: the adapter starts
    # at zero, so at the first rollout the policy IS the reference and KL is 0. Against
    # the base model it would not be.
    base_bytes = (tiny_model / "model.safetensors").read_bytes()
    assert (store.path("v1") / "model.safetensors").read_bytes() != base_bytes
    ppo = json.loads((store.path("v2") / "instructloop_ppo.json").read_text())
    assert ppo["metrics"]["history"][0]["kl"] == pytest.approx(0.0, abs=1e-4)
    state = json.loads((tmp_path / "learner" / "state.json").read_text())
    assert state["sft_dir"].endswith("r1/sft") and Path(state["sft_dir"]).is_dir()

    # The next LoRA round (no new demonstrations: no SFT) continues the serving adapter
    # over the same SFT weights, still against the SFT reference.
    xadd(r, keys, synthetic.preference_data(24, k=4, n_users=20, seed=21))
    assert run(configs(tmp_path, url, prefix, kind="lora", **PERMISSIVE)) == 0
    nxt = store.verify("v3")
    assert (nxt.kind, nxt.base_model, nxt.parent) == ("lora", "v1", "v2")
    assert nxt.gate["reference"] == "sft" and nxt.metrics["sft_demonstrations"] == 0
    assert registry_call(url, prefix, lambda reg: reg.alias("current")) == "v3"


def users_call(url: str, prefix: str, fn):
    """Run `await fn(user_store)` on a fresh redis.asyncio client (as the Admin API would)."""

    async def go():
        client = aioredis.Redis.from_url(url)
        try:
            return await fn(UserStore(client, Keys(prefix)))
        finally:
            await client.aclose()

    return asyncio.run(go())


def shared_rankings(users: dict[str, bool], n: int, seed: int):
    """n prompts that every one of `users` ranks (same prompt_id, same samples): the marker
    word first, or (False) inverted."""
    out = []
    for rec, fb in synthetic.preference_data(n, k=4, n_users=1, seed=seed):
        rec.user_id = next(iter(users))
        index = {s.sample_id: s.index for s in rec.samples}
        good, bad = ([index[s] for s in t.sample_ids] for t in fb.feedback.ranking.tiers)
        for user, honest in users.items():
            tiers = [good, bad] if honest else [bad, good]
            fid = f"{user}-{rec.prompt_id}"
            out.append((rec, synthetic.ranking_record(fid, rec, tiers, user)))
    return out


def test_a_round_leaves_out_suspended_and_flagged_users_and_writes_every_users_quality(
    tiny_model, redis_server, tmp_path, caplog, monkeypatch
):
    caplog.set_level(logging.DEBUG)
    url, prefix = redis_server.url, "quality"
    r, keys = redis_server.client(), Keys(prefix)
    register_base(url, prefix, tiny_model)
    (tmp_path / "split-salt").write_text("5eed" * 16 + "\n")  # the deployment's secret
    salt = split_salt(tmp_path)
    # 20 users rank one prompt each; four more rank 12 prompts all four of them: three
    # put the marker word first like everyone, dave inverts every ranking.
    data = synthetic.preference_data(40, k=4, n_users=20, seed=60)
    shared = shared_rankings({"alice": True, "bob": True, "carol": True, "dave": False}, 12, 61)
    users = sorted({f.feedback.user_id for _, f in data + shared})
    split = {u: user_split(u, HELDOUT, salt) for u in users}
    assert split["dave"] == "train"  # under this salt: leaving him out shows in what trains
    judged = {f.feedback.user_id for _, f in data}
    suspended = [min(u for u in judged if split[u] == s) for s in ("train", "heldout")]
    unknown = max(judged - set(suspended))  # judged under an id no admin added
    for user in set(users) - {unknown}:
        users_call(url, prefix, lambda us, u=user: us.add(u, "labeler", "test"))
    for user in suspended:
        users_call(url, prefix, lambda us, u=user: us.suspend(u, True, "test"))
    left_out = sorted([*suspended, "dave"])
    xadd(r, keys, data + shared)
    gate_prompts = []

    def spy_gate(*args):
        gate_prompts.append(list(args[6]))
        return real_gate(*args)

    real_gate = rounds.evaluate_gate
    monkeypatch.setattr(rounds, "evaluate_gate", spy_gate)

    # ---- round 1: no RM yet, so the flag comes from peer agreement on the shared prompts
    assert run(configs(tmp_path, url, prefix, **PERMISSIVE)) == 0
    store = ModelStore(tmp_path / "store")
    [m1] = store.list()
    everyone = data + shared
    kept = [(p, f) for p, f in everyone if f.feedback.user_id not in left_out]
    assert set(m1.feedback_ids) == train_ids(kept, tmp_path)  # nothing of theirs trained
    theirs = [f for _, f in everyone if f.feedback.user_id in left_out]
    assert not {f.feedback_id for f in theirs} & set(m1.feedback_ids)
    assert (m1.excluded_users, m1.excluded_feedback) == (left_out, len(theirs))
    info = registry_call(url, prefix, lambda reg: reg.get("v1"))  # what GetVersion shows
    assert list(info.excluded_users) == left_out and info.excluded_feedback == len(theirs)
    assert info.metrics["excluded_users"] == 3 and info.metrics["users_flagged"] == 1
    assert info.metrics["excluded_feedback"] == len(theirs)
    their_prompts = {p.prompt for p, f in everyone if f.feedback.user_id in suspended}
    assert gate_prompts[0] and not set(gate_prompts[0]) & their_prompts

    listed = {u.user_id: u for u in users_call(url, prefix, lambda us: us.list())}
    alice, dave = listed["alice"].quality, listed["dave"].quality
    # alice's pairs: ordered the same way by bob and carol, the other way by dave; dave is
    # flagged, so the second pass no longer takes his word about her: bob and carol only.
    assert (alice.comparisons, alice.peer_pairs) == (12, 12 * 4 * 2)
    assert alice.peer_agreement == pytest.approx(1.0) and not alice.flagged
    assert dave.flagged and "inverted" in dave.flag_reason and dave.peer_agreement == 0
    assert listed[suspended[0]].suspended and listed[suspended[0]].quality.comparisons >= 1
    assert unknown not in listed and not r.hexists(keys.user_quality, unknown)  # bounded
    assert all(u.quality.round == 1 and u.quality.rm_pairs == 0 for u in listed.values())
    agreement, pairs = users_call(url, prefix, lambda us: us.labeler_agreement())
    assert pairs == 12 * 4 * 6 and agreement == pytest.approx(0.5)  # 6 user pairs, 3 agree

    # ---- round 2, flags only reported: dave trains; the round-1 RM, before it is
    # replaced, scores what it never trained on (the new comparisons, held-out users')
    more = synthetic.preference_data(40, k=4, n_users=20, seed=62)
    xadd(r, keys, more)
    cfgs = configs(tmp_path, url, prefix, **PERMISSIVE)
    cfgs.round.exclude_flagged = False
    assert run(cfgs) == 0
    m2 = store.verify("v2")
    assert (m2.excluded_users, m2.metrics["users_flagged"]) == (sorted(suspended), 1)
    kept = [(p, f) for p, f in everyone + more if f.feedback.user_id not in suspended]
    assert set(m2.feedback_ids) == train_ids(kept, tmp_path)
    listed = {u.user_id: u for u in users_call(url, prefix, lambda us: us.list())}
    heldout_judges = [u for u in judged if split[u] == "heldout"]
    assert all(listed[u].quality.rm_pairs > 0 for u in heldout_judges)
    assert listed["dave"].quality.flagged and listed["alice"].quality.round == 2
    state = json.loads((tmp_path / "learner" / "state.json").read_text())
    assert state["rm_scored_seq"] == m2.metrics["feedback_seq"] and state["rm_evidence"]
    assert len(gate_prompts) == 2

    # The split's secret never reached a log line.
    assert caplog.text and "5eed5eed" not in caplog.text and salt.decode() not in caplog.text


# ---------------------------------------------------------------------------- SIGKILL


LEASE_TTL_S = 5  # the default (30 s) would make each restart after a SIGKILL wait 30 s


def learner_cmd(url: str, prefix: str, tmp: Path, ppo_iterations: int) -> list[str]:
    return [
        sys.executable, "-m", "instructloop.cli", "learn",
        "--redis-url", url, "--redis-prefix", prefix,
        "--model-store", str(tmp / "store"), "--data-dir", str(tmp / "learner"),
        "--consumer", "doomed", "--block-ms", "50", "--torch-threads", "1",
        # A SIGKILLed learner's lease expires after its TTL, which the restart waits out.
        "--lease-ttl-s", str(LEASE_TTL_S),
        "--heldout-fraction", str(HELDOUT), "--max-rounds", "1", "--min-comparisons", "20",
        "--win-rate-threshold", "-1", "--max-kl", "1e9",
        "--gate-prompts", "8", "--gate-samples-per-prompt", "1",
        "--rm-learning-rate", "1e-3", "--rm-max-length", "64",
        "--ppo-iterations", str(ppo_iterations), "--ppo-rollout-prompts", "8",
        "--ppo-minibatch-size", "8", "--ppo-ppo-epochs", "1",
        "--ppo-max-new-tokens", "8", "--ppo-max-prompt-length", "32",
    ]  # fmt: skip


def start_learner(cmd: list[str], log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def run_to_the_end(cmd: list[str], log_path: Path) -> None:
    """Run a learner until it exits (--max-rounds); it must exit 0."""
    proc = start_learner(cmd, log_path)
    try:
        assert proc.wait(timeout=180) == 0, log_path.read_text()[-3000:]
    finally:
        proc.kill()
        proc.wait()


def wait_for_log(proc: subprocess.Popen, log_path: Path, text: str, count: int) -> None:
    """Until `text` occurs `count` times in the log (the process must stay alive)."""
    deadline = time.monotonic() + 120
    while log_path.read_text(errors="replace").count(text) < count:
        assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-3000:]
        time.sleep(0.1)


def test_sigterm_and_sigkill_mid_round_lose_nothing_count_nothing_twice_publish_nothing_partial(
    tiny_model, redis_server, tmp_path
):
    url, prefix = redis_server.url, "kill"
    r, keys = redis_server.client(), Keys(prefix)
    register_base(url, prefix, tiny_model)
    first = synthetic.preference_data(30, k=4, n_users=20, seed=30)
    sent = xadd(r, keys, first)
    xadd(r, keys, first[:3])  # logged twice (a retry): must be stored once
    log_path = tmp_path / "learner.log"
    long_round = learner_cmd(url, prefix, tmp_path, ppo_iterations=500)
    store = ModelStore(tmp_path / "store")

    def nothing_published() -> None:
        assert store.list() == []
        visible = [p.name for p in store.root.iterdir()] if store.root.exists() else []
        assert all(name.startswith(".") for name in visible), visible
        assert [v.id for v in registry_call(url, prefix, lambda reg: reg.list())] == ["v0"]

    # ---- SIGTERM mid-PPO: the round is abandoned at the next iteration, exit 0
    proc = start_learner(long_round, log_path)
    try:
        wait_for_log(proc, log_path, "ppo it 1/", 1)
        second = synthetic.preference_data(30, k=4, n_users=20, seed=31)
        sent |= xadd(r, keys, second)  # arrives while the learner is busy training
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()
    assert "abandoned during ppo" in log_path.read_text()
    nothing_published()

    # ---- SIGKILL mid-PPO (after it consumed the second batch)
    proc = start_learner(long_round, log_path)
    try:
        wait_for_log(proc, log_path, "ppo it 1/", 2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    nothing_published()
    ds = Dataset(DatasetConfig(path=str(tmp_path / "learner" / "dataset.sqlite3")))
    assert sorted(ds.feedback_ids()) == sorted(sent)

    # ---- restart: the round is redone on everything, nothing lost, nothing twice
    run_to_the_end(learner_cmd(url, prefix, tmp_path, ppo_iterations=2), log_path)
    ids = ds.feedback_ids()
    assert len(ids) == len(set(ids)) == len(sent) == 60 and set(ids) == sent
    assert ds.counts()["prompts"] == 60
    for stream in keys.prompts_stream, keys.feedback_stream:
        assert r.xpending(stream, "learner")["pending"] == 0
    [m] = store.list()
    assert store.verify(m.id).id == "v1"
    assert len(m.feedback_ids) == len(set(m.feedback_ids))
    assert set(m.feedback_ids) == train_ids(first + second, tmp_path)
    assert registry_call(url, prefix, lambda reg: reg.alias("current")) == "v1"


# Runs `instructloop learn` with one function replaced by: write a marker, then hang; the
# test SIGKILLs it there. argv: marker, "module:attr", then the learn command's arguments.
HANG_AT = textwrap.dedent(
    """
    import importlib, pathlib, sys, time
    marker, target = pathlib.Path(sys.argv[1]), sys.argv[2]
    module_name, attr = target.split(":")
    owner = importlib.import_module(module_name)
    for part in attr.split(".")[:-1]:
        owner = getattr(owner, part)

    def hang(*args, **kwargs):
        marker.write_text(target)
        time.sleep(600)

    setattr(owner, attr.split(".")[-1], hang)
    from instructloop.cli import main
    sys.exit(main(sys.argv[3:]))
    """
)

# Every step of a round, in order, and between its writes: the store, the registry, the
# promotion and the learner's own state.
KILL_POINTS = [
    "instructloop.learner.rounds:Learner.resolve_serving",  # before anything
    "instructloop.learner.rounds:train_reward_model",
    "instructloop.learner.rounds:train_policy",  # PPO, or the --algorithm chosen
    "instructloop.learner.rounds:evaluate_gate",
    "instructloop.store:_copy_hash_fsync",  # mid store write
    "instructloop.registry:Registry.register",  # stored, not registered
    "instructloop.registry:Registry.promote",  # registered, not promoted
    "instructloop.learner.rounds:RoundState.save",  # promoted, state not saved
]


def test_sigkill_at_every_step_of_a_round_then_one_version_published_once(
    tiny_model, redis_server, tmp_path
):
    url, prefix = redis_server.url, "killsteps"
    r, keys = redis_server.client(), Keys(prefix)
    register_base(url, prefix, tiny_model)
    sent = xadd(r, keys, synthetic.preference_data(30, k=4, n_users=20, seed=40))
    learn = learner_cmd(url, prefix, tmp_path, ppo_iterations=2)[3:]  # after "-m ... cli"
    store = ModelStore(tmp_path / "store")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for i, point in enumerate(KILL_POINTS):
        marker, log_path = tmp_path / f"reached-{i}", tmp_path / f"learner-{i}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-c", HANG_AT, str(marker), point, *learn],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
        try:
            deadline = time.monotonic() + 180
            while not marker.exists():
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        # Never more than one version of the round, and nothing registered that is not
        # in the store (an id allocated by a killed publish is not reused).
        stored = [m.id for m in store.list()]
        versions = {v.id for v in registry_call(url, prefix, lambda reg: reg.list())}
        assert len(stored) <= 1 and versions <= {"v0", *stored}, point

    # The restart completes the round, once, with no crash loop.
    log_path = tmp_path / "learner-last.log"
    run_to_the_end(learner_cmd(url, prefix, tmp_path, ppo_iterations=2), log_path)
    [m] = store.list()
    assert store.verify(m.id)
    assert sorted(v.id for v in registry_call(url, prefix, lambda reg: reg.list())) == ["v0", m.id]
    assert registry_call(url, prefix, lambda reg: reg.alias("current")) == m.id
    registered = [a.to_version for a in audit(url, prefix) if a.action == "register"]
    assert registered.count(m.id) == 1
    promoted = [a.to_version for a in audit(url, prefix) if "promote" in a.action]
    assert promoted == [m.id]
    ds = Dataset(DatasetConfig(path=str(tmp_path / "learner" / "dataset.sqlite3")))
    assert sorted(ds.feedback_ids()) == sorted(sent)
    state = json.loads((tmp_path / "learner" / "state.json").read_text())
    assert state["round"] == 1 and state["last_version"] == m.id

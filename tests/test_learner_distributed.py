"""The learner under torchrun: 2 ranks on gloo (CPU), real processes, the tiny model.

- Two ranks take the same reward-model steps, the same PPO update (with PPO-ptx) and the
  same SFT step as one process on the same global batches, although their shards hold
  unequal numbers of prompts and of valid tokens (tests/ddp_step.py): the losses are means
  over the GLOBAL batch.
- `instructloop learn` under torchrun: rank 0 alone consumes the streams and publishes;
  rank 1 trains (SFT, RM, PPO with a LoRA adapter) on rank 0's orders and exits when
  rank 0 is done; a SIGTERM mid-PPO stops both ranks at the same iteration.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_learner_rounds import audit, register_base, xadd

from instructloop.keys import Keys
from instructloop.learner import synthetic
from instructloop.redis_embedded import free_port
from instructloop.store import ModelStore

STEP_SCRIPT = Path(__file__).with_name("ddp_step.py")


def torchrun(nproc: int, *args: str) -> list[str]:
    """A torchrun command line for `nproc` local ranks on a free loopback port."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args,
    ]  # fmt: skip


def run_checked(cmd: list[str], timeout: float) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stderr


def test_two_ranks_take_the_same_rm_ppo_and_sft_steps_as_one_process_on_the_global_batch(
    tiny_model, tmp_path
):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    run_checked([sys.executable, str(STEP_SCRIPT), str(tiny_model), str(one)], 300)
    run_checked(torchrun(2, str(STEP_SCRIPT), str(tiny_model), str(two)), 300)
    a, b = torch.load(one), torch.load(two)
    assert (a["world"], b["world"]) == (1, 2)
    # The shards are unequal: a per-rank mean would weigh them wrongly.
    assert b["rm_prompts_per_rank"] == [2.0, 1.0]
    tokens = b["ppo_tokens_per_rank"]
    assert tokens[0] > 3 * tokens[1], tokens
    mismatched = []
    compared = [
        "rm_grads", "rm_weights", "rm_small_batch_grads", "policy_grads", "policy_weights",
        "value_grads", "value_weights", "sft_updates",
    ]  # fmt: skip
    for key in compared:
        one_proc, two_ranks = a[key], b[key]
        assert one_proc.keys() == two_ranks.keys() and one_proc
        for name, x in one_proc.items():
            assert x.abs().max() > 0, f"{key} {name}: nothing to compare"
            if not torch.allclose(two_ranks[name], x, rtol=1e-4, atol=1e-6):
                diff = (two_ranks[name] - x).abs().max().item()
                mismatched.append(f"{key} {name}: {diff:.2e}")
    assert not mismatched, "\n".join(mismatched)
    assert b["rm_loss"] == pytest.approx(a["rm_loss"], rel=1e-5)
    for key in ("vf_loss", "ptx_loss", "pg_loss"):
        assert b["ppo_stats"][key] == pytest.approx(a["ppo_stats"][key], rel=1e-4, abs=1e-6)


def test_under_torchrun_rank_0_alone_consumes_and_publishes(tiny_model, redis_server, tmp_path):
    url, prefix = redis_server.url, "ddp-learn"
    r, keys = redis_server.client(), Keys(prefix)
    register_base(url, prefix, tiny_model)
    data = synthetic.preference_data(24, k=4, n_users=12, seed=30)
    demos = [
        (p, synthetic.demonstration_record(f"demo{i}", p, " good good answer", p.user_id))
        for i, (p, _) in enumerate(data[:12])
    ]
    xadd(r, keys, data + demos)
    learn = [
        "-m", "instructloop.cli", "learn", "--redis-url", url, "--redis-prefix", prefix,
        "--model-store", str(tmp_path / "store"), "--data-dir", str(tmp_path / "learner"),
        "--heldout-fraction", "0.25", "--max-rounds", "1", "--device", "cpu", "--kind", "lora",
        "--torch-threads", "1", "--consumer", "rank0", "--block-ms", "50",
        "--min-comparisons", "10", "--gate-prompts", "4", "--gate-samples-per-prompt", "1",
        "--win-rate-threshold", "-1", "--max-kl", "1e9",
        "--sft-min-demonstrations", "2", "--sft-max-steps", "2", "--sft-batch-size", "2",
        "--rm-batch-prompts", "5", "--rm-max-length", "64",
        "--ppo-rollout-prompts", "4", "--ppo-minibatch-size", "4",
        "--ppo-ppo-epochs", "1", "--ppo-max-new-tokens", "8", "--ppo-max-prompt-length", "32",
    ]  # fmt: skip

    # ---- SIGTERM to torchrun mid-PPO: both ranks stop at the same iteration (no rank is
    # left waiting in a collective), the round is abandoned, nothing is published.
    log_path = tmp_path / "sigterm.log"
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            torchrun(2, *learn, "--ppo-iterations", "1000"), stdout=out, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 300
        while "ppo it 2/1000" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    log = log_path.read_text()
    assert "round 1 abandoned during ppo" in log and "rank 1: rank 0 is done; exiting" in log
    assert ModelStore(tmp_path / "store").list() == []

    # ---- the round again, to the end
    log = run_checked(torchrun(2, *learn, "--ppo-iterations", "1"), timeout=400)
    # Rank 1 trained on orders and exited with rank 0; it never read a stream.
    assert "rank 1: training only; rank 0 consumes and publishes" in log
    assert "rank 1: rank 0 is done; exiting" in log
    consumers = r.xinfo_consumers(keys.feedback_stream, "learner")
    assert [c["name"] for c in consumers] == [b"rank0"]
    # One round, published once: the SFT-only version and the candidate, both by rank 0.
    store = ModelStore(tmp_path / "store")
    assert [m.id for m in store.list()] == ["v1", "v2"]
    sft, candidate = store.verify("v1"), store.verify("v2")
    assert sft.metrics["sft_only"] and sft.metrics["sft_demonstrations"] > 0
    assert candidate.kind == "lora" and candidate.base_model == "v1"  # PPO's adapter, on SFT
    assert candidate.metrics["train_ranks"] == 2 and candidate.metrics["ppo_episodes"] == 4
    assert log.count("round 1: published") == 1
    registered = [a.to_version for a in audit(url, prefix) if a.action == "register"]
    assert sorted(registered) == ["v0", "v1", "v2"]  # v0: the base, as the server does

"""The learner under torchrun: 2 ranks on gloo (CPU), real processes, the tiny model.

- Two ranks take the same reward-model steps, the same PPO update (with PPO-ptx) and the
  same SFT step as one process on the same global batches, although their shards hold
  unequal numbers of prompts and of valid tokens (tests/ddp_step.py): the losses are means
  over the GLOBAL batch. The RM steps and the PPO update run twice on two ranks, with DDP
  and with FSDP2 (sharded weights), in the same torchrun run; under FSDP rank 0 saves full
  HF checkpoints (train_reward_model, train_ppo with HF generate) that load as usual.
- `instructloop learn` under torchrun: rank 0 alone consumes the streams and publishes;
  rank 1 trains (SFT, RM, PPO with a LoRA adapter) on rank 0's orders and exits when
  rank 0 is done; a SIGTERM mid-PPO stops both ranks at the same iteration. With
  --sharding fsdp a full-weights round publishes an ordinary full checkpoint; a LoRA
  round is refused.
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


@pytest.fixture(scope="module")
def steps(tiny_model, tmp_path_factory) -> tuple[dict, dict]:
    """tests/ddp_step.py's results in one process and on 2 ranks (DDP and FSDP steps in
    the same torchrun run)."""
    tmp = tmp_path_factory.mktemp("steps")
    one, two = tmp / "one.pt", tmp / "two.pt"
    run_checked([sys.executable, str(STEP_SCRIPT), str(tiny_model), str(one)], 300)
    run_checked(torchrun(2, str(STEP_SCRIPT), str(tiny_model), str(two)), 400)
    a, b = torch.load(one), torch.load(two)
    assert (a["world"], b["world"]) == (1, 2)
    return a, b


def mismatches(one_proc: dict, two_ranks: dict, what: str, **tol) -> list[str]:
    """Names whose tensors differ between the runs (every tensor must be nonzero)."""
    assert one_proc.keys() == two_ranks.keys() and one_proc, what
    out = []
    for name, x in one_proc.items():
        assert x.abs().max() > 0, f"{what} {name}: nothing to compare"
        if not torch.allclose(two_ranks[name], x, **tol):
            out.append(f"{what} {name}: {(two_ranks[name] - x).abs().max().item():.2e}")
    return out


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_ranks_take_the_same_rm_and_ppo_steps_as_one_process_on_the_global_batch(
    steps, sharding
):
    a, b = steps[0][sharding], steps[1][sharding]
    # The shards are unequal: a per-rank mean would weigh them wrongly.
    assert b["rm_prompts_per_rank"] == [2.0, 1.0]
    tokens = b["ppo_tokens_per_rank"]
    assert tokens[0] > 3 * tokens[1], tokens
    if sharding == "fsdp":  # each rank holds about half of the policy's weights
        assert b["policy_numel_held"] < 0.6 * b["policy_numel"]
    else:
        assert b["policy_numel_held"] == b["policy_numel"]
    compared = [
        "rm_grads", "rm_weights", "rm_small_batch_grads", "policy_grads", "policy_weights",
        "value_grads", "value_weights",
    ]  # fmt: skip
    mismatched = [
        m for key in compared for m in mismatches(a[key], b[key], key, rtol=1e-4, atol=1e-6)
    ]
    assert not mismatched, "\n".join(mismatched)
    assert b["rm_loss"] == pytest.approx(a["rm_loss"], rel=1e-5)
    for key in ("vf_loss", "ptx_loss", "pg_loss"):
        assert b["ppo_stats"][key] == pytest.approx(a["ppo_stats"][key], rel=1e-4, abs=1e-6)


def test_two_ranks_take_the_same_sft_step_as_one_process(steps):
    a, b = steps
    mismatched = mismatches(a["sft_updates"], b["sft_updates"], "sft", rtol=1e-4, atol=1e-6)
    assert not mismatched, "\n".join(mismatched)


def test_fsdp_checkpoints_are_full_hf_checkpoints(steps):
    """What rank 0 saves under FSDP loads with from_pretrained and equals one process's."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    a, b = steps
    work = Path(b["work"])
    # The policy after the FSDP PPO update, saved as train_ppo saves it (SGD: exact).
    policy = AutoModelForCausalLM.from_pretrained(work / "fsdp-policy")
    saved = {n: p.detach() for n, p in policy.named_parameters()}
    mismatched = mismatches(a["fsdp"]["policy_weights"], saved, "saved", rtol=1e-4, atol=1e-6)
    assert not mismatched, "\n".join(mismatched)
    # train_reward_model with sharding "fsdp": every rank scored for the bias and the
    # held-out accuracy, rank 0 saved. AdamW's first steps move a weight by about lr
    # times the sign of its gradient, so float noise in a near-zero gradient may flip
    # one: the tolerance is 3 * lr, far below a weight gathered from the wrong shard.
    rm_one = AutoModelForSequenceClassification.from_pretrained(Path(a["work"]) / "rm")
    rm_two = AutoModelForSequenceClassification.from_pretrained(work / "rm")
    one_w, two_w = dict(rm_one.named_parameters()), dict(rm_two.named_parameters())
    mismatched = mismatches(
        {n: p.detach() for n, p in one_w.items()},
        {n: p.detach() for n, p in two_w.items()},
        "rm",
        rtol=1e-4,
        atol=3e-5,
    )
    assert not mismatched, "\n".join(mismatched)
    assert rm_two.config.reward_offset == pytest.approx(rm_one.config.reward_offset, rel=1e-4)
    for key in ("heldout_accuracy", "train_loss", "pairs", "steps"):
        assert b["rm_metrics"][key] == pytest.approx(a["rm_metrics"][key], rel=1e-5)
    # train_ppo with sharding "fsdp" sampled with HF generate (synced_gpus) on both ranks
    # and rank 0 saved the full policy: it loads, with every weight of the base.
    ppo = AutoModelForCausalLM.from_pretrained(work / "ppo")
    assert dict(ppo.named_parameters()).keys() == saved.keys()
    assert (work / "ppo" / "instructloop_ppo.json").exists()


def test_fsdp_is_refused_for_lora_rounds_and_unknown_shardings(capsys):
    from instructloop.cli import main

    learn = ["learn", "--device", "cpu"]
    assert main([*learn, "--sharding", "fsdp", "--kind", "lora"]) == 2
    assert "--sharding fsdp trains full weights only" in capsys.readouterr().err
    assert main([*learn, "--sharding", "zero3"]) == 2
    assert "--sharding must be 'ddp' or 'fsdp'" in capsys.readouterr().err


def one_round(redis_server, tiny_model, tmp_path, prefix: str, kind: str) -> list[str]:
    """Feedback for one round in Redis; the `learn` arguments (no torchrun) that run it."""
    url = redis_server.url
    r, keys = redis_server.client(), Keys(prefix)
    register_base(url, prefix, tiny_model)
    data = synthetic.preference_data(24, k=4, n_users=12, seed=30)
    demos = [
        (p, synthetic.demonstration_record(f"demo{i}", p, " good good answer", p.user_id))
        for i, (p, _) in enumerate(data[:12])
    ]
    xadd(r, keys, data + demos)
    return [
        "-m", "instructloop.cli", "learn", "--redis-url", url, "--redis-prefix", prefix,
        "--model-store", str(tmp_path / "store"), "--data-dir", str(tmp_path / "learner"),
        "--heldout-fraction", "0.25", "--max-rounds", "1", "--device", "cpu", "--kind", kind,
        "--torch-threads", "1", "--consumer", "rank0", "--block-ms", "50",
        "--min-comparisons", "10", "--gate-prompts", "4", "--gate-samples-per-prompt", "1",
        "--win-rate-threshold", "-1", "--max-kl", "1e9",
        "--sft-min-demonstrations", "2", "--sft-max-steps", "2", "--sft-batch-size", "2",
        "--rm-batch-prompts", "5", "--rm-max-length", "64",
        "--ppo-rollout-prompts", "4", "--ppo-minibatch-size", "4",
        "--ppo-ppo-epochs", "1", "--ppo-max-new-tokens", "8", "--ppo-max-prompt-length", "32",
    ]  # fmt: skip


def test_under_torchrun_rank_0_alone_consumes_and_publishes(tiny_model, redis_server, tmp_path):
    url, prefix = redis_server.url, "ddp-learn"
    r, keys = redis_server.client(), Keys(prefix)
    learn = one_round(redis_server, tiny_model, tmp_path, prefix, kind="lora")

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


def test_a_full_weights_round_under_fsdp_publishes_a_full_checkpoint(
    tiny_model, redis_server, tmp_path
):
    """`learn --sharding fsdp` on 2 ranks: SFT (DDP), the RM and PPO sharded (FSDP2), the
    gate on rank 0; the candidate is an ordinary full checkpoint."""
    from transformers import AutoModelForCausalLM

    learn = one_round(redis_server, tiny_model, tmp_path, "fsdp-learn", kind="full")
    log = run_checked(torchrun(2, *learn, "--sharding", "fsdp", "--ppo-iterations", "2"), 400)
    assert "rank 1: rank 0 is done; exiting" in log and "ppo it 2/2" in log
    assert log.count("round 1: published") == 1
    store = ModelStore(tmp_path / "store")
    assert [m.id for m in store.list()] == ["v1", "v2"]
    candidate = store.verify("v2")
    assert candidate.kind == "full" and candidate.metrics["train_ranks"] == 2
    assert candidate.metrics["ppo_episodes"] == 8
    policy = AutoModelForCausalLM.from_pretrained(store.path("v2"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert dict(policy.named_parameters()).keys() == dict(base.named_parameters()).keys()

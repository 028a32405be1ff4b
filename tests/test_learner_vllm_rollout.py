"""PPO rollouts from a colocated vLLM engine: real vLLM (CPU) on the tiny model.

The sync is proven by behaviour: after the trainer's weights change, vLLM's greedy output
keeps the old weights' answer until a sync, and afterwards equals HF's greedy output from
the trainer's model (full weights, then a LoRA adapter merged in).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("vllm")

from instructloop.learner import synthetic  # noqa: E402
from instructloop.learner.ppo import PPOConfig, load_policy, train_ppo  # noqa: E402
from instructloop.learner.rollout_vllm import VllmRollouts, merged_state_dict  # noqa: E402

PROMPTS = ["reverse: abc", "count: the of and water", "Hello world, please sort: d c b a"]
NEW_TOKENS = 12


# 2 shared cores: one torch thread is several times faster than two under load.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@torch.no_grad()
def hf_greedy(policy, tokenizer, ids: list[int]) -> list[int]:
    """The trainer model's greedy response to one prompt, up to and including EOS."""
    out = policy.generate(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    response = out[0, len(ids) :].tolist()
    if tokenizer.eos_token_id in response:
        response = response[: response.index(tokenizer.eos_token_id) + 1]
    return response


@torch.no_grad()
def perturb(params, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * scale)


def test_synced_vllm_engine_samples_the_trainers_current_weights(tiny_model):
    cfg = PPOConfig(max_prompt_length=32, max_new_tokens=NEW_TOKENS, rollout_prompts=4)
    policy, tokenizer = load_policy(tiny_model)
    policy.eval()
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    with VllmRollouts(policy, tokenizer, cfg) as engine:
        before = engine.generate(ids, temperature=0.0)
        assert before == [hf_greedy(policy, tokenizer, i) for i in ids]

        # A large update of the full weights: vLLM keeps the old answer until the sync.
        perturb(policy.parameters(), seed=1, scale=0.05)
        expected = [hf_greedy(policy, tokenizer, i) for i in ids]
        assert expected != before
        assert engine.generate(ids, temperature=0.0) == before
        engine.sync(policy)
        assert engine.generate(ids, temperature=0.0) == expected

        # A LoRA policy: the adapter is merged into what vLLM gets, not into the trainer.
        from peft import LoraConfig, get_peft_model

        base = {k: v.clone() for k, v in policy.state_dict().items()}
        full_keys = set(merged_state_dict(policy))
        lora = get_peft_model(
            policy,
            LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear"),
        )
        lora.eval()
        perturb([p for n, p in lora.named_parameters() if "lora_B" in n], seed=2, scale=0.3)
        lora_expected = [hf_greedy(lora, tokenizer, i) for i in ids]
        assert lora_expected != expected
        assert set(merged_state_dict(lora)) == full_keys  # HF names, no adapter tensors
        engine.sync(lora)
        assert engine.generate(ids, temperature=0.0) == lora_expected
        base_after = {  # the trainer's base weights are untouched by the merge
            k.replace(".base_layer", ""): v
            for k, v in lora.get_base_model().state_dict().items()
            if "lora_" not in k
        }
        assert base_after.keys() == base.keys()
        assert all(torch.equal(base_after[k], v) for k, v in base.items())

        # sample(): the layout of HF generate on a left-padded batch.
        enc = tokenizer(PROMPTS, padding=True, return_tensors="pt")
        seq = engine.sample(enc["input_ids"], enc["attention_mask"])
        P = enc["input_ids"].shape[1]
        assert torch.equal(seq[:, :P], enc["input_ids"])
        for row in seq[:, P:].tolist():
            if tokenizer.eos_token_id in row:
                end = row.index(tokenizer.eos_token_id) + 1
                assert all(t == tokenizer.pad_token_id for t in row[end:])
            else:
                assert len(row) == NEW_TOKENS
        assert engine.sync_s > 0


def test_ppo_with_vllm_rollouts_runs_and_updates_the_policy(tiny_model, tmp_path):
    prompts = [p.prompt for p, _ in synthetic.preference_data(8, seed=7)]
    cfg = PPOConfig(
        iterations=3,
        rollout_prompts=8,
        minibatch_size=4,
        ppo_epochs=1,
        max_new_tokens=8,
        max_prompt_length=32,
        learning_rate=1e-3,
        value_learning_rate=1e-3,
        rollout_engine="vllm",
    )
    metrics = train_ppo(cfg, prompts, tiny_model, tiny_model, tmp_path / "ppo")
    assert metrics["rollout_engine"] == "vllm" and len(metrics["history"]) == 3
    assert metrics["weight_sync_s"] > 0  # synced before iterations 2 and 3
    for row in metrics["history"]:
        for key in ("score", "kl", "entropy", "clipfrac", "vf_loss", "pg_loss"):
            assert math.isfinite(row[key]), (key, row)
    # The first iteration samples the starting weights, so its KL to them is ~0 (the
    # log-probs are the trainer's, recomputed on vLLM's tokens); later ones moved away.
    assert metrics["history"][0]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert abs(metrics["history"][-1]["kl"]) > 1e-4
    trained, _ = load_policy(tmp_path / "ppo")
    start, _ = load_policy(tiny_model)
    assert any(
        not torch.equal(a, b) for a, b in zip(trained.parameters(), start.parameters(), strict=True)
    )

"""Reward model (K-wise loss) and PPO: real training for a few steps on the tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import saved_dtypes

from instructloop.learner import device, synthetic
from instructloop.learner.dataset import Comparison, Dataset, DatasetConfig, Demonstration
from instructloop.learner.ppo import PPOConfig, evaluate_policy, gae, train_ppo
from instructloop.learner.reward import (
    RewardConfig,
    end_scores,
    kwise_loss,
    kwise_step_loss,
    load_reward_model,
    pairs_from_tiers,
    score_texts,
    token_values,
    train_reward_model,
    with_demonstrations,
)

# 2 shared cores: one torch thread is several times faster than two under load.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

SALT = b"a test split salt, not secret"  # the deployment's comes from its salt file


# ---------------------------------------------------------------------------- K-wise loss


def test_kwise_loss_matches_a_hand_computation_and_ties_give_no_pair():
    scores = torch.tensor([2.0, 0.5, 1.0, -1.0])
    tiers = [0, 1, 1, 2]  # answers 1 and 2 are tied
    loss, n_pairs = kwise_loss(scores, tiers)
    # Pairs (w, l): (0,1) (0,2) (0,3) (1,3) (2,3); r_w - r_l = 1.5, 1.0, 3.0, 1.5, 2.0.
    assert n_pairs == 5
    expected = -sum(math.log(1 / (1 + math.exp(-d))) for d in (1.5, 1.0, 3.0, 1.5, 2.0)) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-6)

    assert len(pairs_from_tiers(list(range(9)))) == math.comb(9, 2) == 36
    assert pairs_from_tiers([1, 0]) == [(1, 0)]  # the better answer comes first
    tied_loss, tied_pairs = kwise_loss(torch.tensor([1.0, 3.0]), [0, 0])
    assert tied_pairs == 0 and tied_loss.item() == 0.0


def test_a_demonstration_joins_its_prompts_comparison_as_the_best_answer():
    c = Comparison("f1", "p1", "u", "reverse: abc\n", ["cab", " cba ", "x"], [1, 0, 2])
    other = Comparison("f2", "p2", "u", "sort: b a\n", ["a b", "b a"], [0, 1])
    demos = [Demonstration("d1", "p1", "u", "reverse: abc\n", "cba")]
    (joined, untouched), n = with_demonstrations([c, other], demos)
    assert n == 1 and untouched is other
    # the demonstration first, tied with the sample that says the same; the rest move down
    assert joined.answers == ["cba", "cab", " cba ", "x"]
    assert joined.tiers == [0, 2, 0, 3]
    assert pairs_from_tiers(joined.tiers) == [(0, 1), (0, 3), (2, 1), (1, 3), (2, 3)]
    assert c.tiers == [1, 0, 2]  # the stored comparison is not changed


def test_kwise_batch_forwards_each_answer_once(tiny_model):
    model, tokenizer = load_reward_model(tiny_model)
    batch = [
        Comparison("f4", "p4", "u", "rank these:", [f" a{i}" for i in range(4)], [0, 1, 2, 3]),
        Comparison("f9", "p9", "u", "and these:", [f" b{i} x" for i in range(9)], list(range(9))),
    ]
    calls = []
    hook = model.base_model.register_forward_hook(
        lambda _m, _args, kwargs, _out: calls.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True,
    )
    loss, n_pairs = kwise_step_loss(model, tokenizer, batch, max_length=64)
    hook.remove()
    assert calls == [4 + 9]  # one forward, one row per answer
    assert n_pairs == math.comb(4, 2) + math.comb(9, 2)
    # The same number as scoring every answer on its own and applying the loss by hand.
    with torch.no_grad():
        per_prompt = []
        for c in batch:
            s = score_texts(model, tokenizer, [c.prompt] * len(c.answers), c.answers, 64)
            per_prompt.append(kwise_loss(s, c.tiers)[0])
    assert loss.item() == pytest.approx(torch.stack(per_prompt).mean().item(), rel=1e-4)


# ---------------------------------------------------------------------------- reward model


def test_reward_model_learns_a_synthetic_preference_held_out_by_user(tiny_model, tmp_path):
    ds = Dataset(
        DatasetConfig(path=str(tmp_path / "d.sqlite3"), heldout_fraction=0.25, split_salt=SALT)
    )
    data = synthetic.preference_data(240, k=4, n_users=40, seed=0)
    ds.add_batch([p for p, _ in data], [f for _, f in data])
    demos = [
        synthetic.demonstration_record(f"demo{i}", p, " good answer", p.user_id)
        for i, (p, _) in enumerate(data[:20])
    ]
    ds.add_batch(feedback=demos)
    train, heldout = ds.comparisons("train"), ds.comparisons("heldout")
    assert len(heldout) >= 30 and not {c.user_id for c in train} & {c.user_id for c in heldout}

    cfg = RewardConfig(learning_rate=1e-3, batch_prompts=8, max_length=64, log_every=5)
    metrics = train_reward_model(
        cfg, train, tiny_model, tmp_path / "rm", heldout, ds.demonstrations("train")
    )
    assert metrics["heldout_accuracy"] > 0.9, metrics
    assert metrics["steps"] == math.ceil(len(train) / cfg.batch_prompts)  # one epoch
    assert metrics["bias_on"] == "demonstrations"

    # The saved RM scores demonstrations at mean 0 and reads the same at its last token
    # as the value model does (PPO's value model starts from this head).
    model, tokenizer = load_reward_model(tmp_path / "rm")
    demo = ds.demonstrations("train")
    s = score_texts(model, tokenizer, [d.prompt for d in demo], [d.text for d in demo], 64)
    assert abs(s.mean().item()) < 1e-3
    with torch.no_grad():
        enc = tokenizer(["q: good", "q: bad x"], padding=True, return_tensors="pt")
        last = enc["attention_mask"].sum(-1) - 1
        values = token_values(model, enc["input_ids"], enc["attention_mask"])
        ends = end_scores(model, enc["input_ids"], enc["attention_mask"])
    assert torch.allclose(values[torch.arange(2), last], ends)
    saved = json.loads((tmp_path / "rm" / "instructloop_reward.json").read_text())
    assert saved["metrics"]["heldout_accuracy"] == metrics["heldout_accuracy"]

    # Warm start: a second round begins from this RM, not from the policy's base.
    more = ds.comparisons("train")[:16]
    again = train_reward_model(cfg, more, tmp_path / "rm", tmp_path / "rm2", heldout)
    assert again["init_dir"] == str(tmp_path / "rm") and again["heldout_accuracy"] > 0.9


# ---------------------------------------------------------------------------- PPO


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.5, 2.0, 0.0, 0.0]])
    values = torch.tensor([[0.1, 0.2, 0.3, 9.0], [1.0, 1.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0], [2.5, 2.0, 0.0, 0.0]]))
    assert torch.allclose(adv, (ret - values) * mask)


def bag_of_tokens_reward_model(base_dir, out_dir, scale: float = 5.0, seed: int = 0):
    """An RM whose reward is (roughly) the mean over tokens of a fixed per-token score.

    Layer 0 attends uniformly (q = 0) and copies (v = o = I) token embeddings into the last
    position; everything else adds nothing. A random head direction then rewards some
    tokens and penalises others: a dense reward that a policy can climb in a few steps.
    """
    model, tokenizer = load_reward_model(base_dir)
    H = model.config.hidden_size
    with torch.no_grad():
        for i, layer in enumerate(model.base_model.layers):
            layer.mlp.down_proj.weight.zero_()
            if i == 0:
                layer.self_attn.q_proj.weight.zero_()
                layer.self_attn.v_proj.weight.copy_(torch.eye(H))
                layer.self_attn.o_proj.weight.copy_(torch.eye(H))
            else:
                layer.self_attn.o_proj.weight.zero_()
        w = torch.randn(1, H, generator=torch.Generator().manual_seed(seed))
        model.score.weight.copy_(scale * w / w.norm())
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


PPO_TINY = dict(
    iterations=20,
    rollout_prompts=16,
    minibatch_size=8,
    ppo_epochs=2,
    max_new_tokens=8,
    max_prompt_length=32,
    learning_rate=1e-3,
    value_learning_rate=1e-3,
)


def test_ppo_raises_the_reward_and_the_kl_penalty_holds_kl_down(tiny_model, tmp_path):
    rm = bag_of_tokens_reward_model(tiny_model, tmp_path / "rm")
    prompts = [p.prompt for p, _ in synthetic.preference_data(40, seed=5)]
    eval_cfg = PPOConfig(**PPO_TINY, seed=123)
    before = evaluate_policy(tiny_model, rm, prompts, cfg=eval_cfg, samples_per_prompt=2)

    runs = {}
    for beta in (0.0, 0.3):
        cfg = PPOConfig(**PPO_TINY, kl_beta=beta)
        metrics = train_ppo(cfg, prompts, tiny_model, rm, tmp_path / f"ppo-{beta}")
        after = evaluate_policy(
            tmp_path / f"ppo-{beta}", rm, prompts, tiny_model, eval_cfg, samples_per_prompt=2
        )
        runs[beta] = after
        history = metrics["history"]
        assert len(history) == 20
        for key in ("score", "kl", "reward", "entropy", "clipfrac", "vf_loss", "pg_loss"):
            assert math.isfinite(history[-1][key]), key

    KL_BOUND = 6.0  # nats per response of 8 tokens
    assert runs[0.3]["mean_score"] > before["mean_score"] + 0.5, (before, runs)
    assert runs[0.3]["kl"] < KL_BOUND
    assert before["kl"] == pytest.approx(0.0, abs=1e-5)
    assert runs[0.0]["kl"] > runs[0.3]["kl"], runs  # the penalty keeps the policy closer


def test_ppo_lora_with_ptx_saves_an_adapter_and_leaves_the_base_alone(tiny_model, tmp_path):
    rm = bag_of_tokens_reward_model(tiny_model, tmp_path / "rm")
    prompts = [p.prompt for p, _ in synthetic.preference_data(8, seed=6)]
    cfg = PPOConfig(
        **{**PPO_TINY, "iterations": 2, "rollout_prompts": 8},
        lora=True,
        ptx_coef=1.0,
        ptx_batch_size=2,
    )
    metrics = train_ppo(cfg, prompts, tiny_model, rm, tmp_path / "adapter", ptx_texts=["a b c"])
    out = tmp_path / "adapter"
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    assert metrics["kind"] == "lora" and math.isfinite(metrics["history"][-1]["ptx_loss"])
    # The adapter loads on top of the base and has moved the policy away from it.
    result = evaluate_policy(out, rm, prompts, tiny_model, PPOConfig(**PPO_TINY))
    assert result["kl"] != pytest.approx(0.0, abs=1e-6)
    # The next LoRA round continues this adapter (same rank, still only adapter weights).
    cfg_next = PPOConfig(**{**PPO_TINY, "iterations": 1, "rollout_prompts": 8}, lora=True)
    train_ppo(cfg_next, prompts, out, rm, tmp_path / "adapter2", ref_dir=tiny_model)
    assert json.loads((tmp_path / "adapter2" / "adapter_config.json").read_text())["r"] == 8
    assert not (tmp_path / "adapter2" / "model.safetensors").exists()


# ---------------------------------------------------------------------------- precision


def test_the_gpu_precision_path_learns_and_saves_float32_checkpoints(
    tiny_model, tmp_path, monkeypatch
):
    """CI has no GPU: run what CUDA runs (forwards under bf16 autocast over float32
    weights, backward outside it) through autocast's CPU kernels. The RM still learns,
    PPO still climbs its reward, scores and values come back float32, and every
    checkpoint the server will load is float32."""
    monkeypatch.setitem(device.AUTOCAST_DTYPES, "cpu", torch.bfloat16)
    with device.autocast("cpu"):  # the path under test is really bf16
        assert torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.bfloat16
    ds = Dataset(
        DatasetConfig(path=str(tmp_path / "d.sqlite3"), heldout_fraction=0.25, split_salt=SALT)
    )
    data = synthetic.preference_data(120, k=4, n_users=40, seed=0)
    ds.add_batch([p for p, _ in data], [f for _, f in data])
    cfg = RewardConfig(learning_rate=1e-3, batch_prompts=8, max_length=64, log_every=5)
    train, heldout = ds.comparisons("train"), ds.comparisons("heldout")
    metrics = train_reward_model(cfg, train, tiny_model, tmp_path / "rm", heldout)
    assert metrics["heldout_accuracy"] > 0.8, metrics
    model, tokenizer = load_reward_model(tmp_path / "rm")
    with device.autocast("cpu"):
        assert score_texts(model, tokenizer, ["q:"], [" a"]).dtype == torch.float32

    rm = bag_of_tokens_reward_model(tiny_model, tmp_path / "bag-rm")
    prompts = [p.prompt for p, _ in synthetic.preference_data(40, seed=5)]
    eval_cfg = PPOConfig(**PPO_TINY, seed=123)
    before = evaluate_policy(tiny_model, rm, prompts, cfg=eval_cfg, samples_per_prompt=2)
    train_ppo(PPOConfig(**PPO_TINY, kl_beta=0.3), prompts, tiny_model, rm, tmp_path / "ppo")
    after = evaluate_policy(tmp_path / "ppo", rm, prompts, tiny_model, eval_cfg, 2)
    assert after["mean_score"] > before["mean_score"] + 0.5, (before, after)

    for saved in (tmp_path / "rm", tmp_path / "ppo"):
        assert saved_dtypes(saved) == ({"F32"}, "float32"), saved

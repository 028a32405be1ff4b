"""The PPO update's shortcut computes what the plain update computes: a minibatch packed
(ppo.pack: its episodes' real tokens back to back, each attending to itself alone) gives
the losses, stats and gradients of the whole padded minibatch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from instructloop.learner import ppo
from instructloop.learner.config import PPOConfig
from instructloop.learner.reward import ValueHead, load_reward_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A long prompt with an empty answer (EOS only) beside short prompts with long answers:
# padded together, most of the minibatch is padding.
PROMPTS = ["sort: b a", "a much longer prompt: reverse these few words", "upper: w", "sort: c a"]
RESPONSES = ["a b", "", "W and then a long tail of text that runs on and on and on", "x"]


def test_a_packed_minibatch_gives_the_padded_minibatchs_losses_and_gradients(
    tiny_model,
):
    torch.manual_seed(0)
    cfg = PPOConfig(max_new_tokens=64, max_grad_norm=1e9)  # no clipping: raw gradients
    policy, tokenizer = ppo.load_policy(tiny_model)
    ref, _ = ppo.load_policy(tiny_model)
    reward_model, reward_tokenizer = load_reward_model(tiny_model)
    value_model, _ = load_reward_model(tiny_model)
    for m in (policy, ref, reward_model, value_model):
        m.eval()
    value_head = ValueHead(value_model)
    ro = ppo.rollout_of(policy, ref, tokenizer, PROMPTS, RESPONSES, cfg)
    exp = ppo.experience(ro, ValueHead(reward_model), reward_tokenizer, value_head, cfg)
    sampled = ro.logp  # the rollout's log-probs: packed forwards too
    ro.logp = ro.logp + 0.3 * torch.randn_like(ro.logp)  # ratios off 1: some clipped
    idx = torch.arange(len(PROMPTS))

    packed = ppo.pack(ro.seq, ro.attn, ro.mask, ro.prompt_len)
    real = int(ro.attn[:, : ro.prompt_len].sum() + ro.mask.sum())
    assert real <= packed.ids.numel() < 0.7 * ro.seq.numel()
    assert len(packed.ids) < len(PROMPTS)  # some row holds two episodes
    # A model outside ppo.PACKING_MODEL_TYPES gets one episode per row: the same numbers.
    assert ppo.packs(policy, value_head, ValueHead(reward_model))
    assert not ppo.packs(policy, SimpleNamespace(config=SimpleNamespace(model_type="other")))
    single = ppo.pack(ro.seq, ro.attn, ro.mask, ro.prompt_len, share_rows=False)
    assert len(single.ids) == len(PROMPTS)
    with torch.no_grad():
        for a, b in zip(ppo.packed_logprobs(policy, single, 1.0),
                        ppo.packed_logprobs(policy, packed, 1.0), strict=True):  # fmt: skip
            torch.testing.assert_close(a * ro.mask, b * ro.mask, rtol=1e-5, atol=1e-5)

    # The plain update: one forward over the whole padded minibatch.
    params = [p for m in (policy, value_model) for p in m.parameters()]
    P = ro.prompt_len
    logits = policy(input_ids=ro.seq, attention_mask=ro.attn, position_ids=ro.pos).logits
    logp, entropy = ppo.token_logprobs(logits[:, P - 1 : -1], ro.seq[:, P:], cfg.temperature)
    v_new = value_head(ro.seq, ro.attn, ro.pos)[:, P - 1 : -1]
    pg_loss, vf_loss, stats = ppo.ppo_losses(
        logp=logp, old_logp=ro.logp, advantages=exp.advantages, v_new=v_new,
        v_old=exp.values, returns=exp.returns, mask=ro.mask, cfg=cfg,
    )  # fmt: skip
    torch.testing.assert_close(logp.detach() * ro.mask, sampled * ro.mask, rtol=1e-5, atol=1e-5)
    (pg_loss + cfg.vf_coef * vf_loss).backward()
    want = [None if p.grad is None else p.grad.clone() for p in params]
    assert 0 < stats["clipfrac"] < 1

    # ppo_step (lr 0: the gradients stay in .grad, the weights do not move)
    got = ppo.ppo_step(
        policy=policy, value_head=value_head, optim=torch.optim.SGD(params, lr=0.0), ro=ro,
        exp=exp, idx=idx, cfg=cfg,
    )  # fmt: skip
    assert got["pg_loss"] == pytest.approx(pg_loss.item(), rel=1e-5, abs=1e-7)
    assert got["vf_loss"] == pytest.approx(vf_loss.item(), rel=1e-5, abs=1e-7)
    assert got["clipfrac"] == pytest.approx(stats["clipfrac"], abs=1e-6)
    assert got["entropy"] == pytest.approx(ppo.masked_mean(entropy, ro.mask).item(), rel=1e-5)
    n_grads = 0
    for p, w in zip(params, want, strict=True):
        assert (p.grad is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-6)
            n_grads += 1
    assert n_grads > 10

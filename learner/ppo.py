"""Step 3 of InstructGPT: PPO against the reward model, with a per-token KL penalty.

Readable top to bottom, like cleanrl's ppo.py. One iteration:

  1. rollout   fresh samples for a batch of logged prompts from the current policy
               (HF generate, or a colocated vLLM engine holding the trainer's current
               weights: rollout_vllm.py), with the log-probs of the policy and the
               reference (SFT) policy, both from the trainer's models, and the value
               model's estimate at every response token;
  2. reward    r_t = -beta * (log pi(a_t) - log pi_ref(a_t)) at every token, plus the RM
               score of (prompt, response) at the last token;
  3. GAE       advantages with gamma = 1 and lambda configurable, whitened;
  4. update    `ppo_epochs` passes of clipped policy loss + clipped value loss
               (+ the PPO-ptx term: ptx_coef * language-model loss on demonstration text,
               in the same step), over minibatches.

The value model starts from the RM (the same backbone + scalar head, read at every token;
see reward.token_values). The policy update is full weights or a LoRA adapter (peft).
The result is saved as an HF checkpoint dir (full) or a peft adapter dir (LoRA).

Device: the four models live on one device (`device`, resolved by the caller); rollouts,
scoring and the losses' forward passes run under bf16 autocast on CUDA, backward and the
optimizer step outside it, over float32 weights (learner/device.py). On CPU everything is
float32, as before.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from instructloop.learner.config import PPOConfig
from instructloop.learner.device import autocast
from instructloop.learner.reward import load_reward_model, score_texts, token_values

log = logging.getLogger(__name__)


class PPOStopped(Exception):
    """train_ppo's stop event was set: it returned between iterations, saving nothing."""


# ---------------------------------------------------------------------------- plumbing


def load_policy(
    model_dir: str | Path, lora: bool | None = None, device: str | torch.device = "cpu"
):
    """(model, tokenizer) of a full checkpoint or a peft adapter dir; left padding; float32
    weights on `device`.

    lora=True keeps an adapter dir's adapter trainable (the next LoRA round continues it);
    lora=False merges it into the base (a full-weights round); None loads it frozen.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    if (Path(model_dir) / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(model_dir, is_trainable=bool(lora))
        if lora is False:
            model = model.merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.to(device), tokenizer


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def response_logprobs(model, seq, attn, pos, prompt_len: int, temperature: float):
    """Log-prob and entropy of each response token under `model`: two [B, R] tensors."""
    logits = model(input_ids=seq, attention_mask=attn, position_ids=pos).logits
    logits = logits[:, prompt_len - 1 : -1] / temperature  # [B, R, V]: predicts token t
    logp_all = F.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, seq[:, prompt_len:, None]).squeeze(-1)  # [B, R]
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # [B, R]
    return logp, entropy


@dataclass
class Rollout:
    """A batch of episodes: prompt (left-padded, P tokens) + response (R tokens)."""

    prompts: list[str]
    seq: torch.Tensor  # [B, P+R] token ids
    attn: torch.Tensor  # [B, P+R] 1 on real tokens
    pos: torch.Tensor  # [B, P+R] position ids (left padding aware)
    prompt_len: int  # P
    mask: torch.Tensor  # [B, R] 1 on response tokens up to and including EOS
    texts: list[str]  # decoded responses
    logp: torch.Tensor  # [B, R] policy log-probs at sampling time
    ref_logp: torch.Tensor  # [B, R] reference log-probs


@torch.no_grad()
def rollout(policy, ref, tokenizer, prompts: Sequence[str], cfg: PPOConfig, engine=None) -> Rollout:
    """Sample one response per prompt from the policy, with policy and reference log-probs.

    engine: a rollout_vllm.VllmRollouts holding the policy's weights samples the tokens
    instead of HF generate; the log-probs come from `policy` either way. Every tensor of
    the result is on the policy's device.
    """
    enc = tokenizer(
        list(prompts),
        padding=True,
        truncation=True,
        max_length=cfg.max_prompt_length,
        return_tensors="pt",
    ).to(policy.device)
    P = enc["input_ids"].shape[1]
    if engine is not None:
        seq = engine.sample(enc["input_ids"], enc["attention_mask"]).to(policy.device)  # [B, P+R]
    else:
        seq = policy.generate(
            **enc,
            do_sample=True,
            temperature=cfg.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=cfg.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )  # [B, P+R]
    response = seq[:, P:]  # [B, R]
    is_eos = (response == tokenizer.eos_token_id).long()
    mask = ((is_eos.cumsum(-1) - is_eos) == 0).long()  # up to and including the first EOS
    attn = torch.cat([enc["attention_mask"], mask], dim=1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logp, _ = response_logprobs(policy, seq, attn, pos, P, cfg.temperature)
    ref_logp, _ = response_logprobs(ref, seq, attn, pos, P, cfg.temperature)
    texts = [
        tokenizer.decode(r[m.bool()], skip_special_tokens=True)
        for r, m in zip(response.cpu(), mask.cpu(), strict=True)  # one copy, not one per row
    ]
    return Rollout(list(prompts), seq, attn, pos, P, mask.float(), texts, logp, ref_logp)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over response tokens; returns (advantages, returns).

    rewards, values, mask: [B, R]. Values after the end of a response are zero, so the
    bootstrap past the last token is 0 (the episode ends there).
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    R = rewards.shape[1]
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, advantages + values


# ---------------------------------------------------------------------------- the run


def train_ppo(
    cfg: PPOConfig,
    prompts: Sequence[str],
    policy_dir: str | Path,
    reward_dir: str | Path,
    out_dir: str | Path,
    ref_dir: str | Path | None = None,
    value_dir: str | Path | None = None,
    ptx_texts: Sequence[str] = (),
    stop: threading.Event | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Run PPO and save the policy to out_dir. Returns metrics with a per-iteration history.

    policy_dir: the policy to improve (a full checkpoint); ref_dir: the KL reference
    (default: policy_dir, i.e. the SFT policy); reward_dir: the RM; value_dir: where the
    value model starts (default: the RM); ptx_texts: text for the PPO-ptx term.
    stop: checked before every iteration; once set, PPOStopped is raised (nothing saved).
    device: where all four models run; the saved policy is float32 either way.
    """
    if not prompts:
        raise ValueError("PPO needs at least one prompt")
    if cfg.rollout_engine not in ("hf", "vllm"):
        raise ValueError(f"rollout_engine must be 'hf' or 'vllm', not {cfg.rollout_engine!r}")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)

    # ---- models: policy (trained), reference (frozen), value (trained), reward (frozen)
    policy, tokenizer = load_policy(policy_dir, lora=cfg.lora, device=device)
    ref, _ = load_policy(ref_dir or policy_dir, device=device)
    reward_model, reward_tokenizer = load_reward_model(reward_dir, device=device)
    value_model, _ = load_reward_model(value_dir or reward_dir, device=device)
    if value_model.config.vocab_size != policy.config.vocab_size:
        raise ValueError("the value model must share the policy's tokenizer (init it from the RM)")
    if cfg.lora and not hasattr(policy, "peft_config"):  # else: continue the loaded adapter
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            task_type="CAUSAL_LM",
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            target_modules=cfg.lora_target_modules,
        )
        policy = get_peft_model(policy, lora)
    for m in (ref, reward_model):
        m.requires_grad_(False)
    for m in (policy, ref, reward_model, value_model):
        m.eval()  # no dropout: log-probs at sampling and update time must agree
    optim = torch.optim.AdamW(
        [
            {"params": [p for p in policy.parameters() if p.requires_grad]},
            {"params": value_model.parameters(), "lr": cfg.value_learning_rate},
        ],
        lr=cfg.learning_rate,
        eps=1e-5,
    )
    ptx_order = list(ptx_texts)
    ptx_cursor = 0

    history = []
    timing = {"rollout_s": 0.0, "scoring_s": 0.0, "update_s": 0.0}
    engine = None
    if cfg.rollout_engine == "vllm":  # a colocated engine, fed the weights after every update
        from instructloop.learner.rollout_vllm import VllmRollouts

        t0 = time.perf_counter()
        engine = VllmRollouts(policy, tokenizer, cfg)
        timing["engine_start_s"] = time.perf_counter() - t0
    episodes, t_start = 0, time.perf_counter()
    try:
        for it in range(1, cfg.iterations + 1):
            if stop is not None and stop.is_set():
                raise PPOStopped(f"PPO stopped before iteration {it}/{cfg.iterations}")
            # ------------------------------------------------------------ 1. rollout
            t0 = time.perf_counter()
            batch_prompts = [rng.choice(prompts) for _ in range(cfg.rollout_prompts)]
            if engine is not None and it > 1:
                engine.sync(policy)  # the engine samples from the weights updated last
            with autocast(device):
                ro = rollout(policy, ref, tokenizer, batch_prompts, cfg, engine)
            P, mask = ro.prompt_len, ro.mask  # mask: [B, R]
            t1 = time.perf_counter()

            # ------------------------------------------------------------ 2. reward
            with torch.no_grad(), autocast(device):
                scores = score_texts(
                    reward_model, reward_tokenizer, ro.prompts, ro.texts
                )  # [B], bias applied
                values = token_values(value_model, ro.seq, ro.attn, ro.pos)[:, P - 1 : -1]  # [B, R]
                kl = (ro.logp - ro.ref_logp) * mask  # [B, R] per-token KL estimate
                rewards = -cfg.kl_beta * kl
                last = mask.sum(-1).long() - 1  # [B] index of the last response token
                rewards[torch.arange(len(last), device=last.device), last] += scores

                # -------------------------------------------------------- 3. GAE
                advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
                advantages = masked_whiten(advantages, mask)
            t2 = time.perf_counter()

            # ------------------------------------------------------------ 4. update
            stats = {"pg_loss": [], "vf_loss": [], "clipfrac": [], "entropy": [], "ptx_loss": []}
            B = ro.seq.shape[0]
            for _ in range(cfg.ppo_epochs):
                for idx in torch.randperm(B).to(device).split(cfg.minibatch_size):
                    mb_mask = mask[idx]
                    with autocast(device):  # the forwards; backward runs in their dtypes
                        logp, entropy = response_logprobs(
                            policy, ro.seq[idx], ro.attn[idx], ro.pos[idx], P, cfg.temperature
                        )
                        v_new = token_values(value_model, ro.seq[idx], ro.attn[idx], ro.pos[idx])
                        v_new = v_new[:, P - 1 : -1]  # [b, R]
                    ratio = torch.exp(logp - ro.logp[idx])
                    adv = advantages[idx]
                    pg_loss = masked_mean(
                        torch.max(
                            -adv * ratio,
                            -adv * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range),
                        ),
                        mb_mask,
                    )
                    v_old = values[idx]
                    v_clipped = v_old + (v_new - v_old).clamp(
                        -cfg.value_clip_range, cfg.value_clip_range
                    )
                    vf_loss = 0.5 * masked_mean(
                        torch.max((v_new - returns[idx]) ** 2, (v_clipped - returns[idx]) ** 2),
                        mb_mask,
                    )
                    loss = pg_loss + cfg.vf_coef * vf_loss

                    # PPO-ptx: gamma * log-likelihood of demonstration text, in the same step.
                    if cfg.ptx_coef > 0 and ptx_order:
                        # A text is a whole document: it ends with EOS (so the policy
                        # keeps learning where answers stop) and is kept up to a prompt's
                        # and a response's length.
                        texts = [
                            ptx_order[(ptx_cursor + j) % len(ptx_order)] + tokenizer.eos_token
                            for j in range(cfg.ptx_batch_size)
                        ]
                        ptx_cursor += cfg.ptx_batch_size
                        enc = tokenizer(
                            texts,
                            padding=True,
                            truncation=True,
                            max_length=cfg.max_prompt_length + cfg.max_new_tokens,
                            return_tensors="pt",
                        ).to(device)
                        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
                        pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
                        with autocast(device):
                            ptx_loss = policy(**enc, position_ids=pos, labels=labels).loss
                        loss = loss + cfg.ptx_coef * ptx_loss
                        stats["ptx_loss"].append(ptx_loss.item())

                    optim.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                    torch.nn.utils.clip_grad_norm_(value_model.parameters(), cfg.max_grad_norm)
                    optim.step()
                    with torch.no_grad():
                        stats["pg_loss"].append(pg_loss.item())
                        stats["vf_loss"].append(vf_loss.item())
                        clipped = ((ratio - 1).abs() > cfg.clip_range).float()
                        stats["clipfrac"].append(masked_mean(clipped, mb_mask).item())
                        stats["entropy"].append(masked_mean(entropy, mb_mask).item())
            t3 = time.perf_counter()

            # ------------------------------------------------------------ logging
            episodes += B
            timing["rollout_s"] += t1 - t0
            timing["scoring_s"] += t2 - t1
            timing["update_s"] += t3 - t2
            row = {
                "iteration": it,
                "score": scores.mean().item(),
                "kl": kl.sum(-1).mean().item(),  # per sequence, summed over tokens
                "reward": rewards.sum(-1).mean().item(),
                "response_len": mask.sum(-1).mean().item(),
                "episodes_per_s": episodes / (time.perf_counter() - t_start),
                **{k: sum(v) / len(v) for k, v in stats.items() if v},
            }
            history.append(row)
            if it % cfg.log_every == 0 or it == cfg.iterations:
                log.info(
                    "ppo it %d/%d score %.3f kl %.3f reward %.3f entropy %.2f clipfrac %.3f "
                    "vf_loss %.4f  %.1f episodes/s",
                    it,
                    cfg.iterations,
                    row["score"],
                    row["kl"],
                    row["reward"],
                    row.get("entropy", float("nan")),
                    row.get("clipfrac", float("nan")),
                    row.get("vf_loss", float("nan")),
                    row["episodes_per_s"],
                )
    finally:
        if engine is not None:
            timing["weight_sync_s"] = engine.sync_s
            engine.close()

    # ---- save: a full checkpoint, or only the adapter
    out = Path(out_dir)
    policy.save_pretrained(out)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(out)
    tail = history[-max(1, len(history) // 4) :]
    metrics = {
        "iterations": cfg.iterations,
        "episodes": episodes,
        "seconds": time.perf_counter() - t_start,
        **timing,
        "kind": "lora" if cfg.lora else "full",
        "rollout_engine": cfg.rollout_engine,
        "device": str(device),
        "score_first": history[0]["score"],
        "score_last": sum(r["score"] for r in tail) / len(tail),
        "kl_last": sum(r["kl"] for r in tail) / len(tail),
        "history": history,
    }
    (out / "instructloop_ppo.json").write_text(
        json.dumps({"config": asdict(cfg), "metrics": metrics}, indent=2) + "\n"
    )
    return metrics


@torch.no_grad()
def evaluate_policy(
    policy_dir: str | Path,
    reward_dir: str | Path,
    prompts: Sequence[str],
    ref_dir: str | Path | None = None,
    cfg: PPOConfig | None = None,
    samples_per_prompt: int = 1,
    device: str | torch.device = "cpu",
) -> dict:
    """Mean RM score of fresh samples and their KL to the reference (summed per sequence)."""
    cfg = cfg or PPOConfig()
    torch.manual_seed(cfg.seed)
    policy, tokenizer = load_policy(policy_dir, device=device)
    ref, _ = load_policy(ref_dir or policy_dir, device=device)
    reward_model, reward_tokenizer = load_reward_model(reward_dir, device=device)
    for m in (policy, ref, reward_model):
        m.eval()
    scores, kls = [], []
    batch = [p for p in prompts for _ in range(samples_per_prompt)]
    for i in range(0, len(batch), cfg.rollout_prompts):
        with autocast(device):
            ro = rollout(policy, ref, tokenizer, batch[i : i + cfg.rollout_prompts], cfg)
            scores.append(score_texts(reward_model, reward_tokenizer, ro.prompts, ro.texts))
        kls.append(((ro.logp - ro.ref_logp) * ro.mask).sum(-1))
    return {
        "mean_score": torch.cat(scores).mean().item(),
        "kl": torch.cat(kls).mean().item(),
        "episodes": len(batch),
    }

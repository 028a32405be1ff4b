"""The gate a round's candidate must pass before it is offered (step 4 of a round).

Both policies answer the same held-out prompts (users split by hash, as InstructGPT split
by customer); the round's new RM scores every answer. The candidate's win rate is the
share of prompts where its answer scores higher (ties count half). Its KL to the reference
(the SFT policy, or the base model before any SFT) is log pi - log pi_ref summed over each
response, averaged: the same estimate PPO penalises. The candidate passes when the win
rate is above the threshold AND the KL is below its bound.

The four models run on `device`, under bf16 autocast on CUDA (learner/device.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from instructloop.learner.config import PPOConfig, RoundConfig
from instructloop.learner.device import autocast
from instructloop.learner.ppo import load_policy, rollout
from instructloop.learner.reward import load_reward_model, score_texts

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_gate(
    cfg: RoundConfig,
    ppo_cfg: PPOConfig,
    candidate_dir: Path,
    serving_dir: Path,
    ref_dir: Path,
    reward_dir: Path,
    prompts: Sequence[str],
    device: str | torch.device = "cpu",
) -> dict:
    """RM-estimated win rate of candidate vs serving, and KL(candidate || reference)."""
    if not prompts:
        return {
            "passed": False, "reason": "no held-out prompts to evaluate on",
            "win_rate": float("nan"), "kl": float("nan"),
            "candidate_score": float("nan"), "serving_score": float("nan"),
        }  # fmt: skip
    torch.manual_seed(cfg.gate_seed)
    candidate, tokenizer = load_policy(candidate_dir, device=device)
    serving, _ = load_policy(serving_dir, device=device)
    ref, _ = load_policy(ref_dir, device=device)
    rm, rm_tokenizer = load_reward_model(reward_dir, device=device)
    for m in (candidate, serving, ref, rm):
        m.eval()
    batch = [p for p in prompts for _ in range(cfg.gate_samples_per_prompt)]
    wins, kls, cand_scores, serv_scores = [], [], [], []
    step = ppo_cfg.rollout_prompts
    t0 = time.perf_counter()
    for i in range(0, len(batch), step):
        chunk = batch[i : i + step]
        with autocast(device):
            ro_c = rollout(candidate, ref, tokenizer, chunk, ppo_cfg)
            ro_s = rollout(serving, serving, tokenizer, chunk, ppo_cfg)
            c = score_texts(rm, rm_tokenizer, chunk, ro_c.texts)  # [B]
            s = score_texts(rm, rm_tokenizer, chunk, ro_s.texts)  # [B]
        wins.append((c > s).float() + 0.5 * (c == s).float())
        kls.append(ro_c.kl())  # [B] per response
        cand_scores.append(c)
        serv_scores.append(s)
    win_rate = torch.cat(wins).mean().item()
    kl = torch.cat(kls).mean().item()
    passed = win_rate > cfg.win_rate_threshold and kl < cfg.max_kl
    reason = (
        f"win rate {win_rate:.3f} {'>' if win_rate > cfg.win_rate_threshold else '<='} "
        f"{cfg.win_rate_threshold}, KL {kl:.3f} {'<' if kl < cfg.max_kl else '>='} "
        f"{cfg.max_kl} on {len(batch)} held-out samples"
    )
    log.info("gate: %s -> %s (%.1fs)", reason, "passed" if passed else "rejected",
             time.perf_counter() - t0)  # fmt: skip
    return {
        "passed": passed,
        "reason": reason,
        "win_rate": win_rate,
        "win_rate_threshold": cfg.win_rate_threshold,
        "kl": kl,
        "kl_bound": cfg.max_kl,
        "candidate_score": torch.cat(cand_scores).mean().item(),
        "serving_score": torch.cat(serv_scores).mean().item(),
        "heldout_samples": len(batch),
    }

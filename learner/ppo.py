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
               in the same step), over minibatches, each packed (its episodes' real
               tokens back to back, attention kept within each: same numbers as the
               padded minibatch, over fewer tokens).

The value model starts from the RM (the same backbone + scalar head, read at every token;
see reward.token_values). The policy update is full weights or a LoRA adapter (peft).
The result is saved as an HF checkpoint dir (full) or a peft adapter dir (LoRA).

Device: the four models live on one device (`device`, resolved by the caller); rollouts,
scoring and the losses' forward passes run under bf16 autocast on CUDA, backward and the
optimizer step outside it, over float32 weights (learner/device.py). On CPU everything is
float32, as before. Under torchrun with --sharding fsdp every rank holds a shard of each
of the four (FSDP2, learner/distributed.py), generate runs with synced_gpus, and the full
policy is gathered to rank 0 to be saved.
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

from instructloop.learner import distributed
from instructloop.learner.config import PPOConfig
from instructloop.learner.device import autocast
from instructloop.learner.reward import ValueHead, load_reward_model, score_texts

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


def masked_mean(x: torch.Tensor, mask: torch.Tensor, denominator=None) -> torch.Tensor:
    """Mean of x over mask; or, with a denominator (distributed.mean_denominator), the
    masked SUM divided by it: under DDP the gradient average is then the global mean."""
    if denominator is None:
        denominator = mask.sum().clamp(min=1)
    return (x * mask).sum() / denominator


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x whitened with the mean and variance of the valid tokens of the GLOBAL batch (all
    ranks' tokens under torchrun), so the advantages of a token do not depend on which
    rank sampled it."""
    n = distributed.all_sum(mask.sum()).clamp(min=1)
    mean = distributed.all_sum((x * mask).sum()) / n
    var = distributed.all_sum((((x - mean) ** 2) * mask).sum()) / n
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """(log-prob [B, R] of each target token under logits [B, R, V] at the temperature,
    entropy [B, R] of each distribution, without an autograd graph)."""
    logp_all = F.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)  # [B, R]
    with torch.no_grad():  # logged only: no autograd graph for it
        entropy = -(logp_all.exp() * logp_all).sum(-1)  # [B, R]
    return logp, entropy


@dataclass
class Packed:
    """Episodes packed back to back into rows, with no padding between them.

    Each episode is its real tokens only (its prompt without the left padding, its
    response up to and including EOS), with position ids restarting at 0: transformers
    reads a restart as a new sequence and masks attention across it (packed sequences,
    masking_utils.find_packed_sequence_indices), so each episode attends to itself alone,
    at the positions it has in the padded batch. The forwards then run over the real
    tokens and a row tail, not over every episode padded to the widest.
    """

    ids: torch.Tensor  # [n, C] token ids (pad in a row's tail)
    pos: torch.Tensor  # [n, C] position ids (0.. per episode)
    rows: torch.Tensor  # [g, R] row of the position whose output predicts response token t
    cols: torch.Tensor  # [g, R] its column (past an episode's end: its last position)
    targets: torch.Tensor  # [g, R] the response tokens (padded past each end)


# Architectures whose transformers implementation keeps packed sequences apart (it passes
# the position ids to its mask, and a restart starts a new sequence); tests/test_families.py
# checks each. Episodes of any other model get a row each: right-padded, and under causal
# attention no real token reaches the padding after it, so the math holds for any model.
PACKING_MODEL_TYPES = frozenset(
    {"llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "gpt2", "gpt_neox"}
)


def packs(*models) -> bool:
    """Whether episodes may share rows in forwards of all these models (each may be
    wrapped: DDP's .module, a ValueHead's .model; a peft model reads its base's config)."""

    def config(m):
        while not hasattr(m, "config"):
            m = m.module if hasattr(m, "module") else m.model
        return m.config

    return all(config(m).model_type in PACKING_MODEL_TYPES for m in models)


def pack(
    seq: torch.Tensor, attn: torch.Tensor, mask: torch.Tensor, P: int, share_rows: bool = True
) -> Packed:
    """seq/attn [g, P+R] (prompts left-padded to P) and response mask [g, R] as Packed
    rows, first-fit decreasing into rows as wide as the longest episode (share_rows=False:
    one episode per row, for a model that would not keep them apart; see packs)."""
    prompt = attn[:, :P].sum(-1).tolist()
    response = mask.sum(-1).long().tolist()
    lengths = [p + r for p, r in zip(prompt, response, strict=True)]
    C, R = max(lengths), max(response)
    free: list[int] = []  # room left in each row
    place = [(0, 0)] * len(lengths)  # (row, column) where each episode starts
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = (k for k, f in enumerate(free) if f >= lengths[i] and share_rows)
        row = next(fits, len(free))
        if row == len(free):
            free.append(C)
        place[i] = (row, C - free[row])
        free[row] -= lengths[i]
    ids = torch.zeros(len(free), C, dtype=seq.dtype, device=seq.device)
    # A row's tail (pad) keeps positions that no real token attends to (causal: the tail
    # comes after them), whatever sequence transformers takes it for.
    pos = torch.arange(C, device=seq.device).repeat(len(free), 1)
    t = torch.arange(R, device=seq.device)
    rows = torch.empty(len(lengths), R, dtype=torch.long, device=seq.device)
    cols = torch.empty_like(rows)
    for i, ((row, col), p, r) in enumerate(zip(place, prompt, response, strict=True)):
        ids[row, col : col + p + r] = seq[i, P - p : P + r]
        pos[row, col : col + p + r] = torch.arange(p + r, device=seq.device)
        rows[i] = row
        cols[i] = col + p - 1 + t.clamp(max=r - 1)  # position t-1 predicts token t
    return Packed(ids, pos, rows, cols, seq[:, P : P + R])


def packed_logprobs(model, pk: Packed, temperature: float):
    """Log-prob and entropy [g, R] of each response token of the packed episodes under
    `model` (a causal LM), at the sampling temperature."""
    logits = model(input_ids=pk.ids, position_ids=pk.pos, use_cache=False).logits
    return token_logprobs(logits[pk.rows, pk.cols], pk.targets, temperature)


def packed_values(value_head, pk: Packed) -> torch.Tensor:
    """The value model's estimate [g, R] at each response token of the packed episodes (read
    where the token is predicted, as the policy's log-prob is)."""
    return value_head(pk.ids, None, pk.pos)[pk.rows, pk.cols]


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

    def kl(self) -> torch.Tensor:
        """[B] log pi - log pi_ref summed over each response: the KL estimate per
        response that the gate bounds and evaluate_policy reports."""
        return ((self.logp - self.ref_logp) * self.mask).sum(-1)


@torch.no_grad()
def rollout(policy, ref, tokenizer, prompts: Sequence[str], cfg: PPOConfig, engine=None) -> Rollout:
    """Sample one response per prompt from the policy, with policy and reference log-probs.

    engine: a rollout_vllm.VllmRollouts holding the policy's weights samples the tokens
    instead of HF generate; the log-probs come from `policy` either way. Every tensor of
    the result is on the policy's device.
    """
    enc = _encode_prompts(tokenizer, prompts, cfg, policy.device)
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
            # FSDP: every forward is a collective, so a rank whose samples all ended
            # keeps forwarding until every rank's have
            synced_gpus=distributed.is_sharded(policy),
        )  # [B, P+R]
    return _logprobs_of(policy, ref, tokenizer, list(prompts), enc["attention_mask"], seq, cfg)


@torch.no_grad()
def rollout_of(
    policy, ref, tokenizer, prompts: Sequence[str], responses: Sequence[str], cfg: PPOConfig
) -> Rollout:
    """The Rollout of given responses (each ends with EOS) to the prompts, as if sampled:
    the same padding, masks and log-probs `rollout` computes. For tests and replays."""
    enc = _encode_prompts(tokenizer, prompts, cfg, policy.device)
    ids = [
        tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for r in responses
    ]
    R = max(len(i) for i in ids)
    response = torch.tensor(
        [i + [tokenizer.pad_token_id] * (R - len(i)) for i in ids], device=policy.device
    )  # [B, R]
    seq = torch.cat([enc["input_ids"], response], dim=1)  # [B, P+R]
    return _logprobs_of(policy, ref, tokenizer, list(prompts), enc["attention_mask"], seq, cfg)


def _encode_prompts(tokenizer, prompts: Sequence[str], cfg: PPOConfig, device):
    """The prompts left-padded (the policy's tokenizer pads left) and cut to
    --ppo-max-prompt-length, on device."""
    return tokenizer(
        list(prompts),
        padding=True,
        truncation=True,
        max_length=cfg.max_prompt_length,
        return_tensors="pt",
    ).to(device)


def _logprobs_of(policy, ref, tokenizer, prompts, prompt_attn, seq, cfg: PPOConfig) -> Rollout:
    """Masks, positions, texts and both log-probs of sequences [B, P+R] (P: prompt_attn's;
    R: cut to the longest response)."""
    P = prompt_attn.shape[1]
    is_eos = (seq[:, P:] == tokenizer.eos_token_id).long()
    mask = ((is_eos.cumsum(-1) - is_eos) == 0).long()  # up to and including the first EOS
    R = int(mask.sum(-1).max())
    seq, mask = seq[:, : P + R], mask[:, :R]  # columns past every response's end: none
    response = seq[:, P:]  # [B, R]
    attn = torch.cat([prompt_attn, mask], dim=1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    packed = pack(seq, attn, mask, P, share_rows=packs(policy, ref))
    logp, _ = packed_logprobs(policy, packed, cfg.temperature)
    ref_logp, _ = packed_logprobs(ref, packed, cfg.temperature)
    texts = [
        tokenizer.decode(r[m.bool()], skip_special_tokens=True)
        for r, m in zip(response.cpu(), mask.cpu(), strict=True)  # one copy, not one per row
    ]
    return Rollout(prompts, seq, attn, pos, P, mask.float(), texts, logp, ref_logp)


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


def shaped_rewards(
    logp: torch.Tensor, ref_logp: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, beta
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kl, rewards), both [B, R]: kl = log pi - log pi_ref per response token, rewards =
    -beta * kl at every token plus the RM score [B] at each response's last token."""
    kl = (logp - ref_logp) * mask  # [B, R] per-token KL estimate
    rewards = -beta * kl
    last = mask.sum(-1).long() - 1  # [B] index of the last response token
    rewards[torch.arange(len(last), device=last.device), last] += scores
    return kl, rewards


@dataclass
class Experience:
    """What a rollout is worth, computed once before the update epochs."""

    scores: torch.Tensor  # [B] RM score of each response, bias applied
    values: torch.Tensor  # [B, R] value estimate at each response token, at sampling time
    kl: torch.Tensor  # [B, R] log pi - log pi_ref
    rewards: torch.Tensor  # [B, R] shaped_rewards
    advantages: torch.Tensor  # [B, R] GAE, whitened over the global batch
    returns: torch.Tensor  # [B, R] advantages + values: the value model's target


@torch.no_grad()
def experience(
    ro: Rollout, reward_model, reward_tokenizer, value_head: ValueHead, cfg: PPOConfig
) -> Experience:
    """Score the responses, shape the rewards with the KL penalty, run GAE.

    reward_model: the RM, or a ValueHead around it; value_head: a ValueHead around the
    value model (not DDP around one): both are called through their forward, which a
    sharded (FSDP) one needs."""
    scores = score_texts(reward_model, reward_tokenizer, ro.prompts, ro.texts)  # [B]
    packed = pack(ro.seq, ro.attn, ro.mask, ro.prompt_len, share_rows=packs(value_head))
    values = packed_values(value_head, packed)  # [B, R]
    kl, rewards = shaped_rewards(ro.logp, ro.ref_logp, scores, ro.mask, cfg.kl_beta)
    advantages, returns = gae(rewards, values, ro.mask, cfg.gamma, cfg.lam)
    advantages = masked_whiten(advantages, ro.mask)
    return Experience(scores, values, kl, rewards, advantages, returns)


def ppo_losses(
    *,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    v_new: torch.Tensor,
    v_old: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cfg: PPOConfig,
    denominator: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(pg_loss, vf_loss, stats): clipped policy loss and clipped value loss, token means
    over `mask` ([b, R] tensors). denominator: see masked_mean (None: this batch's mean)."""
    ratio = torch.exp(logp - old_logp)
    pg_loss = masked_mean(
        torch.max(
            -advantages * ratio,
            -advantages * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range),
        ),
        mask,
        denominator,
    )
    v_clipped = v_old + (v_new - v_old).clamp(-cfg.value_clip_range, cfg.value_clip_range)
    vf_loss = 0.5 * masked_mean(
        torch.max((v_new - returns) ** 2, (v_clipped - returns) ** 2), mask, denominator
    )
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > cfg.clip_range).float()
        stats = {"clipfrac": masked_mean(clipped, mask).item()}
    return pg_loss, vf_loss, stats


def ptx_loss(policy, tokenizer, texts: Sequence[str], cfg: PPOConfig) -> torch.Tensor:
    """PPO-ptx: the language-model loss of demonstration texts, a token mean over the
    global batch of texts (this rank's texts' summed loss over distributed.mean_denominator).

    A text is a whole document: it ends with EOS (so the policy keeps learning where
    answers stop) and is kept up to a prompt's and a response's length.
    """
    device = next(policy.parameters()).device
    enc = tokenizer(
        [t + tokenizer.eos_token for t in texts],
        padding=True,
        truncation=True,
        max_length=cfg.max_prompt_length + cfg.max_new_tokens,
        return_tensors="pt",
    ).to(device)
    pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    # Targets: every token but a text's first (nothing precedes it; under left padding
    # it would be "predicted" from a pad, and the loss would depend on the padding).
    labels = enc["input_ids"].masked_fill((enc["attention_mask"] == 0) | (pos == 0), -100)
    n_tokens = (labels[:, 1:] != -100).sum()  # the model shifts labels: token t+1 from t
    denominator = distributed.mean_denominator(n_tokens)
    with autocast(device):
        return policy(**enc, position_ids=pos, labels=labels, num_items_in_batch=denominator).loss


def ppo_step(
    *,
    policy,
    value_head,
    optim: torch.optim.Optimizer,
    ro: Rollout,
    exp: Experience,
    idx: torch.Tensor,
    cfg: PPOConfig,
    tokenizer=None,
    ptx_texts: Sequence[str] = (),
) -> dict:
    """One gradient step on the episodes `idx` of this rank's rollout: clipped policy
    loss + vf_coef * clipped value loss (+ ptx_coef * ptx_loss on `ptx_texts`).

    policy and value_head (a ValueHead) are DDP-wrapped under torchrun. The token means
    divide by the valid tokens of the minibatch on ALL ranks (distributed.mean_denominator),
    so DDP's averaged gradient is that of the global token mean, whatever each rank's
    response lengths. The forwards run over the minibatch packed (pack): the losses of the
    padded minibatch, over its real tokens. Returns the step's stats (global means of the
    losses).
    """
    device = ro.seq.device
    n_tokens = ro.mask[idx].sum()
    denominator = distributed.mean_denominator(n_tokens)
    share_rows = packs(policy, value_head)
    pk = pack(ro.seq[idx], ro.attn[idx], ro.mask[idx], ro.prompt_len, share_rows)
    R = pk.targets.shape[1]
    mask = ro.mask[idx, :R]  # [g, R]
    with autocast(device):  # the forwards; backward runs in their dtypes
        logp, entropy = packed_logprobs(policy, pk, cfg.temperature)
        v_new = packed_values(value_head, pk)  # [g, R]
    pg_loss, vf_loss, stats = ppo_losses(
        logp=logp, old_logp=ro.logp[idx, :R], advantages=exp.advantages[idx, :R],
        v_new=v_new, v_old=exp.values[idx, :R], returns=exp.returns[idx, :R],
        mask=mask, cfg=cfg, denominator=denominator,
    )  # fmt: skip
    loss = pg_loss + cfg.vf_coef * vf_loss
    clipped = stats["clipfrac"] * mask.sum()  # tokens
    sums = torch.stack([pg_loss.detach(), vf_loss.detach(), clipped, (entropy * mask).sum()])
    losses = [sums[0], sums[1]]
    if ptx_texts:  # PPO-ptx: gamma * log-likelihood of demonstration text, in the same step
        ptx = ptx_loss(policy, tokenizer, ptx_texts, cfg)
        loss = loss + cfg.ptx_coef * ptx
        losses.append(ptx.detach())
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
    torch.nn.utils.clip_grad_norm_(value_head.parameters(), cfg.max_grad_norm)
    optim.step()
    means = (distributed.all_sum(torch.stack(losses)) / distributed.world_size()).tolist()
    clipped, entropy = (sums[2:] / n_tokens.clamp(min=1)).tolist()  # this rank's token means
    stats = {"clipfrac": clipped, "pg_loss": means[0], "vf_loss": means[1], "entropy": entropy}
    if ptx_texts:
        stats["ptx_loss"] = means[2]
    return stats


# ---------------------------------------------------------------------------- the run


FSDP_LORA = (
    "--sharding fsdp trains full weights only: a LoRA round (--kind lora) under torchrun "
    "needs --sharding ddp (peft adapters under FSDP2 are not supported here)"
)


def check_world(cfg: PPOConfig, world: int, ptx: bool, sharding: str = "ddp") -> None:
    """Under torchrun every rank takes an equal share of each global batch, so that every
    rank runs the same number of minibatch steps (each one a DDP all-reduce)."""
    if world == 1:
        return
    sizes = {
        "--ppo-rollout-prompts": cfg.rollout_prompts,
        "--ppo-minibatch-size": cfg.minibatch_size,
    }
    if ptx:
        sizes["--ppo-ptx-batch-size"] = cfg.ptx_batch_size
    for name, size in sizes.items():
        if size % world:
            raise ValueError(f"{name} {size} must be a multiple of the {world} ranks")
    if cfg.rollout_engine != "hf":
        raise ValueError("under torchrun PPO samples with --ppo-rollout-engine hf only")
    if cfg.lora and sharding == "fsdp":
        raise ValueError(FSDP_LORA)


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
    sharding: str = "ddp",
) -> dict:
    """Run PPO and save the policy to out_dir. Returns metrics with a per-iteration history.

    policy_dir: the policy to improve (a full checkpoint); ref_dir: the KL reference
    (default: policy_dir, i.e. the SFT policy); reward_dir: the RM; value_dir: where the
    value model starts (default: the RM); ptx_texts: text for the PPO-ptx term.
    stop: checked before every iteration; once set, PPOStopped is raised (nothing saved).
    device: where all four models run; the saved policy is float32 either way.
    sharding: under torchrun, "ddp" (the trained models replicated on every rank) or
    "fsdp" (all four sharded with FSDP2, full weights only; distributed.wrap); the saved
    policy is a full checkpoint either way.
    """
    if not prompts:
        raise ValueError("PPO needs at least one prompt")
    if cfg.rollout_engine not in ("hf", "vllm"):
        raise ValueError(f"rollout_engine must be 'hf' or 'vllm', not {cfg.rollout_engine!r}")
    world = distributed.world_size()
    check_world(cfg, world, ptx=cfg.ptx_coef > 0 and bool(ptx_texts), sharding=sharding)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)  # the same global batches on every rank

    # ---- models: policy (trained), reference (frozen), value (trained), reward (frozen)
    home = distributed.load_device(device, sharding)  # FSDP: the host; wrap places them
    policy, tokenizer = load_policy(policy_dir, lora=cfg.lora, device=home)
    ref, _ = load_policy(ref_dir or policy_dir, device=home)
    reward_model, reward_tokenizer = load_reward_model(reward_dir, device=home)
    value_model, _ = load_reward_model(value_dir or reward_dir, device=home)
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
    # What the update's forwards run through: DDP under torchrun (the models themselves
    # otherwise); sampling and scoring use the models, without gradients. With FSDP all
    # four are sharded in place (policy_net is policy, value_net is value_head) and the
    # frozen two as well, so that no rank holds any whole model.
    value_head, reward_head = ValueHead(value_model), ValueHead(reward_model)
    policy_net = distributed.wrap(policy, device, sharding)
    value_net = distributed.wrap(value_head, device, sharding)
    ref = distributed.wrap(ref, device, sharding)
    reward_head = distributed.wrap(reward_head, device, sharding)
    if world > 1:
        torch.manual_seed(cfg.seed + distributed.rank())  # each rank samples its own
    optim = torch.optim.AdamW(
        [
            {"params": [p for p in policy.parameters() if p.requires_grad]},
            {"params": value_model.parameters(), "lr": cfg.value_learning_rate},
        ],
        lr=cfg.learning_rate,
        eps=1e-5,
        foreach=True,  # one kernel per op for all tensors (CUDA's default; CPU's is a loop)
    )
    ptx_order = list(ptx_texts) if cfg.ptx_coef > 0 else []
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
            if distributed.any_rank(stop is not None and stop.is_set()):
                raise PPOStopped(f"PPO stopped before iteration {it}/{cfg.iterations}")
            # ------------------------------------------------------------ 1. rollout
            t0 = time.perf_counter()
            batch_prompts = [rng.choice(prompts) for _ in range(cfg.rollout_prompts)]
            if engine is not None and it > 1:
                engine.sync(policy)  # the engine samples from the weights updated last
            with autocast(device):  # this rank's share of the global batch
                ro = rollout(policy, ref, tokenizer, distributed.shard(batch_prompts), cfg, engine)
            t1 = time.perf_counter()

            # ------------------------------------------------------------ 2. reward, 3. GAE
            with autocast(device):
                exp = experience(ro, reward_head, reward_tokenizer, value_head, cfg)
            t2 = time.perf_counter()

            # ------------------------------------------------------------ 4. update
            stats: dict[str, list[float]] = {}
            B = ro.seq.shape[0]  # this rank's episodes: rollout_prompts / world
            for _ in range(cfg.ppo_epochs):
                for idx in torch.randperm(B).to(device).split(cfg.minibatch_size // world):
                    texts = []
                    if ptx_order:  # this rank's share of the step's ptx batch
                        texts = [
                            ptx_order[(ptx_cursor + j) % len(ptx_order)]
                            for j in range(cfg.ptx_batch_size)
                        ]
                        ptx_cursor += cfg.ptx_batch_size
                    step = ppo_step(
                        policy=policy_net,
                        value_head=value_net,
                        optim=optim,
                        ro=ro,
                        exp=exp,
                        idx=idx,
                        cfg=cfg,
                        tokenizer=tokenizer,
                        ptx_texts=distributed.shard(texts),
                    )
                    for k, v in step.items():
                        stats.setdefault(k, []).append(v)
            t3 = time.perf_counter()

            # ------------------------------------------------------------ logging
            # Sums over the global batch: score, KL and reward per sequence, tokens, episodes.
            totals = distributed.all_sum(
                torch.stack(
                    [
                        exp.scores.sum(),
                        exp.kl.sum(),
                        exp.rewards.sum(),
                        ro.mask.sum(),
                        torch.tensor(float(B), device=ro.mask.device),
                    ]
                )
            ).tolist()
            n = totals[4]
            episodes += int(n)
            timing["rollout_s"] += t1 - t0
            timing["scoring_s"] += t2 - t1
            timing["update_s"] += t3 - t2
            row = {
                "iteration": it,
                "score": totals[0] / n,
                "kl": totals[1] / n,  # per sequence, summed over tokens
                "reward": totals[2] / n,
                "response_len": totals[3] / n,
                "episodes_per_s": episodes / (time.perf_counter() - t_start),
                **{k: sum(v) / len(v) for k, v in stats.items() if v},
            }
            history.append(row)
            if distributed.is_main() and (it % cfg.log_every == 0 or it == cfg.iterations):
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
    full = distributed.full_state_dict(policy)  # FSDP: gathered on rank 0; else None
    if not distributed.is_main():  # rank 0 alone saves
        return {"iterations": cfg.iterations, "episodes": episodes, "history": history}

    # ---- save: a full checkpoint, or only the adapter
    out = Path(out_dir)
    policy.save_pretrained(out, state_dict=full)
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
        kls.append(ro.kl())
    return {
        "mean_score": torch.cat(scores).mean().item(),
        "kl": torch.cat(kls).mean().item(),
        "episodes": len(batch),
    }

"""Step 2 of InstructGPT: a reward model trained on rankings with the K-wise loss.

The model is an HF sequence classifier with one output (AutoModelForSequenceClassification,
num_labels=1): the policy's backbone plus a linear `score` head. The reward of
(prompt, answer) is the head applied to the hidden state of the last token of
prompt + answer + EOS. The same head applied at every position gives per-token values,
which is how PPO's value model starts from the RM (`token_values`).

The loss (Ouyang et al. 2022, eq. 1): for a prompt with K ranked answers,

    loss = -1/C(K,2) * sum over pairs (w better than l) of log sigmoid(r(x, y_w) - r(x, y_l))

All pairs of one prompt form ONE batch element, and each of the K answers is forwarded
ONCE: the pair terms are differences of K scalars. Ties (answers in the same tier) give no
pair. Shuffling pairs as independent examples would forward each answer K-1 times and,
the paper found, overfit.

After one epoch, a bias makes demonstrations score mean 0 (the paper normalised the RM so
labeler demonstrations have mean score 0 before RL). The bias is stored in the model's
config as `reward_offset` and subtracted by every scoring function here.

Device: the model lives where load_reward_model put it and every function here sends its
inputs to `model.device`; train_reward_model runs its forward passes under bf16 autocast
on CUDA (learner/device.py), and scores come back as float32 either way. Under torchrun
each rank trains its shard of every batch of prompts through DDP (reward_step) and rank 0
alone sets the bias, evaluates and saves (learner/distributed.py). With sharding "fsdp"
the model is sharded with FSDP2 instead: the same step, the same normalisation; every rank
then takes part in the bias and the held-out scoring, and in gathering the full weights
that rank 0 saves.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from instructloop.learner import distributed
from instructloop.learner.config import RewardConfig
from instructloop.learner.dataset import Comparison, Demonstration
from instructloop.learner.device import autocast

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- the loss


def pairs_from_tiers(tiers: Sequence[int]) -> list[tuple[int, int]]:
    """(winner, loser) index pairs of every two answers in different tiers (0 = best)."""
    k = len(tiers)
    return [
        (i, j) if tiers[i] < tiers[j] else (j, i)
        for i in range(k)
        for j in range(i + 1, k)
        if tiers[i] != tiers[j]
    ]


def kwise_loss(scores: torch.Tensor, tiers: Sequence[int]) -> tuple[torch.Tensor, int]:
    """InstructGPT loss of one prompt: -mean over its pairs of log sigmoid(r_w - r_l).

    scores: [K] rewards of the K answers; tiers: [K] tier of each answer (0 = best).
    Returns (loss, number of pairs); the loss is 0 when every answer is tied.
    """
    pairs = pairs_from_tiers(tiers)
    if not pairs:
        return scores.sum() * 0.0, 0
    w, lose = torch.tensor(pairs, device=scores.device).unbind(-1)  # [P], [P]
    return -F.logsigmoid(scores[w] - scores[lose]).mean(), len(pairs)


def with_demonstrations(
    comparisons: Sequence[Comparison], demonstrations: Sequence[Demonstration]
) -> tuple[list[Comparison], int]:
    """Each comparison whose prompt has a demonstration, with the demonstration added as
    the best answer: tier 0, shared with any sample that says the same (after strip), the
    sampled tiers moved down one. Still one batch element with each answer forwarded once.
    Returns the comparisons and how many got a demonstration."""
    demo_of: dict[str, str] = {}
    for d in demonstrations:
        demo_of.setdefault(d.prompt_id, d.text)
    out, joined = [], 0
    for c in comparisons:
        demo = demo_of.get(c.prompt_id)
        if demo is None or not demo.strip():
            out.append(c)
            continue
        tiers = [
            0 if a.strip() == demo.strip() else t + 1
            for a, t in zip(c.answers, c.tiers, strict=True)
        ]
        out.append(replace(c, answers=[demo, *c.answers], tiers=[0, *tiers]))
        joined += 1
    return out, joined


# ---------------------------------------------------------------------------- the model


def load_reward_model(
    model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
):
    """(model, tokenizer) from a policy base (new head) or a previous RM dir (warm start)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"  # the score is read at the end: keep the end
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


def encode(tokenizer, prompts: Sequence[str], answers: Sequence[str], max_length: int) -> dict:
    """Right-padded prompt + answer + EOS, the exact text format the RM scores."""
    texts = [p + a + tokenizer.eos_token for p, a in zip(prompts, answers, strict=True)]
    return tokenizer(
        texts,
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        add_special_tokens=True,
    )


def token_values(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids=None
) -> torch.Tensor:
    """The score head at every position: [B, T]. One backbone forward for the batch."""
    # use_cache=False: no KV cache to build; and without one, position ids that restart
    # mark packed sequences (ppo.pack), which transformers keeps apart
    hidden = model.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    ).last_hidden_state  # [B, T, H]
    offset = getattr(model.config, "reward_offset", 0.0)
    return model.score(hidden).squeeze(-1).float() - offset  # [B, T], float32 under autocast


class ValueHead(torch.nn.Module):
    """token_values as a module's forward. The trainers call the RM and the value model
    through it so that DDP (distributed.wrap) runs the forward whose gradients it syncs,
    and so that under FSDP the root's forward gathers the embeddings and the score head;
    calling `model.base_model` and `model.score` directly would bypass either."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        return token_values(self.model, input_ids, attention_mask, position_ids)  # [B, T]


def at_last_token(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values [B, T] of right-padded rows, read at each row's last real token: [B]."""
    last = attention_mask.sum(-1) - 1  # [B]
    return values[torch.arange(values.shape[0], device=values.device), last]


def end_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward of each right-padded row, read at its last real token: [B]. model: an RM,
    or a ValueHead around one (called through its forward: a sharded one must be)."""
    head = model if isinstance(model, ValueHead) else ValueHead(model)
    return at_last_token(head(input_ids, attention_mask), attention_mask)


@torch.no_grad()
def score_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    max_length: int = 512,
    batch_size: int = 64,
) -> torch.Tensor:
    """Rewards of (prompt, answer) pairs: [N], with the demonstration bias applied.
    model: an RM, or a ValueHead around one (end_scores)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = encode(
            tokenizer, prompts[i : i + batch_size], answers[i : i + batch_size], max_length
        ).to(model.device)
        out.append(end_scores(model, enc["input_ids"], enc["attention_mask"]))
    return torch.cat(out) if out else torch.zeros(0, device=model.device)


@torch.no_grad()
def judgement_agreement(
    model, tokenizer, comparisons: Sequence[Comparison], max_length: int = 512, batch_size: int = 64
) -> list[tuple[float, int]]:
    """Per comparison: (pairs where the RM prefers what the judgement preferred, pairs).

    A pair the RM scores equal counts half. Every answer of every comparison is forwarded
    once, in batches of `batch_size` sequences, so scoring a round's comparisons costs one
    forward pass over their answers (labeler quality, quality.py; held-out accuracy)."""
    prompts = [c.prompt for c in comparisons for _ in c.answers]
    answers = [a for c in comparisons for a in c.answers]
    scores = score_texts(model, tokenizer, prompts, answers, max_length, batch_size).tolist()
    out, start = [], 0
    for c in comparisons:
        s = scores[start : start + len(c.answers)]  # [K]
        start += len(c.answers)
        pairs = pairs_from_tiers(c.tiers)
        agree = sum(1.0 if s[w] > s[lose] else 0.5 if s[w] == s[lose] else 0.0 for w, lose in pairs)
        out.append((agree, len(pairs)))
    return out


def pairwise_accuracy(
    model, tokenizer, comparisons: Sequence[Comparison], max_length: int = 512, batch_size: int = 64
) -> tuple[float, int]:
    """Fraction of (better, worse) pairs the RM orders correctly, and the number of pairs."""
    per = judgement_agreement(model, tokenizer, comparisons, max_length, batch_size)
    correct, total = sum(a for a, _ in per), sum(n for _, n in per)
    return (correct / total if total else float("nan")), total


# ---------------------------------------------------------------------------- training


def kwise_losses(
    head, tokenizer, batch: Sequence[Comparison], max_length: int, device
) -> tuple[torch.Tensor, int]:
    """K-wise loss of each prompt that has a pair ([n]) and the number of pairs: every
    answer of every prompt in ONE forward of `head` (a ValueHead, DDP around one, or a
    sharded one)."""
    prompts = [c.prompt for c in batch for _ in c.answers]
    answers = [a for c in batch for a in c.answers]
    enc = encode(tokenizer, prompts, answers, max_length).to(device)  # [sum K, T]
    values = head(enc["input_ids"], enc["attention_mask"])  # [sum K, T]
    scores = at_last_token(values, enc["attention_mask"])  # [sum K]
    losses, n_pairs, start = [], 0, 0
    for c in batch:
        loss, n = kwise_loss(scores[start : start + len(c.answers)], c.tiers)
        start += len(c.answers)
        if n:
            losses.append(loss)
            n_pairs += n
    return torch.stack(losses), n_pairs


def kwise_step_loss(
    model, tokenizer, batch: Sequence[Comparison], max_length: int
) -> tuple[torch.Tensor, int]:
    """Mean K-wise loss of a batch of prompts: every answer of every prompt in ONE forward."""
    losses, n_pairs = kwise_losses(ValueHead(model), tokenizer, batch, max_length, model.device)
    return losses.mean(), n_pairs


def reward_step(
    head, optim, tokenizer, batch: Sequence[Comparison], cfg: RewardConfig, device
) -> tuple[float, int]:
    """One optimizer step on a GLOBAL batch of prompts (each with at least one pair).

    The loss is the mean over the batch's prompts of their K-wise loss. Under torchrun
    each rank forwards its shard and divides its SUM by the global prompt count over the
    world size, so DDP's gradient average is the gradient of the global mean (a per-rank
    mean would weigh a rank's prompts by 1/its own count); FSDP's reduce-scatter averages
    the same way. A rank whose shard is empty (a last batch smaller than the world) still
    forwards one prompt, times 0: DDP's all-reduce and FSDP's gathers need every rank's
    forward and backward. Returns (the global mean loss, its pairs).
    """
    mine = distributed.shard(list(batch))
    with autocast(device):  # the forward only: backward runs in the forward's dtypes
        losses, _ = kwise_losses(head, tokenizer, mine or batch[:1], cfg.max_length, device)
    if not mine:
        losses = losses * 0.0
    loss = losses.sum() / distributed.mean_denominator(len(mine))
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.max_grad_norm)
    optim.step()
    n_pairs = sum(len(pairs_from_tiers(c.tiers)) for c in batch)
    return distributed.all_sum(loss.detach()).item() / distributed.world_size(), n_pairs


def train_reward_model(
    cfg: RewardConfig,
    comparisons: Sequence[Comparison],
    init_dir: str | Path,
    out_dir: str | Path,
    heldout: Sequence[Comparison] = (),
    demonstrations: Sequence[Demonstration] = (),
    device: str | torch.device = "cpu",
    ranked_demonstrations: Sequence[Demonstration] = (),
    sharding: str = "ddp",
) -> dict:
    """Train one RM version and save it to out_dir (HF format). Returns its metrics.

    init_dir is the policy's base (new head) or the previous RM (warm start). The bias is
    set so that `demonstrations` score mean 0; without any, the answers of `comparisons`
    are used instead (and the metrics say so). The checkpoint is saved in float32 wherever
    it trained (device.py). `ranked_demonstrations` join the comparisons of their prompts
    as the best answer (with_demonstrations). sharding: "ddp" or "fsdp" under torchrun
    (distributed.wrap); the checkpoint is a full one either way.
    """
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_reward_model(init_dir, device=distributed.load_device(device, sharding))
    model.train()
    head = distributed.wrap(ValueHead(model), device, sharding)  # DDP or FSDP under torchrun
    sharded = distributed.is_sharded(head)  # then every rank scores and gathers below
    optim = torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    comparisons, with_demo = with_demonstrations(comparisons, ranked_demonstrations)
    usable = [c for c in comparisons if pairs_from_tiers(c.tiers)]
    steps_per_epoch = math.ceil(len(usable) / cfg.batch_prompts)
    log.info(
        "reward model: %d comparisons, %d steps/epoch x %d epochs, from %s",
        len(usable),
        steps_per_epoch,
        cfg.epochs,
        init_dir,
    )

    rng = random.Random(cfg.seed)
    step, total_pairs, t0 = 0, 0, time.perf_counter()
    recent_loss: list[float] = []
    for _ in range(cfg.epochs):
        order = list(usable)
        rng.shuffle(order)  # shuffle prompts; the pairs of one prompt stay together
        for i in range(0, len(order), cfg.batch_prompts):
            batch = order[i : i + cfg.batch_prompts]
            loss, n_pairs = reward_step(head, optim, tokenizer, batch, cfg, device)
            step += 1
            total_pairs += n_pairs
            recent_loss.append(loss)
            if step % cfg.log_every == 0 or step == steps_per_epoch * cfg.epochs:
                dt = time.perf_counter() - t0
                log.info(
                    "rm step %d/%d loss %.4f  %.1f comparisons/s",
                    step,
                    steps_per_epoch * cfg.epochs,
                    sum(recent_loss[-cfg.log_every :]) / len(recent_loss[-cfg.log_every :]),
                    total_pairs / dt,
                )
    train_seconds = time.perf_counter() - t0
    model.eval()
    if not distributed.is_main() and not sharded:  # rank 0 alone sets the bias, evaluates
        return {"steps": step, "pairs": total_pairs, "train_seconds": train_seconds}  # & saves
    # Sharded (FSDP), every rank forwards the same batches for the bias and the held-out
    # accuracy (each holds a shard of every layer), and rank 0 alone saves.
    scorer = head if sharded else model

    # ---- bias: demonstrations score mean 0 (before RL)
    if demonstrations:
        bias_on = "demonstrations"
        prompts, answers = [d.prompt for d in demonstrations], [d.text for d in demonstrations]
    else:
        bias_on = "ranked answers"
        prompts = [c.prompt for c in usable for _ in c.answers]
        answers = [a for c in usable for a in c.answers]
    if prompts:
        with autocast(device):
            mean = score_texts(
                scorer, tokenizer, prompts, answers, cfg.max_length, cfg.eval_batch_size
            )
        model.config.reward_offset = getattr(model.config, "reward_offset", 0.0) + float(
            mean.mean()
        )

    tail_loss = recent_loss[-cfg.log_every :]
    metrics = {
        "comparisons": len(usable),
        "with_demonstration": with_demo,
        "pairs": total_pairs,
        "steps": step,
        "train_loss": sum(tail_loss) / max(1, len(tail_loss)),
        "train_seconds": train_seconds,
        "comparisons_per_s": total_pairs / train_seconds if train_seconds else 0.0,
        "reward_offset": float(getattr(model.config, "reward_offset", 0.0)),
        "bias_on": bias_on,
        "init_dir": str(init_dir),
        "device": str(device),
    }
    if heldout:
        with autocast(device):
            acc, n = pairwise_accuracy(
                scorer, tokenizer, heldout, cfg.max_length, cfg.eval_batch_size
            )
        metrics.update(heldout_accuracy=acc, heldout_pairs=n)
        if distributed.is_main():
            log.info("rm held-out pairwise accuracy %.3f on %d pairs", acc, n)

    full = distributed.full_state_dict(head)  # FSDP: gathered on rank 0; None: not sharded
    if not distributed.is_main():
        return {"steps": step, "pairs": total_pairs, "train_seconds": train_seconds}
    out = Path(out_dir)
    if full is None:
        model.save_pretrained(out)
    else:  # the head's keys are "model." + the RM's
        model.save_pretrained(out, state_dict={k[len("model.") :]: v for k, v in full.items()})
    tokenizer.save_pretrained(out)
    (out / "instructloop_reward.json").write_text(
        json.dumps({"config": asdict(cfg), "metrics": metrics}, indent=2) + "\n"
    )
    return metrics

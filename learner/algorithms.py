"""Step 3 of a round, by algorithm: how the round's data becomes the candidate policy.

`instructloop learn --algorithm ppo|dpo|grpo|rloo|sft` picks one (AlignConfig). Whatever
it picks, the round around it is the same (rounds.py): the RM is trained, the candidate
saved here is judged by the gate with that RM, published with its lineage, and promoted
only if the gate passed. TRL ships DPO, GRPO and RLOO; we call its trainers, we do not
re-implement them.

  ppo   our PPO (ppo.py): the logged prompts, our RM's reward with a per-token KL
        penalty to the reference (the round's SFT policy; the base before any SFT),
        a value model from the RM. Budget: --ppo-iterations x --ppo-rollout-prompts
        samples.
  dpo   TRL DPOTrainer on the pairs of the round's training comparisons (the ones the
        RM trains on): every two answers in different tiers give (chosen, rejected),
        ties give none (reward.pairs_from_tiers). Reference = the round's reference,
        passed to TRL as `ref_model`; beta = --dpo-beta. No RM and no sampling in the
        training itself. Budget: one epoch over the pairs (the paper's RM rule for the
        same comparisons: more overfits) unless --dpo-epochs / --dpo-max-steps say else.
        TRL treats each pair as an example (the RM forwards each answer once per prompt).
  grpo  TRL GRPOTrainer / RLOOTrainer: --rl-num-generations samples per logged prompt,
  rloo  rewarded by OUR RM (RewardModelScore, on the learner's device), advantages
        against the group (GRPO: group-normalised; RLOO: leave-one-out mean), KL
        (--rl-beta) to the reference. TRL builds that reference itself, from the policy's
        `config._name_or_path` (normally the initial policy, as TRL's docs say): we set
        that name to the round's reference dir before TRL loads it, so the reference is
        ours, as PPO's is. GRPO adds beta x a per-token KL estimate (k3) to its loss;
        RLOO subtracts beta x the response's summed log-ratio from its reward (PPO's
        penalty, summed). kl_first/kl_last here are TRL's logged KL per response token,
        not per response as PPO's and the gate's. Budget: as many samples as PPO would generate
        (--ppo-iterations x --ppo-rollout-prompts) unless --rl-episodes says else, in
        steps of --rl-batch-size samples (default --ppo-rollout-prompts).
  sft   demonstrations only: the candidate IS the round's SFT policy (the round trained
        it in phase 1); no RM-driven training. A round without a new SFT run has nothing
        to offer and is skipped (rounds.py).

Plain text, as the server logs it: prompts are raw text ("reverse: abc\\n"), TRL's
standard (not conversational) format; TRL appends EOS to DPO's answers and GRPO/RLOO's
samples end with the EOS that stopped them (a sample cut at the length limit has none,
as in PPO), so the candidate learns to end its answers like the server's samples do. The
RM scores prompt + completion + EOS, as everywhere else (reward.encode).

Refused at start (main.Configs): dpo/grpo/rloo/sft with --kind lora (they train or copy
full weights) and under torchrun (TRL's trainers are untested in our process group).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from instructloop.learner.config import ALGORITHMS, AlignConfig, PPOConfig
from instructloop.learner.dataset import Comparison, Demonstration
from instructloop.learner.ppo import PPOStopped, load_policy, train_ppo
from instructloop.learner.reward import load_reward_model, pairs_from_tiers, score_texts

log = logging.getLogger(__name__)

__all__ = [
    "ALGORITHMS",
    "train_policy",
    "dpo_pairs",
    "RewardModelScore",
    "ptx_texts",
    "nothing_to_offer",
    "round_metrics",
]

NAN = float("nan")
PRETRAIN_SEED = 0  # PretrainConfig's default seed: the corpus the shipped base learned from


# ---------------------------------------------------------------------------- the data


def dpo_pairs(comparisons: Sequence[Comparison]) -> list[dict[str, str]]:
    """TRL's preference rows {prompt, chosen, rejected}: one per pair of answers in
    different tiers (pairs_from_tiers); a comparison of K answers gives up to C(K,2)."""
    return [
        {"prompt": c.prompt, "chosen": c.answers[w], "rejected": c.answers[lose]}
        for c in comparisons
        for w, lose in pairs_from_tiers(c.tiers)
    ]


def ptx_texts(cfg: PPOConfig, demonstrations: Sequence[Demonstration]) -> list[str]:
    """PPO-ptx's language-model text (empty with ptx_coef 0): the demonstrations
    (prompt + answer), or the first --ppo-ptx-documents documents of the base's
    pretraining corpus (InstructGPT's pretraining mix), never the held-out seed."""
    if cfg.ptx_coef <= 0:
        return []
    if cfg.ptx_data == "corpus":
        from instructloop.pretrain import HELDOUT_CORPUS_SEED, pretraining_corpus

        assert PRETRAIN_SEED != HELDOUT_CORPUS_SEED
        return pretraining_corpus(PRETRAIN_SEED, cfg.ptx_documents)
    return [d.prompt + d.text for d in demonstrations]


class RewardModelScore:
    """A TRL reward function: our RM's score of each (prompt, completion), the score PPO
    and the gate use (reward.score_texts: prompt + completion + EOS, demonstration bias
    removed). It remembers the mean score of each call (one call = one step's samples)."""

    __name__ = "reward_model"  # TRL logs rewards/<name>

    def __init__(self, reward_dir: str | Path, device: str = "cpu"):
        from instructloop.learner.device import autocast

        self.model, self.tokenizer = load_reward_model(reward_dir, device=device)
        self.model.eval()
        self.autocast = lambda: autocast(device)
        self.step_means: list[float] = []  # mean score of each call, in order
        self.samples = 0

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **_) -> list[float]:
        with self.autocast():
            scores = score_texts(self.model, self.tokenizer, list(prompts), list(completions))
        self.step_means.append(scores.mean().item())
        self.samples += len(completions)
        return scores.float().cpu().tolist()


# ---------------------------------------------------------------------------- one entry


def train_policy(
    algorithm: str,
    *,
    ppo_cfg: PPOConfig,
    align_cfg: AlignConfig,
    prompts: Sequence[str],
    comparisons: Sequence[Comparison],
    policy_dir: Path,
    reward_dir: Path | None,
    ref_dir: Path,
    out_dir: Path,
    ptx_texts: Sequence[str] = (),
    device: str = "cpu",
    stop: threading.Event | None = None,
    sharding: str = "ddp",
) -> dict:
    """Train the round's candidate with `algorithm`, save an HF dir (left padding side
    tokenizer, like learner/sft.py) at out_dir; return metrics with at least:
    episodes (policy samples generated; 0 for dpo/sft), pairs (dpo), steps (optimizer
    steps), seconds, score_first/score_last (mean RM score of the samples at the first
    and last steps; NaN where none), kl_last (NaN where not measured).

    Raises PPOStopped (nothing saved) if `stop` was set during training."""
    if algorithm == "ppo":
        return train_ppo(
            cfg=ppo_cfg, prompts=prompts, policy_dir=policy_dir, reward_dir=reward_dir,
            out_dir=out_dir, ref_dir=ref_dir, ptx_texts=ptx_texts, stop=stop, device=device,
            sharding=sharding,
        )  # fmt: skip
    if algorithm == "sft":  # the SFT policy the round trained is the candidate
        t0 = time.perf_counter()
        shutil.copytree(policy_dir, out_dir)
        return {
            "algorithm": "sft", "episodes": 0, "pairs": 0, "steps": 0,
            "seconds": time.perf_counter() - t0, "score_first": NAN, "score_last": NAN,
            "kl_last": NAN,
        }  # fmt: skip
    if algorithm == "dpo":
        return _train_dpo(ppo_cfg, align_cfg, comparisons, policy_dir, ref_dir, out_dir,
                          device, stop)  # fmt: skip
    if algorithm in ("grpo", "rloo"):
        if reward_dir is None:
            raise ValueError(f"{algorithm} needs a reward model")
        return _train_group(algorithm, ppo_cfg, align_cfg, prompts, policy_dir, reward_dir,
                            ref_dir, out_dir, device, stop)  # fmt: skip
    raise ValueError(f"unknown algorithm {algorithm!r}: one of {', '.join(ALGORITHMS)}")


def nothing_to_offer(
    algorithm: str,
    *,
    sft_ran: bool,
    new_demonstrations: int,
    min_demonstrations: int,
    new_comparisons: int,
) -> str:
    """Why `algorithm` can make no candidate this round ("" when it can): sft without a
    new SFT run, dpo without new comparisons. rounds.py then skips the round."""
    if algorithm == "sft" and not sft_ran:
        return (
            f"{new_demonstrations} new training demonstrations, an SFT run needs "
            f"{min_demonstrations}"
        )
    if algorithm == "dpo" and not new_comparisons:
        return "no new training comparisons"
    return ""


def round_metrics(algorithm: str, m: dict) -> dict[str, float]:
    """The policy stage's numbers in a version's metrics (floats). PPO keeps its ppo_*
    keys (bench/ppo.py and the tests read them); the others write policy_*."""
    if algorithm == "ppo":
        return {
            "ppo_score_first": m["score_first"], "ppo_score_last": m["score_last"],
            "ppo_kl_last": m["kl_last"], "ppo_episodes": m["episodes"],
            "ppo_rollout_s": m["rollout_s"], "ppo_scoring_s": m["scoring_s"],
            "ppo_update_s": m["update_s"],
        }  # fmt: skip
    keys = ("score_first", "score_last", "kl_last", "episodes", "pairs", "steps", "seconds")
    out = {f"policy_{k}": float(m[k]) for k in keys}
    if "margin_last" in m:
        out["policy_margin_first"], out["policy_margin_last"] = m["margin_first"], m["margin_last"]
    return out


# ---------------------------------------------------------------------------- TRL plumbing


def _common_args(ppo_cfg: PPOConfig, device: str) -> dict:
    """What every TRL trainer here runs with: CPU or our CUDA device, no checkpoints, no
    reporting, no tqdm, no vLLM, float32 weights (bf16 autocast on CUDA), as sft.py."""
    import torch

    on_cuda = torch.device(device).type == "cuda"
    return dict(
        save_strategy="no", report_to=[], use_cpu=not on_cuda, bf16=on_cuda,
        gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True,
        logging_steps=1, seed=ppo_cfg.seed,
    )  # fmt: skip


def _run(trainer, algorithm: str, stop: threading.Event | None):
    """trainer.train() with our logger instead of the Trainer's prints, stoppable."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    class Control(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if stop is not None and stop.is_set():
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            shown = {k: round(v, 4) for k, v in (logs or {}).items() if k in LOGGED}
            if shown:  # not the summary log at the end
                log.info("%s step %d/%d %s", algorithm, state.global_step, state.max_steps, shown)

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(Control())
    result = trainer.train()
    if stop is not None and stop.is_set():
        raise PPOStopped(f"{algorithm} stopped at step {result.global_step}")
    return result


LOGGED = ("loss", "reward", "kl", "rewards/margins", "rewards/accuracies")


def _history(trainer, key: str) -> list[float]:
    return [float(row[key]) for row in trainer.state.log_history if key in row]


def _tail_mean(values: list[float]) -> float:
    """The mean of the last quarter (at least one value), as PPO's *_last metrics."""
    if not values:
        return NAN
    tail = values[-max(1, len(values) // 4) :]
    return sum(tail) / len(tail)


def _save(trainer, tokenizer, out_dir: Path, record: dict) -> None:
    out = Path(out_dir)
    trainer.save_model(str(out))
    (out / "training_args.bin").unlink(missing_ok=True)  # a pickle: not part of a version
    tokenizer.padding_side = "left"  # what the server and PPO expect of a policy dir
    tokenizer.save_pretrained(out)
    (out / f"instructloop_{record['metrics']['algorithm']}.json").write_text(
        json.dumps(record, indent=2) + "\n"
    )


def _load(policy_dir: Path):
    """The starting policy as PPO loads it (an adapter merged into its base), on the CPU:
    the Trainer moves it to its device. Left padding, as TRL's generation expects."""
    return load_policy(policy_dir, lora=False)


# ---------------------------------------------------------------------------- DPO


def _train_dpo(ppo_cfg, align_cfg: AlignConfig, comparisons, policy_dir, ref_dir, out_dir,
               device, stop) -> dict:  # fmt: skip
    import torch
    from datasets import Dataset as HFDataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    rows = dpo_pairs(comparisons)
    if not rows:
        raise ValueError("DPO needs at least one pair of answers in different tiers")
    t0 = time.perf_counter()
    model, tokenizer = _load(policy_dir)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    log.info("dpo: %d pairs of %d comparisons, beta %g, from %s, reference %s",
             len(rows), len(comparisons), align_cfg.dpo_beta, policy_dir, ref_dir)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="dpo-trainer-") as scratch:
        args = DPOConfig(
            output_dir=scratch, beta=align_cfg.dpo_beta,
            learning_rate=align_cfg.dpo_learning_rate,
            per_device_train_batch_size=align_cfg.dpo_batch_size,
            num_train_epochs=align_cfg.dpo_epochs, max_steps=align_cfg.dpo_max_steps or -1,
            **_common_args(ppo_cfg, device),
        )  # fmt: skip
        trainer = DPOTrainer(
            model=model, ref_model=ref, args=args, processing_class=tokenizer,
            train_dataset=HFDataset.from_list(rows),
        )  # fmt: skip
        result = _run(trainer, "dpo", stop)
        margins = _history(trainer, "rewards/margins")
        metrics = {
            "algorithm": "dpo", "episodes": 0, "pairs": len(rows),
            "steps": result.global_step, "seconds": time.perf_counter() - t0,
            "train_loss": float(result.training_loss), "score_first": NAN,
            "score_last": NAN, "kl_last": NAN,
            "margin_first": margins[0] if margins else NAN, "margin_last": _tail_mean(margins),
            "accuracy_last": _tail_mean(_history(trainer, "rewards/accuracies")),
            "device": str(device),
        }  # fmt: skip
        _save(trainer, tokenizer, out_dir, {"config": asdict(align_cfg), "metrics": metrics})
    log.info("dpo done: %d steps on %d pairs, margin %.3f -> %.3f, %.1fs", metrics["steps"],
             len(rows), metrics["margin_first"], metrics["margin_last"],
             metrics["seconds"])  # fmt: skip
    return metrics


# ---------------------------------------------------------------------------- GRPO / RLOO


def group_budget(ppo_cfg: PPOConfig, align_cfg: AlignConfig) -> tuple[int, int]:
    """(samples per optimizer step, steps): PPO's sample budget unless --rl-episodes."""
    batch = align_cfg.rl_batch_size or ppo_cfg.rollout_prompts
    if batch % align_cfg.rl_num_generations:
        raise ValueError(
            f"--rl-batch-size {batch} must be a multiple of --rl-num-generations "
            f"{align_cfg.rl_num_generations} (whole groups per step)"
        )
    episodes = align_cfg.rl_episodes or ppo_cfg.iterations * ppo_cfg.rollout_prompts
    return batch, math.ceil(episodes / batch)


def _train_group(algorithm, ppo_cfg, align_cfg: AlignConfig, prompts, policy_dir, reward_dir,
                 ref_dir, out_dir, device, stop) -> dict:  # fmt: skip
    from datasets import Dataset as HFDataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    if not prompts:
        raise ValueError(f"{algorithm} needs at least one prompt")
    grpo = algorithm == "grpo"
    Config, Trainer = (GRPOConfig, GRPOTrainer) if grpo else (RLOOConfig, RLOOTrainer)
    batch, steps = group_budget(ppo_cfg, align_cfg)
    group = align_cfg.rl_num_generations
    # TRL's sampler drops a last incomplete set of prompts: repeat the list to fill one.
    prompts = list(prompts) * math.ceil((batch // group) / len(prompts))
    t0 = time.perf_counter()
    model, tokenizer = _load(policy_dir)
    # TRL loads its reference from this name (trl get_config_model_id): make it ours.
    model.config._name_or_path = str(ref_dir)
    reward = RewardModelScore(reward_dir, device=device)
    log.info("%s: %d prompts, %d steps of %d samples (groups of %d), beta %g, from %s, "
             "reference %s", algorithm, len(prompts), steps, batch, group, align_cfg.rl_beta,
             policy_dir, ref_dir)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix=f"{algorithm}-trainer-") as scratch:
        args = Config(
            output_dir=scratch, max_steps=steps, per_device_train_batch_size=batch,
            gradient_accumulation_steps=1, num_generations=group,
            learning_rate=align_cfg.rl_learning_rate, beta=align_cfg.rl_beta,
            max_completion_length=align_cfg.rl_max_completion_length or ppo_cfg.max_new_tokens,
            temperature=ppo_cfg.temperature, use_vllm=False, **_common_args(ppo_cfg, device),
        )  # fmt: skip
        trainer = Trainer(
            model=model, reward_funcs=reward, args=args, processing_class=tokenizer,
            train_dataset=HFDataset.from_list([{"prompt": p} for p in prompts]),
        )  # fmt: skip
        model.config._name_or_path = str(policy_dir)  # the reference is loaded: undo
        result = _run(trainer, algorithm, stop)
        metrics = {
            "algorithm": algorithm, "episodes": reward.samples, "pairs": 0,
            "steps": result.global_step, "seconds": time.perf_counter() - t0,
            "train_loss": float(result.training_loss),
            "score_first": reward.step_means[0] if reward.step_means else NAN,
            "score_last": _tail_mean(reward.step_means),
            "kl_first": (_history(trainer, "kl") or [NAN])[0],
            "kl_last": _tail_mean(_history(trainer, "kl")), "device": str(device),
        }  # fmt: skip
        _save(trainer, tokenizer, out_dir, {"config": asdict(align_cfg), "metrics": metrics})
    log.info("%s done: %d steps, %d samples, RM score %.3f -> %.3f, kl %.4f, %.1fs", algorithm,
             metrics["steps"], metrics["episodes"], metrics["score_first"],
             metrics["score_last"], metrics["kl_last"], metrics["seconds"])  # fmt: skip
    return metrics

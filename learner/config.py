"""Every config of the learner, in one light module (no torch, no transformers).

One dataclass per component, every field documented (TRL style); `instructloop learn`
builds its options from them (learner/cli.py), and importing this module costs nothing,
so the `instructloop` command stays fast for the client subcommands. The trainers
re-export their own config (reward.RewardConfig, ppo.PPOConfig, sft.SFTStepConfig).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _data_root() -> Path:
    """The deployment's local data directory, shared with `instructloop serve`."""
    return Path(os.environ.get("INSTRUCTLOOP_DATA_DIR", "./data"))


@dataclass
class LearnerConfig:
    """The learner process: where its inputs and outputs live."""

    redis_url: str = field(
        default="",
        metadata={
            "secret": True,
            "help": "Redis holding the streams and the registry (the server's): "
            "redis://host:6379/0, rediss:// (TLS), redis+cluster://host:port[,host:port] "
            "or redis+sentinel://host:26379[,host:port]/SERVICE. Empty: the server's "
            "embedded Redis, unix://$INSTRUCTLOOP_DATA_DIR/redis/redis.sock.",
        },
    )
    redis_prefix: str = field(
        default="instructloop", metadata={"help": "Key prefix of the deployment in Redis."}
    )
    model_store: str = field(
        default_factory=lambda: str(_data_root() / "store"),
        metadata={"help": "Model store directory (shared with the server)."},
    )
    data_dir: str = field(
        default_factory=lambda: str(_data_root() / "learner"),
        metadata={"help": "The learner's own directory: dataset, round state, RMs, SFT."},
    )
    registry_key_file: str = field(
        default="",
        metadata={
            "help": "The deployment's registry key (shared with the servers), to sign the "
            "versions it registers. Empty: registry-key beside --data-dir (DATA_DIR/"
            "registry-key with the defaults), created on first use."
        },
    )
    heldout_fraction: float = field(
        default=0.1,
        metadata={"help": "Fraction of users (keyed hash) held out for the RM and the gate."},
    )
    split_salt_file: str = field(
        default="",
        metadata={
            "help": "The deployment's secret key of the held-out split (HMAC of the user "
            "id), so that no caller can choose user ids that land in the held-out set the "
            "gate judges by; it also seeds the gate's sample of held-out prompts. Empty: "
            "split-salt beside --data-dir (DATA_DIR/split-salt with the defaults), created "
            "0600 on first use. Never logged; changing it reshuffles the split."
        },
    )
    lease_ttl_s: float = field(
        default=30.0,
        metadata={
            "help": "TTL of the single-learner lease in Redis, renewed every third of it; a "
            "second learner waits, and takes over at most this long after the first dies."
        },
    )
    keep_versions: int = field(
        default=20,
        metadata={
            "help": "Retention of the model store: after each round all but the newest N "
            "versions are unregistered and deleted, never an alias target (current, previous, "
            "canary) nor the weights a kept LoRA version needs (0 keeps every version)."
        },
    )
    store_max_gib: float = field(
        default=0.0,
        metadata={
            "help": "Bound of the model store in GiB: a publish that would pass it fails with "
            "a clear error and the serving version stays (0: only the volume's free space)."
        },
    )
    round_retry_s: float = field(
        default=30.0,
        metadata={
            "help": "Wait after a round that failed (ENOSPC, OOM, a corrupt version...) before "
            "the next try; it doubles with each consecutive failure, up to "
            "--round-retry-max-s. Every failure is recorded in DATA_DIR/failed-rounds.jsonl."
        },
    )
    round_retry_max_s: float = field(
        default=1800.0, metadata={"help": "Longest wait between tries of a failing round."}
    )
    max_rounds: int = field(
        default=0, metadata={"help": "Exit after this many published rounds (0 = never)."}
    )
    torch_threads: int = field(
        default=0, metadata={"help": "torch intra-op threads (0 = torch's default)."}
    )
    device: str = field(
        default="auto",
        metadata={
            "help": "Where SFT, the reward model, PPO and the gate run: 'auto' (cuda when "
            "available, else cpu), 'cpu', 'cuda' or 'cuda:N' (SFT's Trainer picks its own "
            "GPU). On CUDA forward passes use bf16 autocast; weights and checkpoints stay "
            "float32, as on CPU. Under torchrun a CUDA device means cuda:LOCAL_RANK on "
            "each rank (learner/distributed.py)."
        },
    )
    sharding: str = field(
        default="ddp",
        metadata={
            "help": "Under torchrun, how the reward model's training and PPO's four models "
            "are spread over the ranks: 'ddp' (every rank holds whole models) or 'fsdp' "
            "(FSDP2 fully_shard per decoder layer: each rank holds 1/N of every weight). "
            "'fsdp' takes full-weight rounds only (not --kind lora). SFT runs DDP either "
            "way, and the gate and the labeler-quality scoring load whole models on rank "
            "0's device. Without torchrun: no effect."
        },
    )

    @property
    def resolved_redis_url(self) -> str:
        """--redis-url, or the embedded Redis that `instructloop serve` starts by default."""
        if self.redis_url:
            return self.redis_url
        return f"unix://{(_data_root() / 'redis' / 'redis.sock').resolve()}"


@dataclass
class RoundConfig:
    """When a round starts, what it publishes, and the gate a candidate must pass."""

    min_comparisons: int = field(
        default=64, metadata={"help": "New comparisons that start a round at once (N)."}
    )
    max_wait_s: float = field(
        default=3600.0,
        metadata={"help": "Seconds after which a round starts with less than N new (T)."},
    )
    min_new_feedback: int = field(
        default=1,
        metadata={"help": "New judgements (any kind) a timed round needs at least."},
    )
    kind: str = field(
        default="full",
        metadata={
            "help": "What a round publishes: 'full' weights or a 'lora' adapter over the "
            "serving full weights (this sets --ppo-lora)."
        },
    )
    win_rate_threshold: float = field(
        default=0.55,
        metadata={"help": "Gate: RM-estimated win rate against the serving version to beat."},
    )
    max_kl: float = field(
        default=20.0,
        metadata={"help": "Gate: bound on the KL to the reference (nats per response)."},
    )
    gate_reward_model: str = field(
        default="policy",
        metadata={
            "help": "The RM that judges the gate. 'policy': the round's RM, the one the "
            "candidate was optimised against. 'second': a second RM trained on the same "
            "comparisons from the same start with the next seed (its own head and batch "
            "order), used by the gate only, so a candidate that learnt the quirks of its "
            "own RM is not judged by them (reward over-optimisation)."
        },
    )
    gate_prompts: int = field(
        default=64, metadata={"help": "Held-out prompts the gate samples (at most)."}
    )
    gate_samples_per_prompt: int = field(
        default=2, metadata={"help": "Samples per held-out prompt from each policy."}
    )
    gate_seed: int = field(default=1234, metadata={"help": "Sampling seed of the gate."})
    exclude_flagged: bool = field(
        default=True,
        metadata={
            "help": "Leave out all feedback and prompts of users the labeler-quality rule "
            "flags (learner/quality.py), as those of suspended users always are; the "
            "version records who was left out. Off: flags are only reported."
        },
    )
    flag_min_judgements: int = field(
        default=10,
        metadata={
            "help": "Judgements a user's quality measures need before the rule may flag it "
            "(a new user is not flagged on noise)."
        },
    )


@dataclass
class SFTStepConfig:
    """Step 1 of a round: fine-tuning on the new demonstrations (TRL SFTTrainer)."""

    min_demonstrations: int = field(
        default=16,
        metadata={"help": "New training-split demonstrations needed before a round runs SFT."},
    )
    from_base: bool = field(
        default=True,
        metadata={
            "help": "SFT trains the base model on every training demonstration so far (the "
            "paper's SFT model). Off: it fine-tunes the serving policy on the new ones."
        },
    )
    max_steps: int = field(
        default=50, metadata={"help": "Optimizer steps per SFT run (a few on CPU)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Demonstrations per step."})
    learning_rate: float = field(default=2e-5, metadata={"help": "AdamW learning rate."})
    max_length: int = field(
        default=512, metadata={"help": "Tokens of prompt + answer kept (the start)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the data order."})
    logging_steps: int = field(default=5, metadata={"help": "Log progress every N steps."})


@dataclass
class RewardConfig:
    """Training of one reward model version."""

    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    batch_prompts: int = field(
        default=8,
        metadata={"help": "Batch elements per step; one element = one prompt with all its pairs."},
    )
    epochs: int = field(
        default=1,
        metadata={"help": "Passes over the new comparisons (the paper: 1; more overfits)."},
    )
    max_length: int = field(
        default=512,
        metadata={"help": "Tokens of prompt + answer; longer inputs lose the prompt's start."},
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    retrain: bool = field(
        default=True,
        metadata={
            "help": "Each round trains a new RM from the SFT policy, one epoch over every "
            "training comparison so far (the paper's RM). Off: warm-start from the previous "
            "RM, one epoch over the new comparisons."
        },
    )
    demo_comparisons: bool = field(
        default=True,
        metadata={
            "help": "A demonstration of a ranked prompt joins its comparison as the best "
            "answer (tied with any sample that says the same), so the RM also learns that "
            "the written ideal beats what the policy sampled."
        },
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Sequences per scoring forward."})
    seed: int = field(default=0, metadata={"help": "Seed for the order of batch elements."})
    log_every: int = field(default=10, metadata={"help": "Log progress every N steps."})


@dataclass
class PPOConfig:
    """One PPO run (one round's step 3). Defaults follow InstructGPT where it says."""

    iterations: int = field(default=64, metadata={"help": "Rollout + update iterations."})
    rollout_prompts: int = field(default=16, metadata={"help": "Prompts sampled per iteration."})
    max_prompt_length: int = field(
        default=256, metadata={"help": "Prompt tokens kept (the end of a longer prompt)."}
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Response length limit."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    rollout_engine: str = field(
        default="hf",
        metadata={
            "help": "'hf' (transformers generate) or 'vllm' (a colocated vLLM engine; weights "
            "synced from the trainer after every update)."
        },
    )
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    minibatch_size: int = field(default=8, metadata={"help": "Episodes per gradient step."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Policy AdamW learning rate."})
    value_learning_rate: float = field(
        default=1e-5, metadata={"help": "Value model AdamW learning rate."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    kl_beta: float = field(
        default=0.02, metadata={"help": "Per-token KL penalty beta * (log pi - log pi_ref)."}
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount (the paper: 1)."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    clip_range: float = field(default=0.2, metadata={"help": "Policy ratio clip."})
    value_clip_range: float = field(default=0.2, metadata={"help": "Value change clip."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    ptx_coef: float = field(
        default=0.0,
        metadata={"help": "PPO-ptx gamma: weight of the LM loss on demonstration text (0 = off)."},
    )
    ptx_batch_size: int = field(default=4, metadata={"help": "ptx texts per gradient step."})
    ptx_data: str = field(
        default="demonstrations",
        metadata={
            "help": "PPO-ptx's language-model text (with --ppo-ptx-coef > 0): 'demonstrations' "
            "(every training demonstration so far, prompt + answer) or 'corpus' (the "
            "InstructGPT pretraining mix: documents of the base model's pretraining corpus, "
            "instructloop/pretrain.py, with PretrainConfig's default seed, the text the "
            "shipped base was trained on). Never the held-out corpus seed (99991) on which "
            "the alignment tax is measured."
        },
    )
    ptx_documents: int = field(
        default=1024,
        metadata={"help": "With --ppo-ptx-data corpus: how many corpus documents (the first N)."},
    )
    lora: bool = field(
        default=False, metadata={"help": "Train a LoRA adapter instead of full weights."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "peft target_modules for the adapter."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for prompt order and sampling."})
    log_every: int = field(default=1, metadata={"help": "Log every N iterations."})


ALGORITHMS = ("ppo", "dpo", "grpo", "rloo", "sft")
GATE_REWARD_MODELS = ("policy", "second")  # RoundConfig.gate_reward_model


@dataclass
class AlignConfig:
    """Step 3 of a round: which algorithm turns the round's data into the candidate, and
    the knobs of the TRL-trained ones (learner/algorithms.py). PPO's own are --ppo-*."""

    algorithm: str = field(
        default="ppo",
        metadata={
            "help": "ppo: our PPO against the RM, KL to the SFT reference (learner/ppo.py). "
            "dpo: TRL DPOTrainer on the pairs of the logged rankings, reference = the SFT "
            "policy. grpo | rloo: TRL GRPOTrainer / RLOOTrainer, our RM as the reward "
            "function on the logged prompts, KL (beta) to the SFT policy (TRL builds its "
            "reference from the policy's config name, which we point at the SFT policy). "
            "sft: the candidate is the round's SFT policy (demonstrations only); a round "
            "without a new SFT run is skipped. Every algorithm's candidate goes through the "
            "same RM, gate, store and registry. dpo, grpo, rloo and sft refuse --kind lora "
            "and torchrun."
        },
    )
    start_from_reference: bool = field(
        default=False,
        metadata={
            "help": "The algorithm starts each round from the reference (the latest SFT "
            "policy, or the base before any SFT) even when no SFT ran, as InstructGPT "
            "trained every PPO model from the SFT model. Off: a round without a new SFT "
            "run starts from the serving policy, so rounds add up. With no "
            "demonstrations, on: each round's candidate is the base optimised once against "
            "that round's RM, and its drift from the base does not pile up round on round; "
            "give it a round's worth of samples (--rl-episodes). Not with --kind lora."
        },
    )
    dpo_beta: float = field(
        default=0.1, metadata={"help": "DPO beta: strength of the implicit KL to the reference."}
    )
    dpo_learning_rate: float = field(default=1e-5, metadata={"help": "DPO AdamW learning rate."})
    dpo_batch_size: int = field(default=8, metadata={"help": "DPO pairs per optimizer step."})
    dpo_epochs: float = field(
        default=1.0,
        metadata={
            "help": "Passes over the round's pairs (1, the paper's rule for its RM on the same "
            "comparisons: more overfits)."
        },
    )
    dpo_max_steps: int = field(
        default=0, metadata={"help": "DPO optimizer steps; overrides --dpo-epochs (0 = off)."}
    )
    rl_num_generations: int = field(
        default=4,
        metadata={"help": "GRPO/RLOO group size: samples per prompt (the baseline's group)."},
    )
    rl_beta: float = field(
        default=0.05,
        metadata={"help": "GRPO/RLOO KL coefficient to the reference (0: no reference loaded)."},
    )
    rl_learning_rate: float = field(
        default=1e-5, metadata={"help": "GRPO/RLOO AdamW learning rate."}
    )
    rl_batch_size: int = field(
        default=0,
        metadata={
            "help": "GRPO/RLOO samples per optimizer step, a multiple of --rl-num-generations "
            "(0: --ppo-rollout-prompts)."
        },
    )
    rl_episodes: int = field(
        default=0,
        metadata={
            "help": "GRPO/RLOO samples generated in the round (0: PPO's budget, "
            "--ppo-iterations x --ppo-rollout-prompts), rounded up to whole steps."
        },
    )
    rl_max_completion_length: int = field(
        default=0,
        metadata={
            "help": "GRPO/RLOO response length limit (0: --ppo-max-new-tokens); the sampling "
            "temperature is --ppo-temperature."
        },
    )

"""The TRL side of bench/ppo_vs_trl.py: TRL 1.10's PPOTrainer on the benchmark's inputs.

TRL removed its PPO trainer after 1.10 (it lived in `trl.experimental.ppo`), and the
project's venv has a later TRL, so this script runs under a venv of its own that holds
TRL 1.10 over the project's torch and transformers (bench/ppo_vs_trl.py makes it). It
reads the inputs JSON that bench/ppo_vs_trl.py writes (policy, reference and reward
model dirs, prompts, settings), builds the trainer with those settings, times
`trainer.train()` alone (model loading and the trainer's setup are not timed) and
writes {"episodes", "seconds", "episodes_per_s", "last_log"} to --out.

`reward_model_for_trl` is what makes TRL read our reward model as ours does: it is
imported by the tests as well, so nothing here imports TRL at module level.

    <trl venv>/bin/python bench/ppo_trl_side.py --inputs inputs.json --out trl.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from instructloop.learner.reward import load_reward_model


class OffsetScore(torch.nn.Module):
    """Our RM's `score` head minus its `reward_offset` (learner/reward.py token_values).

    Our RM dirs keep the demonstration bias in the config, and our scoring subtracts it;
    TRL reads a reward as `model.score(hidden)` at the last token (get_reward) and knows
    no offset. The score head has no bias to fold it into, so the head is wrapped."""

    def __init__(self, score: torch.nn.Module, offset: float):
        super().__init__()
        self.score = score
        self.offset = offset

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden).float() - self.offset


def reward_model_for_trl(reward_dir: str | Path, device: str | torch.device = "cpu"):
    """Our RM dir as the sequence classifier TRL's PPOTrainer calls: the backbone under
    `base_model_prefix` and a `score` head giving, at every token, what our
    reward.token_values gives (so TRL's rewards and values are ours, offset included)."""
    model, _ = load_reward_model(reward_dir, device=device)
    offset = float(getattr(model.config, "reward_offset", 0.0))
    model.score = OffsetScore(model.score, offset)
    return model


def count_response_tokens(policy, eos_token_id: int) -> list[int]:
    """Wrap policy.generate to record each sample's response length (tokens up to and
    including the first EOS, as our PPO's mask counts them): the token budget both
    systems actually spent. Returns the list the lengths are appended to."""
    lengths: list[int] = []
    generate = policy.generate

    def counting_generate(*args, **kwargs):
        out = generate(*args, **kwargs)
        response = out.sequences[:, kwargs["input_ids"].shape[1] :]
        is_eos = (response == eos_token_id).long()
        lengths.extend(((is_eos.cumsum(-1) - is_eos) == 0).sum(-1).tolist())
        return out

    policy.generate = counting_generate
    return lengths


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", required=True, help="inputs JSON written by bench/ppo_vs_trl.py")
    p.add_argument("--out", required=True, help="where to write the timing JSON")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    inputs = json.loads(Path(args.inputs).read_text())
    s = inputs["settings"]
    torch.set_num_threads(s["threads"])

    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    device = s["device"]
    tokenizer = AutoTokenizer.from_pretrained(inputs["policy_dir"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(inputs["policy_dir"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(inputs["ref_dir"], dtype=torch.float32)
    reward = reward_model_for_trl(inputs["reward_dir"])
    value = reward_model_for_trl(inputs["reward_dir"])  # the value model starts from the RM
    lengths = count_response_tokens(policy, tokenizer.eos_token_id)
    queries = [
        tokenizer(p, truncation=True, max_length=s["max_prompt_length"])["input_ids"]
        for p in inputs["prompts"]
    ]
    dataset = Dataset.from_dict({"input_ids": queries})
    with tempfile.TemporaryDirectory(prefix="bench-ppo-trl-") as out_dir:
        config = PPOConfig(
            output_dir=out_dir,
            seed=s["seed"],
            # one rollout of `rollout_prompts` per iteration, split into minibatches of
            # `minibatch_size`, one optimizer step each (no gradient accumulation)
            per_device_train_batch_size=s["rollout_prompts"],
            gradient_accumulation_steps=1,
            num_mini_batches=s["rollout_prompts"] // s["minibatch_size"],
            num_ppo_epochs=s["ppo_epochs"],
            total_episodes=s["iterations"] * s["rollout_prompts"],
            local_rollout_forward_batch_size=s["rollout_prompts"],
            response_length=s["max_new_tokens"],
            temperature=s["temperature"],
            stop_token="eos",
            kl_coef=s["kl_beta"],
            kl_estimator="k1",
            cliprange=s["clip_range"],
            cliprange_value=s["value_clip_range"],
            vf_coef=s["vf_coef"],
            gamma=s["gamma"],
            lam=s["lam"],
            learning_rate=s["learning_rate"],
            lr_scheduler_type="constant",
            adam_epsilon=1e-5,
            # what is optional and not PPO: sample tables, evaluation, saving, reporting
            num_sample_generations=0,
            eval_strategy="no",
            save_strategy="no",
            report_to=[],
            logging_steps=1,
            disable_tqdm=True,
            use_cpu=device == "cpu",
            bf16=device.startswith("cuda"),  # ours autocasts to bf16 on CUDA too
            dataloader_num_workers=0,
        )
        trainer = PPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=policy,
            ref_model=ref,
            reward_model=reward,
            train_dataset=dataset,
            value_model=value,
        )
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0, cpu0 = time.perf_counter(), time.process_time()
        trainer.train()
        cpu_s = time.process_time() - cpu0
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    episodes = config.num_total_batches * config.batch_size
    logs = [row for row in trainer.state.log_history if "objective/scores" in row]
    result = {
        "system": f"trl {trl.__version__} experimental PPOTrainer",
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "episodes": episodes,
        "seconds": seconds,
        "episodes_per_s": episodes / seconds,
        "cpu_s": cpu_s,
        "response_tokens_mean": sum(lengths) / max(1, len(lengths)),
        "score_first": logs[0]["objective/scores"] if logs else None,
        "score_last": logs[-1]["objective/scores"] if logs else None,
        "last_log": logs[-1] if logs else None,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

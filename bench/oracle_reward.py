"""Can comparisons alone teach this base the tasks? RL with the labeler itself as reward.

With comparisons only (`simulate --demo-prob 0`) the local loop got at most 0.5% greedy
exact-match from the shipped base while its reward model's held-out accuracy was
0.77-0.82 (README, The whole loop). Is the reward model what fails, or the base? This
script takes the reward model out: TRL's GRPOTrainer (what the learner's `--algorithm
grpo` runs; here groups of 8, 64 samples a step, lr 3e-4, the learner's KL coefficient
0.05 to the base) trains the base on task prompts with the default labeler's own
judgement as the reward, which is the best a reward model trained on correct_concise's
rankings could learn. Two rewards, the same budget and seed, in one run:

  dense  correct_concise's ranking key as one number: 3 for the right answer, + 1 for a
         non-empty one, + its similarity to the right answer (difflib, steps of 0.1),
         - its length / 1000. It orders any samples exactly as the labeler ranks them;
  exact  1 for the right answer, 0 otherwise: exact-match itself. A group of samples
         with no right one has no advantage, so it teaches nothing.
  rm     (with --reward-model DIR) a reward model the learner trained, e.g. a round's
         `rm` of a `simulate --demo-prob 0` run (DATA_DIR/learner/rounds/rN/rm): its score,
         as the learner's GRPO uses it (algorithms.RewardModelScore). The same budget
         from the base, so the learned RM is judged apart from the loop's rounds.

Every --eval-every steps (and before the first): greedy and temperature-1 exact-match on
--eval-prompts held-out prompts, decoded as `simulate` measures a version
(loop/evaluate.py, 16 new tokens); how many greedy answers are right but for a final
"." (a diagnostic, not a success: the labeler and exact-match count them wrong); the
share of that stretch's training samples that were right; the KL to the base as the
learner's gate measures it (learner/gate.py: log pi - log pi_base summed over each
temperature-1 response, averaged; 2 samples of each of the first 64 held-out prompts),
to compare with the gate's bound (--max-kl, 20 nats); and four greedy answers.
Reported: each reward's curve, and the last greedy exact-match of each with the ratio
of the first reward's to the second's when two ran (none when the second's is 0).

    python bench/oracle_reward.py   # prints the table, writes bench/results/oracle_reward.json
    python bench/oracle_reward.py --rewards dense,rm --reward-model DATA_DIR/learner/rounds/r14/rm
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from benchlib import write_result  # bench/ is on sys.path as a script

ROOT = Path(__file__).resolve().parents[1]
REWARDS = ("dense", "exact", "rm")


class LabelerReward:
    """A TRL reward function computed from correct_concise's ranking key (or, for "rm",
    a learned reward model's score); it counts the right samples either way."""

    def __init__(self, kind: str, reward_model: str = ""):
        self.kind = self.__name__ = kind
        self.right = self.samples = 0  # since the last evaluation
        self.rm = None
        if kind == "rm":
            from instructloop.learner.algorithms import RewardModelScore

            self.rm = RewardModelScore(reward_model)

    def __call__(self, prompts, completions, **_) -> list[float]:
        from instructloop.loop.labelers import correct_concise_key

        out = []
        for prompt, text in zip(prompts, completions, strict=True):
            right, non_empty, similarity, minus_length = correct_concise_key(prompt, text)
            self.right += right
            self.samples += 1
            if self.kind == "exact":
                out.append(float(right))
            else:
                out.append(3.0 * right + non_empty + similarity + minus_length / 1000)
        return self.rm(prompts, completions) if self.rm else out


def train(args, kind: str, base: Path, prompts: list[str], decoder) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from instructloop.learner.config import PPOConfig
    from instructloop.learner.ppo import load_policy, rollout
    from instructloop.loop.evaluate import exact_match

    model, tokenizer = load_policy(base, lora=False)  # left padding, as versions are decoded
    ref, _ = load_policy(base, lora=False)
    ref.eval()
    kl_cfg = PPOConfig(max_new_tokens=16, temperature=1.0)
    kl_prompts = [p for p in decoder.prompts[:64] for _ in range(2)]
    reward = LabelerReward(kind, args.reward_model)
    curve: list[dict] = []
    t0 = time.perf_counter()

    def evaluate(model, step: int) -> None:
        rng = torch.get_rng_state()  # the decoder reseeds: keep training's own stream
        model.eval()
        answers = decoder.answers_of(model, tokenizer)
        greedy, sampled = answers.exact_match(decoder.prompts)
        but_period = exact_match(
            decoder.prompts, [a.strip().removesuffix(".") for a in answers.greedy]
        )
        with torch.no_grad():  # the gate's estimate (Rollout.kl), 64 prompts at a time
            kls = [
                rollout(model, ref, tokenizer, kl_prompts[i : i + 64], kl_cfg).kl()
                for i in range(0, len(kl_prompts), 64)
            ]
            kl = torch.cat(kls).mean().item()
        model.train()
        torch.set_rng_state(rng)
        row = {
            "step": step,
            "episodes": step * args.batch,
            "exact_greedy": greedy,
            "exact_sampled": sampled,
            "right_but_period_greedy": but_period,
            "train_right": reward.right / reward.samples if reward.samples else None,
            "kl_to_base": kl,
            "seconds": time.perf_counter() - t0,
            "examples": dict(zip(decoder.prompts[:4], answers.greedy[:4], strict=True)),
        }
        reward.right = reward.samples = 0
        curve.append(row)
        shown = "-" if row["train_right"] is None else f"{row['train_right']:.3f}"
        print(
            f"  {kind} step {step:4d} ({row['episodes']:5d} episodes): exact greedy "
            f"{greedy:.3f}, sampled {sampled:.3f}, right but for a final '.' {but_period:.3f}; "
            f"training samples right {shown}; KL to the base {kl:.2f} "
            f"({row['seconds']:.0f}s)",
            flush=True,
        )
        print(f"    greedy: {row['examples']}", flush=True)

    class Evaluate(TrainerCallback):
        def on_step_end(self, targs, state, control, model=None, **_):
            if state.global_step % args.eval_every == 0 or state.global_step == state.max_steps:
                evaluate(model, state.global_step)

    steps = -(-args.episodes // args.batch)
    with tempfile.TemporaryDirectory(prefix=f"oracle-{kind}-") as scratch:
        config = GRPOConfig(
            output_dir=scratch, max_steps=steps, per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=1, num_generations=args.group,
            learning_rate=args.lr, beta=args.beta, max_completion_length=16, temperature=1.0,
            use_vllm=False, save_strategy="no", report_to=[], use_cpu=True,
            disable_tqdm=True, logging_steps=args.eval_every, seed=args.seed,
        )  # fmt: skip
        trainer = GRPOTrainer(
            model=model, reward_funcs=reward, args=config, processing_class=tokenizer,
            train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        )  # fmt: skip
        evaluate(trainer.model, 0)
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(Evaluate())
        trainer.train()
    return {"curve": curve, "seconds": time.perf_counter() - t0}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="", help="base model dir (default: the shipped base)")
    parser.add_argument("--episodes", type=int, default=16384, help="samples per reward (16384)")
    parser.add_argument("--batch", type=int, default=64, help="samples per step (64)")
    parser.add_argument("--group", type=int, default=8, help="samples per prompt (8)")
    parser.add_argument(
        "--lr", type=float, default=3e-4, help="AdamW learning rate (3e-4; the learner's 1e-5)"
    )
    parser.add_argument("--beta", type=float, default=0.05, help="KL to the base (the learner's)")
    parser.add_argument("--eval-every", type=int, default=32, help="steps between evaluations")
    parser.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts (200)")
    parser.add_argument(
        "--rewards", default="dense,exact", help=f"which rewards to run, of {REWARDS} (dense,exact)"
    )
    parser.add_argument(
        "--reward-model", default="", help="the learner's RM dir that the 'rm' reward scores with"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    parser.add_argument(
        "--out",
        default=str(ROOT / "bench/results/oracle_reward.json"),
        help="JSON result path (default: bench/results/oracle_reward.json)",
    )
    args = parser.parse_args()
    if args.batch % args.group:
        parser.error("--batch must be a multiple of --group")
    torch.set_num_threads(args.threads)

    from instructloop.loop.ablate import evaluation_prompts
    from instructloop.loop.evaluate import CheckpointDecoder
    from instructloop.loop.tasks import make_prompt
    from instructloop.pretrain import ensure_base

    work = Path(tempfile.mkdtemp(prefix="bench-oracle-"))
    base = Path(args.base) if args.base else ensure_base(work / "base", progress=True)
    rng = random.Random(f"oracle-train-{args.seed}")
    prompts = [make_prompt(rng) for _ in range(4096)]
    decoder = CheckpointDecoder(
        evaluation_prompts(args.eval_prompts, args.seed, set(prompts)),
        max_tokens=16, temperature=1.0, seed=args.seed, threads=args.threads,
    )  # fmt: skip
    kinds = [k for k in args.rewards.split(",") if k]
    if unknown := set(kinds) - set(REWARDS):
        parser.error(f"--rewards: unknown {sorted(unknown)}; choose from {REWARDS}")
    if ("rm" in kinds) != bool(args.reward_model):
        parser.error("--rewards rm and --reward-model DIR go together")
    runs = {}
    for kind in kinds:
        print(f"GRPO from the base with the {kind} labeler reward", flush=True)
        runs[kind] = train(args, kind, base, prompts, decoder)

    print(f"\n{args.episodes} episodes each, groups of {args.group}, lr {args.lr}, "
          f"beta {args.beta}; {args.eval_prompts} held-out prompts\n")  # fmt: skip
    print("| episodes | " + " | ".join(
        f"{k}: exact greedy / sampled / right but for a final '.' / train right / KL to base"
        for k in kinds
    ) + " |")  # fmt: skip
    print("|---|" + "---|" * len(kinds))
    for i, row in enumerate(runs[kinds[0]]["curve"]):
        cells = []
        for kind in kinds:
            r = runs[kind]["curve"][i]
            right = "-" if r["train_right"] is None else f"{r['train_right']:.3f}"
            cells.append(
                f"{r['exact_greedy']:.3f} / {r['exact_sampled']:.3f} / "
                f"{r['right_but_period_greedy']:.3f} / {right} / {r['kl_to_base']:.2f}"
            )
        print(f"| {row['episodes']} | " + " | ".join(cells) + " |")
    final = {k: runs[k]["curve"][-1]["exact_greedy"] for k in kinds}
    ratio = None
    if len(kinds) == 2 and final[kinds[1]] > 0:
        ratio = final[kinds[0]] / final[kinds[1]]
    print(f"\nlast greedy exact-match: {final}" + (f", ratio {ratio:.2f}" if ratio else ""))
    write_result(args.out, args, runs=runs, final_exact_greedy=final, ratio=ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

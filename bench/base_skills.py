"""What a base model can do before the loop: the skill, the instruction, and SFT's reach.

The README's section "The base model" makes three claims about the default base; this
script measures them, for two bases side by side (default: the shipped base against
--against, for example the earlier `init-model DIR --final-period 1.0` base):

  instruction  greedy and temperature-1 exact-match on --eval-prompts held-out task
               prompts ("reverse: abc\\n"), decoded as `simulate` measures a version
               (loop/evaluate.py, 16 new tokens). A base that does not follow
               instructions scores ~0.
  free text    the same skills asked in the corpus's own phrasing: the greedy
               continuation of "reverse ixlzw and get " and of "sort h j f and get "
               (3-5 random letters, --free-text prompts each), right if its first word
               (for sort: its run of single letters) is the answer. The skill is there.
  SFT          TRL's SFTTrainer (the learner's run_sft) from the base on N correct
               demonstrations (--demos, each a separate run: --sft-steps steps of
               --sft-batch at --sft-lr), then greedy exact-match on the held-out prompts:
               how far demonstrations alone take this base.

Reported: a table of both bases and, per row, the ratio of the two.

    python bench/base_skills.py --against DIR   # writes bench/results/base_skills.json
"""

from __future__ import annotations

import argparse
import random
import re
import string
import tempfile
import time
from pathlib import Path

import torch
from benchlib import write_result  # bench/ is on sys.path as a script

ROOT = Path(__file__).resolve().parents[1]


def free_text_prompts(n: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, answer): n reversals then n sorts of 3-5 random letters."""
    rng = random.Random(f"free-text-{seed}")
    out = []
    for verb in ("reverse", "sort"):
        for _ in range(n):
            letters = [rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5))]
            if verb == "reverse":
                out.append((f"reverse {''.join(letters)} and get ", "".join(letters[::-1])))
            else:
                out.append((f"sort {' '.join(letters)} and get ", " ".join(sorted(letters))))
    return out


def free_text_right(items: list[tuple[str, str]], continuations: list[str]) -> dict[str, float]:
    """Share right per verb: the continuation's first word (sort: letters run) is the answer."""
    right: dict[str, list[bool]] = {"reverse": [], "sort": []}
    for (prompt, ans), text in zip(items, continuations, strict=True):
        verb = prompt.split()[0]
        m = re.match(r"[a-z]+" if verb == "reverse" else r"[a-z](?: [a-z])*\b", text)
        right[verb].append(bool(m) and m.group() == ans)
    return {verb: sum(r) / len(r) for verb, r in right.items()}


def measure(name: str, base: Path, args, eval_prompts, train_prompts, free) -> dict:
    from instructloop.learner.config import SFTStepConfig
    from instructloop.learner.dataset import Demonstration
    from instructloop.learner.sft import run_sft
    from instructloop.loop.evaluate import CheckpointDecoder, load_checkpoint
    from instructloop.loop.tasks import answer

    decoder = CheckpointDecoder(
        eval_prompts, max_tokens=16, temperature=1.0, seed=args.seed, threads=args.threads
    )
    row: dict = {"base": str(base)}
    model, tokenizer = load_checkpoint(base)  # once, for both decodes below
    greedy, sampled = decoder.answers_of(model, tokenizer).exact_match(eval_prompts)
    row["instruction_greedy"], row["instruction_sampled"] = greedy, sampled
    print(f"  {name}: instruction exact-match greedy {greedy:.3f}, sampled {sampled:.3f}")

    free_decoder = CheckpointDecoder(
        [p for p, _ in free], max_tokens=12, temperature=0.0, seed=args.seed, threads=args.threads
    )
    row["free_text"] = free_text_right(free, free_decoder.answers_of(model, tokenizer).greedy)
    print(f"  {name}: free text right {row['free_text']}")

    row["sft"] = {}
    for n in args.demos:
        demos = [
            Demonstration(f"d{i}", f"p{i}", "bench", p, answer(p))
            for i, p in enumerate(train_prompts[:n])
        ]
        cfg = SFTStepConfig(
            max_steps=args.sft_steps, batch_size=args.sft_batch, learning_rate=args.sft_lr
        )
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="bench-base-sft-") as out:
            run_sft(cfg, demos, base, out)
            exact, _ = decoder.answers(out).exact_match(eval_prompts)
        row["sft"][n] = exact
        print(f"  {name}: SFT on {n} demonstrations: greedy exact-match {exact:.3f} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)  # fmt: skip
    return row


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="", help="base model dir (default: the shipped base)")
    parser.add_argument("--against", required=True, help="the second base model dir")
    parser.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts (200)")
    parser.add_argument("--free-text", type=int, default=150, help="prompts per verb (150)")
    parser.add_argument(
        "--demos", default="150,300,1000", help="demonstration counts, one SFT run each"
    )
    parser.add_argument("--sft-steps", type=int, default=250, help="SFT steps per run (250)")
    parser.add_argument("--sft-batch", type=int, default=16, help="demonstrations a step (16)")
    parser.add_argument("--sft-lr", type=float, default=3e-4, help="SFT learning rate (3e-4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    parser.add_argument(
        "--out",
        default=str(ROOT / "bench/results/base_skills.json"),
        help="JSON result path (default: bench/results/base_skills.json)",
    )
    args = parser.parse_args()
    args.demos = [int(n) for n in args.demos.split(",") if n]
    torch.set_num_threads(args.threads)

    from instructloop.loop.ablate import evaluation_prompts
    from instructloop.loop.tasks import make_prompt
    from instructloop.pretrain import SHIPPED_BASE

    rng = random.Random(f"base-skills-train-{args.seed}")
    train_prompts = [make_prompt(rng) for _ in range(max(args.demos, default=0))]
    eval_prompts = evaluation_prompts(args.eval_prompts, args.seed, set(train_prompts))
    free = free_text_prompts(args.free_text, args.seed)
    bases = {"base": Path(args.base or SHIPPED_BASE), "against": Path(args.against)}
    rows = {}
    for name, path in bases.items():
        print(f"{name}: {path}", flush=True)
        rows[name] = measure(name, path, args, eval_prompts, train_prompts, free)

    def cells(r: dict) -> list[float]:
        return [
            r["instruction_greedy"], r["instruction_sampled"],
            r["free_text"]["reverse"], r["free_text"]["sort"],
            *(r["sft"][n] for n in args.demos),
        ]  # fmt: skip

    heads = ["instruction greedy", "instruction sampled", "free-text reverse", "free-text sort"]
    heads += [f"SFT {n} demos, greedy" for n in args.demos]
    a, b = cells(rows["base"]), cells(rows["against"])
    print(f"\n{args.eval_prompts} held-out prompts; {args.free_text} free-text prompts a verb; "
          f"SFT {args.sft_steps} steps of {args.sft_batch} at lr {args.sft_lr}\n")  # fmt: skip
    print("| measure | base | against | base / against |")
    print("|---|---|---|---|")
    ratios = {}
    for head, x, y in zip(heads, a, b, strict=True):
        ratios[head] = x / y if y else None
        shown = "-" if ratios[head] is None else f"{ratios[head]:.2f}"
        print(f"| {head} | {x:.3f} | {y:.3f} | {shown} |")
    write_result(args.out, args, bases={k: str(v) for k, v in bases.items()}, runs=rows,
                 ratios=ratios)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

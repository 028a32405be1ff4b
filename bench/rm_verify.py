"""Can the reward model tell a right answer from a wrong one, where PPO needs it to?

PPO can beat the SFT policy on the task set only if its reward model prefers right
answers to the SFT policy's near misses. This script builds that situation from the
shipped base, with no loop run, and compares the learner's RM with what the SFT policy
itself already knows:

  1. SFT: the base fine-tuned on --demonstrations correct answers (the local loop's SFT
     settings: 400 steps of 16 at lr 3e-4);
  2. samples: K=8 answers at temperature 1 from the SFT policy to --comparisons training
     prompts and 150 held-out prompts, ranked by the default labeler (correct_concise);
  3. the learner's RM (the local loop's settings: from the SFT policy, lr 5e-4, one epoch,
     demonstrations ranked first on 80% of the prompts), trained on the training rankings;
  4. the SFT policy's own log-likelihood of each answer (summed over its tokens and EOS),
     trained on nothing more;
  5. the sharpening bound: the labeler's win rate of the SFT policy's greedy answer over
     its temperature-1 sample on 300 prompts. A PPO policy that only sharpened the SFT
     policy would win about this often against it.

Both scorers are measured on the held-out rankings: pairwise accuracy over all pairs, and
right-vs-wrong accuracy over the pairs where exactly one answer is the correct one (0.5
for a constant scorer). Medians over --seeds; the ratio is RM / SFT log-likelihood.

    python bench/rm_verify.py     # prints a table, writes bench/results/rm_verify.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from benchlib import spread  # bench/ is on sys.path as a script

ROOT = Path(__file__).resolve().parents[1]
K = 8


def _tiers(prompt: str, samples: list[str]) -> list[int]:
    from instructloop.loop.labelers import check_ranking, correct_concise

    tiers = [0] * len(samples)
    for t, item in enumerate(check_ranking(correct_concise(prompt, samples), len(samples))):
        for i in item:
            tiers[i] = t
    return tiers


@torch.no_grad()
def _sample(policy, tok, prompts: list[str], n: int, temperature: float) -> list[list[str]]:
    out = []
    for i in range(0, len(prompts), 32):
        batch = [p for p in prompts[i : i + 32] for _ in range(n)]
        enc = tok(batch, return_tensors="pt", padding=True)
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            if temperature > 0
            else {"do_sample": False}
        )
        seq = policy.generate(
            **enc, max_new_tokens=16, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, **sampling,
        )  # fmt: skip
        texts = tok.batch_decode(seq[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        out += [texts[j * n : (j + 1) * n] for j in range(len(texts) // n)]
    return out


@torch.no_grad()
def loglik(policy_dir: Path, prompts: list[str], answers: list[str]) -> list[float]:
    """log pi(answer + EOS | prompt) under the policy at policy_dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_dir)
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    out = []
    for i in range(0, len(prompts), 64):
        ps, ans = prompts[i : i + 64], answers[i : i + 64]
        enc = tok([p + a + tok.eos_token for p, a in zip(ps, ans, strict=True)],
                  return_tensors="pt", padding=True)  # fmt: skip
        starts = torch.tensor([len(tok(p)["input_ids"]) for p in ps])  # first answer token
        ids, att = enc["input_ids"], enc["attention_mask"]
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits[:, :-1], -1)
        logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, T-1]: log p of token t+1
        positions = torch.arange(1, ids.shape[1])[None]
        mask = (positions >= starts[:, None]) & (att[:, 1:] == 1)
        out += (logp * mask).sum(-1).tolist()
    return out


def accuracies(comparisons, scores: list[float]) -> dict:
    """Pairwise accuracy over all pairs, and over (right, wrong) pairs; ties count half."""
    from instructloop.learner.reward import pairs_from_tiers
    from instructloop.loop.tasks import answer

    agree = {"all": [0.0, 0], "right_vs_wrong": [0.0, 0]}
    start = 0
    for c in comparisons:
        s = scores[start : start + len(c.answers)]
        start += len(c.answers)
        right = answer(c.prompt)
        for w, lose in pairs_from_tiers(c.tiers):
            ok = 1.0 if s[w] > s[lose] else 0.5 if s[w] == s[lose] else 0.0
            kinds = ["all"]
            if c.answers[w].strip() == right and c.answers[lose].strip() != right:
                kinds.append("right_vs_wrong")
            for kind in kinds:
                agree[kind][0] += ok
                agree[kind][1] += 1
    return {k: a / n if n else float("nan") for k, (a, n) in agree.items()} | {
        "pairs": agree["all"][1],
        "right_vs_wrong_pairs": agree["right_vs_wrong"][1],
    }


def one_seed(args, seed: int, work: Path) -> dict:
    from instructloop.learner.config import RewardConfig, SFTStepConfig
    from instructloop.learner.dataset import Comparison, Demonstration
    from instructloop.learner.ppo import load_policy
    from instructloop.learner.reward import load_reward_model, score_texts, train_reward_model
    from instructloop.learner.sft import run_sft
    from instructloop.loop.labelers import compare, correct_concise
    from instructloop.loop.tasks import answer, make_prompt
    from instructloop.pretrain import ensure_base

    rng = random.Random(seed)
    torch.manual_seed(seed)
    base = Path(args.base) if args.base else ensure_base(work / "base", progress=True)
    t0 = time.perf_counter()
    demos = []
    for i in range(args.demonstrations):
        p = make_prompt(rng)
        demos.append(Demonstration(f"d{i}", f"d{i}", "u", p, answer(p)))
    sft_dir = work / f"sft-{seed}"
    sft_cfg = SFTStepConfig(max_steps=400, batch_size=16, learning_rate=3e-4, max_length=64,
                            seed=seed)  # fmt: skip
    run_sft(sft_cfg, demos, base, sft_dir)

    policy, tok = load_policy(sft_dir)
    policy.eval()
    train_prompts = [make_prompt(rng) for _ in range(args.comparisons)]
    held_prompts = [make_prompt(rng) for _ in range(150)]

    def ranked(prompts: list[str], tag: str) -> list[Comparison]:
        return [
            Comparison(f"{tag}{i}", f"{tag}{i}", "u", p, answers, _tiers(p, answers))
            for i, (p, answers) in enumerate(zip(prompts, _sample(policy, tok, prompts, K, 1.0),
                                                 strict=True))
        ]  # fmt: skip

    train, held = ranked(train_prompts, "t"), ranked(held_prompts, "h")
    exact_t1 = statistics.mean(a.strip() == answer(c.prompt) for c in train for a in c.answers)

    # the learner's RM, as the local loop trains it
    ranked_demos = [
        Demonstration(c.feedback_id, c.prompt_id, "u", c.prompt, answer(c.prompt))
        for c in train[: int(0.8 * len(train))]
    ]
    rm_cfg = RewardConfig(learning_rate=5e-4, batch_prompts=4, max_length=64, seed=seed)
    rm_dir = work / f"rm-{seed}"
    train_reward_model(rm_cfg, train, sft_dir, rm_dir, demonstrations=ranked_demos,
                       ranked_demonstrations=ranked_demos)  # fmt: skip
    prompts = [c.prompt for c in held for _ in c.answers]
    answers = [a for c in held for a in c.answers]
    rm, rm_tok = load_reward_model(rm_dir)
    rm.eval()
    rm_scores = score_texts(rm, rm_tok, prompts, answers, 64).tolist()

    # the sharpening bound: greedy against temperature 1, judged by the labeler
    eval_prompts = [make_prompt(rng) for _ in range(300)]
    greedy = [s[0] for s in _sample(policy, tok, eval_prompts, 1, 0.0)]
    sampled = [s[0] for s in _sample(policy, tok, eval_prompts, 1, 1.0)]
    win = statistics.mean(
        compare(correct_concise, p, g, s)
        for p, g, s in zip(eval_prompts, greedy, sampled, strict=True)
    )
    row = {
        "seed": seed,
        "rm": accuracies(held, rm_scores),
        "sft_loglik": accuracies(held, loglik(sft_dir, prompts, answers)),
        "sft_exact_sampled": exact_t1,
        "sft_exact_greedy": statistics.mean(
            g.strip() == answer(p) for p, g in zip(eval_prompts, greedy, strict=True)
        ),
        "greedy_vs_sampled_win": win,
        "seconds": time.perf_counter() - t0,
    }
    print(
        f"  seed {seed}: right-vs-wrong RM {row['rm']['right_vs_wrong']:.3f}, SFT log-likelihood "
        f"{row['sft_loglik']['right_vs_wrong']:.3f} ({row['rm']['right_vs_wrong_pairs']} pairs); "
        f"greedy vs sampled win {win:.3f} ({row['seconds']:.0f} s)",
        flush=True,
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="", help="base model dir (default: the shipped base)")
    parser.add_argument("--demonstrations", type=int, default=500, help="SFT data (500)")
    parser.add_argument("--comparisons", type=int, default=400, help="RM training prompts (400)")
    parser.add_argument("--seeds", type=int, default=3, help="repeats with other seeds (3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    parser.add_argument(
        "--out",
        default=str(ROOT / "bench/results/rm_verify.json"),
        help="JSON result path (default: bench/results/rm_verify.json)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-rm-verify-"))
    rows = [one_seed(args, seed, work) for seed in range(args.seeds)]

    def med(*path: str) -> float:
        return spread(rows, *path)["median"]

    summary = {
        scorer: {k: med(scorer, k) for k in ("all", "right_vs_wrong", "right_vs_wrong_pairs")}
        for scorer in ("rm", "sft_loglik")
    }
    summary["ratio_right_vs_wrong"] = (
        summary["rm"]["right_vs_wrong"] / summary["sft_loglik"]["right_vs_wrong"]
    )
    for key in ("sft_exact_sampled", "sft_exact_greedy", "greedy_vs_sampled_win"):
        summary[key] = med(key)
    print(f"\n{args.seeds} seeds, medians; {args.comparisons} training rankings of K={K}\n")
    print("| scorer of the SFT policy's samples | held-out pairwise acc | right vs wrong acc |")
    print("|---|---|---|")
    for name, key in (("the learner's RM (trained on the rankings)", "rm"),
                      ("the SFT policy's log-likelihood (no training)", "sft_loglik")):  # fmt: skip
        print(f"| {name} | {summary[key]['all']:.3f} | {summary[key]['right_vs_wrong']:.3f} |")
    print(f"| RM / log-likelihood | | {summary['ratio_right_vs_wrong']:.2f} |")
    print(
        f"\nSFT exact-match: greedy {summary['sft_exact_greedy']:.3f}, temperature 1 "
        f"{summary['sft_exact_sampled']:.3f}; labeler win rate of greedy over temperature-1 "
        f"answers (the sharpening bound): {summary['greedy_vs_sampled_win']:.3f}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"params": vars(args), "rows": rows, "summary": summary}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

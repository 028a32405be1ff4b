"""Reward-model training throughput: our K-wise trainer against TRL's RewardTrainer.

Both train the same scalar-head model (a local random-init Llama of --model-size, or
--model DIR) on the same rankings for one epoch, on the same --device: ours takes each
prompt's K answers as one batch element (K forwards for C(K,2) pairs); TRL takes the
rankings expanded to C(K,2) (chosen, rejected) pairs (2 forwards per pair). Both see the
same number of sequences per optimizer step. On CUDA both run bf16 autocast over float32
weights (ours through learner/device.py, TRL's through its bf16=True).
Throughput is comparisons (pairs) per second of training time, median over --repeats;
ratios are ours / TRL measured in the same run.

    python bench/rm_throughput.py [--out bench/results/rm_throughput.json]
                                  [--model DIR | --model-size 100m] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from instructloop.learner.dataset import Comparison
from instructloop.learner.device import resolve_device
from instructloop.learner.reward import RewardConfig, pairs_from_tiers, train_reward_model
from instructloop.learner.synthetic import WORDS
from instructloop.tinymodel import MODEL_SIZES, TinyModelConfig, build_tiny_model


def rankings(n_prompts: int, k: int, seed: int, answer_words: int) -> list[Comparison]:
    """n_prompts prompts, each with K answers in a strict order (C(K,2) pairs each)."""
    rng = random.Random(seed)
    out = []
    for p in range(n_prompts):
        answers = [" " + " ".join(rng.choices(WORDS, k=answer_words)) for _ in range(k)]
        tiers = list(range(k))
        rng.shuffle(tiers)
        prompt = f"write {' '.join(rng.sample(WORDS, 4))}:"
        out.append(Comparison(f"f{p}", f"p{p}", f"u{p % 7}", prompt, answers, tiers))
    return out


def as_pairs(comparisons: list[Comparison]) -> list[dict]:
    return [
        {"prompt": c.prompt, "chosen": c.answers[w], "rejected": c.answers[lose]}
        for c in comparisons
        for w, lose in pairs_from_tiers(c.tiers)
    ]


def run_ours(model_dir, comparisons, seqs_per_step, lr, max_length, work, device) -> float:
    k = len(comparisons[0].answers)
    cfg = RewardConfig(
        learning_rate=lr,
        batch_prompts=max(1, seqs_per_step // k),
        max_length=max_length,
        log_every=10**9,
    )
    metrics = train_reward_model(cfg, comparisons, model_dir, Path(work) / "ours", device=device)
    return metrics["pairs"] / metrics["train_seconds"]


def run_trl(model_dir, comparisons, seqs_per_step, lr, max_length, work, device) -> float:
    from datasets import Dataset as HFDataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    pairs = as_pairs(comparisons)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    args = TRLRewardConfig(
        output_dir=str(Path(work) / "trl"),
        per_device_train_batch_size=max(1, seqs_per_step // 2),
        num_train_epochs=1,
        learning_rate=lr,
        max_length=max_length,
        logging_steps=10**9,
        save_strategy="no",
        report_to="none",
        use_cpu=device.type != "cuda",  # the Trainer then takes its (first) GPU
        bf16=device.type == "cuda",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=HFDataset.from_list(pairs),
        processing_class=tokenizer,
    )
    out = trainer.train()
    return len(pairs) / out.metrics["train_runtime"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/rm_throughput.json", help="JSON result path.")
    model = ap.add_mutually_exclusive_group()
    model.add_argument("--model", default=None, help="HF model dir (default: build one).")
    model.add_argument(
        "--model-size", choices=list(MODEL_SIZES), default="tiny",
        help="Shape of the locally built random-init model (instructloop.tinymodel).",
    )  # fmt: skip
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
    ap.add_argument("--ks", default="4,9", help="Ranking sizes K, comma-separated.")
    ap.add_argument("--pairs", type=int, default=1152, help="Comparisons (pairs) per run, per K.")
    ap.add_argument("--seqs-per-step", type=int, default=36, help="Sequences per step (both).")
    ap.add_argument("--answer-words", type=int, default=16, help="Words per answer.")
    ap.add_argument("--max-length", type=int, default=128, help="Token limit per sequence.")
    ap.add_argument("--repeats", type=int, default=3, help="Runs per trainer and K (median).")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads.")
    ap.add_argument("--lr", type=float, default=1e-5, help="Learning rate of both trainers.")
    args = ap.parse_args()

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as work:
        model_dir = args.model or build_tiny_model(
            Path(work) / args.model_size, TinyModelConfig.of_size(args.model_size)
        )
        params = (
            transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
            .num_parameters()
        )  # fmt: skip
        rows = []
        for k in (int(x) for x in args.ks.split(",")):
            n_prompts = math.ceil(args.pairs / math.comb(k, 2))
            comparisons = rankings(n_prompts, k, seed=k, answer_words=args.answer_words)
            runs: dict[str, list[float]] = {"ours": [], "trl": []}
            for r in range(args.repeats):
                for name, fn in (("ours", run_ours), ("trl", run_trl)):
                    t0 = time.perf_counter()
                    runs[name].append(
                        fn(
                            model_dir,
                            comparisons,
                            args.seqs_per_step,
                            args.lr,
                            args.max_length,
                            work,
                            device,
                        )
                    )
                    print(
                        f"K={k} repeat {r + 1}/{args.repeats} {name}: "
                        f"{runs[name][-1]:.0f} comparisons/s ({time.perf_counter() - t0:.1f}s)",
                        flush=True,
                    )
            ours, trl = statistics.median(runs["ours"]), statistics.median(runs["trl"])
            rows.append(
                {
                    "k": k,
                    "prompts": n_prompts,
                    "pairs": n_prompts * math.comb(k, 2),
                    "ours_comparisons_per_s": ours,
                    "trl_comparisons_per_s": trl,
                    "ratio": ours / trl,
                    "runs": runs,
                }
            )

    print(f"\nreward model of {params:,} parameters on {device}")
    print(f"{'K':>3} {'pairs':>6} {'ours cmp/s':>11} {'TRL cmp/s':>10} {'ratio':>6}")
    for row in rows:
        print(
            f"{row['k']:>3} {row['pairs']:>6} {row['ours_comparisons_per_s']:>11.0f} "
            f"{row['trl_comparisons_per_s']:>10.0f} {row['ratio']:>5.2f}x"
        )
    result = {
        "benchmark": "rm_throughput",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": args.model or f"{args.model_size} (instructloop.tinymodel, random init)",
        "parameters": params,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {
            "platform": platform.platform(),
            "cpu_count": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Our PPO (learner/ppo.py train_ppo) against TRL's PPOTrainer, on the same settings.

TRL's PPOTrainer (TRL 1.10, `trl.experimental.ppo`; removed after 1.10) is the peer:
the same algorithm (rollout, per-token k1 KL penalty, RM score at the last token, GAE,
whitened advantages, clipped policy and value losses, a value model initialised from the
RM) in the most used library. The goal is ours >= 2x TRL's episodes/s on the same
settings.

Both run on the same inputs, each in a fresh process per run, interleaved within each
repeat (the first system alternates between repeats):

  - ours: `train_ppo` called directly (no Redis, no learner round) under the project venv;
  - TRL:  bench/ppo_trl_side.py under a venv of its own (--trl-venv, made on first use
          with `python -m venv`): a .pth file there adds the project venv's site-packages
          (the same torch and transformers), and `pip install --no-deps trl==1.10.*`
          puts TRL 1.10 in front of the project's TRL.

What is the same: the policy and reference (one model dir: the shipped pretrained base
instructloop/base, or --model-size / --model), the reward model (trained here briefly on
comparisons of task prompts; TRL reads it through ppo_trl_side.reward_model_for_trl, so
its rewards and values are our RM's, offset included), the value model's start (the RM),
the prompts (loop/tasks.py make_prompt), the batch (--rollout-prompts episodes per
iteration, minibatches of --minibatch-size with one optimizer step each, --ppo-epochs
passes), the token budget (--max-new-tokens, temperature 1, no top-k/top-p, stop at EOS),
the KL coefficient, clip ranges, vf_coef, gamma, lambda, learning rate (constant), AdamW
eps, the number of episodes, the torch threads and the device. Timed: the training loop
only (ours: to the end of the last iteration, from train_ppo's history; TRL: the
`trainer.train()` call), not model loading, setup or saving.

What differs (each system as it ships):
  - TRL takes the policy's log-probs from generate's scores (output_scores): no policy
    forward after sampling; ours re-runs the policy on the sampled tokens (the same
    forward as the update's, so the PPO ratio starts at exactly 1).
  - TRL scores the token ids it sampled (the query and the response up to the first
    EOS); ours decodes the response and the RM scores prompt + text + EOS re-tokenised.
  - TRL whitens advantages with an unbiased variance; ours over the global batch
    (biased). TRL clips no gradients; ours clips policy and value at max_grad_norm 1.
  - TRL's value model and policy share one AdamW (one lr); ours has two parameter groups
    (equal lrs by default). TRL samples prompts by shuffling the dataset, ours with
    replacement (seeded), so the episodes differ in content, not in number.
  - TRL calls gc.collect() and empty_cache() every iteration and logs its metrics
    every iteration (logging_steps=1), as it ships; sample generations
    (num_sample_generations), evaluation, saving and reporting are off.
  - On CUDA, ours autocasts its forwards to bf16 over float32 weights; TRL runs with
    bf16=True, which autocasts only the prepared policy+value wrapper's forward (the
    update): its sampling (policy.generate), reference and RM/value scoring stay float32.
    (Not run on a GPU yet: --device cuda --model-size 100m is the command for one.)

Reported per repeat: episodes/s of each (episodes / training-loop wall seconds), the
paired ratio ours/TRL (the goal's measure), and the ratio of the loops' CPU seconds
(TRL's / ours, per episode since the episodes are equal): on 2 shared cores the wall
times move with whatever else runs, the CPU seconds of a 1-thread loop much less (on
CUDA they count the host's work only, so there the wall-time ratio is the measure).

    python bench/ppo_vs_trl.py [--repeats 3] [--model DIR | --model-size 100m]
                               [--device cuda] [--trl-venv DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from benchlib import spread, write_result  # noqa: E402  (bench/ is on sys.path as a script)

from instructloop.learner.config import PPOConfig, RewardConfig  # noqa: E402
from instructloop.learner.dataset import Comparison  # noqa: E402
from instructloop.loop.tasks import answer, make_prompt  # noqa: E402
from instructloop.pretrain import SHIPPED_BASE  # noqa: E402
from instructloop.tinymodel import MODEL_SIZES, TinyModelConfig, build_tiny_model  # noqa: E402

HERE = Path(__file__).parent
TRL_SPEC = "trl==1.10.*"
DEFAULT_VENV = Path.home() / ".cache" / "instructloop" / "trl-1.10-venv"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", help="HF policy dir (default: the shipped base)")
    model.add_argument(
        "--model-size", choices=list(MODEL_SIZES),
        help="build a random-init model of this shape (instructloop.tinymodel) instead",
    )  # fmt: skip
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="both systems'")
    p.add_argument("--repeats", type=int, default=3, help="runs of each system, interleaved")
    p.add_argument("--iterations", type=int, default=16, help="PPO iterations")
    p.add_argument("--rollout-prompts", type=int, default=16, help="episodes per iteration")
    p.add_argument("--minibatch-size", type=int, default=8, help="episodes per PPO step")
    p.add_argument("--ppo-epochs", type=int, default=4, help="passes over each rollout")
    p.add_argument("--max-new-tokens", type=int, default=64, help="response length limit")
    p.add_argument("--kl-beta", type=float, default=PPOConfig.kl_beta, help="KL coefficient")
    p.add_argument("--prompts", type=int, default=64, help="distinct task prompts")
    p.add_argument("--rm-comparisons", type=int, default=64, help="comparisons the RM trains on")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each system")
    p.add_argument("--trl-venv", default=str(DEFAULT_VENV), help="TRL 1.10's venv (made once)")
    p.add_argument("--out", default="bench/results/ppo_vs_trl.json", help="JSON result file")
    p.add_argument("--run-ours", nargs=2, metavar=("INPUTS", "OUT"), help=argparse.SUPPRESS)
    return p.parse_args()


# ---------------------------------------------------------------------------- TRL's venv


def trl_python(venv: Path) -> Path:
    """The python of a venv where `import trl` is TRL 1.10 and everything else is the
    project venv's (torch, transformers, accelerate, datasets, instructloop): made once.

    A .pth file runs site.addsitedir on the project's site-packages, which appends it
    (and its own .pth files: the editable instructloop) AFTER the venv's own
    site-packages, so the trl installed there with --no-deps shadows ours."""
    python = venv / "bin" / "python"
    check = "import trl, trl.experimental.ppo; print(trl.__version__)"
    if python.exists():
        done = subprocess.run([python, "-c", check], capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip().startswith("1.10."):
            return python
    print(f"making TRL 1.10's venv in {venv} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    ours = sysconfig.get_paths()["purelib"]
    Path(purelib, "_instructloop_project_venv.pth").write_text(
        f"import site; site.addsitedir({ours!r})\n"
    )
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", TRL_SPEC], check=True)
    version = subprocess.run([python, "-c", check], capture_output=True, text=True, check=True)
    print(f"TRL {version.stdout.strip()} ready", flush=True)
    return python


# ---------------------------------------------------------------------------- inputs


def task_comparisons(n: int, seed: int) -> list[Comparison]:
    """Task prompts, each with the right answer above the input echoed above word salad:
    an RM that prefers answers to the task, as the loop's comparisons teach."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = make_prompt(rng)
        echo = prompt.strip().partition(": ")[2]
        salad = " ".join(rng.choice(["the", "of", "and", "to", "in"]) for _ in range(4))
        out.append(
            Comparison(f"f{i}", f"p{i}", "u0", prompt, [answer(prompt), echo, salad], [0, 1, 2])
        )
    return out


def prepare(work: Path, args) -> Path:
    """Policy, RM and prompts for both systems; returns the inputs JSON they both read."""
    from instructloop.learner.reward import train_reward_model

    if args.model:
        policy_dir = Path(args.model)
    elif args.model_size:
        policy_dir = build_tiny_model(work / "policy", TinyModelConfig.of_size(args.model_size))
    else:
        policy_dir = SHIPPED_BASE
    reward_dir = work / "rm"
    rm = train_reward_model(
        RewardConfig(), task_comparisons(args.rm_comparisons, seed=1), policy_dir, reward_dir,
        device=args.device,
    )  # fmt: skip
    print(
        f"reward model: {rm['steps']} steps on {rm['comparisons']} comparisons, "
        f"offset {rm['reward_offset']:.3f}",
        flush=True,
    )
    rng = random.Random(0)
    cfg = PPOConfig()
    settings = {
        "device": args.device,
        "threads": args.threads,
        "seed": cfg.seed,
        "iterations": args.iterations,
        "rollout_prompts": args.rollout_prompts,
        "minibatch_size": args.minibatch_size,
        "ppo_epochs": args.ppo_epochs,
        "max_new_tokens": args.max_new_tokens,
        "max_prompt_length": cfg.max_prompt_length,
        "temperature": 1.0,
        "kl_beta": args.kl_beta,
        "clip_range": cfg.clip_range,
        "value_clip_range": cfg.value_clip_range,
        "vf_coef": cfg.vf_coef,
        "gamma": cfg.gamma,
        "lam": cfg.lam,
        "learning_rate": cfg.learning_rate,
    }
    inputs = {
        "policy_dir": str(policy_dir),
        "ref_dir": str(policy_dir),  # the KL reference: the policy PPO starts from
        "reward_dir": str(reward_dir),
        "prompts": [make_prompt(rng) for _ in range(args.prompts)],
        "settings": settings,
    }
    path = work / "inputs.json"
    path.write_text(json.dumps(inputs, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------- the two sides


def run_ours(inputs_path: str, out_path: str) -> None:
    """train_ppo on the inputs; writes episodes / training-loop seconds to out_path."""
    from instructloop.learner import ppo

    inputs = json.loads(Path(inputs_path).read_text())
    s = inputs["settings"]
    torch.set_num_threads(s["threads"])
    cfg = PPOConfig(
        iterations=s["iterations"],
        rollout_prompts=s["rollout_prompts"],
        minibatch_size=s["minibatch_size"],
        ppo_epochs=s["ppo_epochs"],
        max_new_tokens=s["max_new_tokens"],
        max_prompt_length=s["max_prompt_length"],
        temperature=s["temperature"],
        kl_beta=s["kl_beta"],
        clip_range=s["clip_range"],
        value_clip_range=s["value_clip_range"],
        vf_coef=s["vf_coef"],
        gamma=s["gamma"],
        lam=s["lam"],
        learning_rate=s["learning_rate"],
        value_learning_rate=s["learning_rate"],
        seed=s["seed"],
        log_every=s["iterations"],
    )
    # CPU seconds of the loop (less sensitive than wall time to other work on shared
    # cores): from the first rollout to the save that follows the last iteration
    cpu: dict[str, float] = {}
    rollout, full_state_dict = ppo.rollout, ppo.distributed.full_state_dict

    def first_rollout(*a, **kw):
        cpu.setdefault("start", time.process_time())
        return rollout(*a, **kw)

    def after_loop(*a, **kw):
        cpu["end"] = time.process_time()
        return full_state_dict(*a, **kw)

    ppo.rollout, ppo.distributed.full_state_dict = first_rollout, after_loop
    with tempfile.TemporaryDirectory(prefix="bench-ppo-ours-") as out_dir:
        m = ppo.train_ppo(
            cfg, inputs["prompts"], inputs["policy_dir"], inputs["reward_dir"], out_dir,
            ref_dir=inputs["ref_dir"], device=s["device"],
        )  # fmt: skip
    seconds = m["episodes"] / m["history"][-1]["episodes_per_s"]
    result = {
        "system": "instructloop learner/ppo.py train_ppo",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "episodes": m["episodes"],
        "seconds": seconds,
        "episodes_per_s": m["episodes"] / seconds,
        "cpu_s": cpu["end"] - cpu["start"],
        "rollout_s": m["rollout_s"],
        "scoring_s": m["scoring_s"],
        "update_s": m["update_s"],
        "response_tokens_mean": sum(r["response_len"] for r in m["history"]) / len(m["history"]),
        "score_first": m["score_first"],
        "score_last": m["history"][-1]["score"],
    }
    Path(out_path).write_text(json.dumps(result, indent=2) + "\n")


def run_side(cmd: list[str], work: Path, threads: int) -> dict:
    """One run of one system in a fresh process: cmd + [--out FILE]; returns that JSON."""
    out = work / f"run-{time.monotonic_ns()}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    env["TRL_EXPERIMENTAL_SILENCE"] = "1"
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    subprocess.run([*cmd, str(out)], check=True, env=env)
    result = json.loads(out.read_text())
    result["load_1min_before"] = load
    result["process_s"] = time.perf_counter() - t0  # with imports and loading: not compared
    return result


def report(rows: list[dict], args, meta: dict) -> None:
    """Per repeat and the medians: episodes/s of each and the paired ratio ours/TRL (the
    goal's measure), with the ratio of loop CPU seconds beside it: on shared cores the
    wall-time ratio moves with the other work, the CPU-time ratio much less."""
    print(f"\nPPO episodes/s, {meta['model']}, {args.device}, {args.threads} thread(s), "
          f"{rows[0]['ours']['episodes']} episodes per run")  # fmt: skip
    print(
        f"{'repeat':<7} {'first':<5} {'load':>5} {'ours':>7} {'TRL':>7} {'ours/TRL':>8} "
        f"{'CPU ratio':>9}   response tokens/episode ours, TRL"
    )
    for row in rows:
        ours, trl = row["ours"], row["trl"]
        print(
            f"{row['repeat']:<7} {row['order'][0]:<5} {ours['load_1min_before']:>5.1f} "
            f"{ours['episodes_per_s']:>7.2f} {trl['episodes_per_s']:>7.2f} "
            f"{row['ratio']:>7.2f}x {row['cpu_ratio']:>8.2f}x"
            f"   {ours['response_tokens_mean']:.1f}, {trl['response_tokens_mean']:.1f}"
        )
    ours, trl = spread(rows, "ours", "episodes_per_s"), spread(rows, "trl", "episodes_per_s")
    ratio, cpu_ratio = spread(rows, "ratio"), spread(rows, "cpu_ratio")
    print(
        f"{'median':<19} {ours['median']:>7.2f} {trl['median']:>7.2f} {ratio['median']:>7.2f}x "
        f"{cpu_ratio['median']:>8.2f}x\nours/TRL per repeat {ratio['min']:.2f}-"
        f"{ratio['max']:.2f}x (CPU {cpu_ratio['min']:.2f}-{cpu_ratio['max']:.2f}x); "
        f"goal >= 2x: {'met' if ratio['median'] >= 2 else 'not met'}"
    )
    write_result(
        args.out,
        args,
        benchmark="ppo_vs_trl",
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **meta,
        runs=rows,
        ours_episodes_per_s=ours,
        trl_episodes_per_s=trl,
        ratio_ours_over_trl=ratio,
        cpu_ratio_trl_over_ours=cpu_ratio,
        goal_ratio=2.0,
        goal_met=ratio["median"] >= 2,
    )


def main() -> None:
    args = parse_args()
    if args.run_ours:
        return run_ours(*args.run_ours)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()  # 1, 5, 15 min: the cores are shared
    trl_py = trl_python(Path(args.trl_venv).expanduser())
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ppo-vs-trl-") as work:
        work = Path(work)
        inputs = str(prepare(work, args))
        commands = {
            "ours": [sys.executable, str(Path(__file__).resolve()), "--run-ours", inputs],
            "trl": [str(trl_py), str(HERE.resolve() / "ppo_trl_side.py"), "--inputs", inputs,
                    "--out"],
        }  # fmt: skip
        for r in range(args.repeats):
            order = ["ours", "trl"] if r % 2 == 0 else ["trl", "ours"]
            row = {"repeat": r + 1, "order": order}
            for name in order:
                row[name] = run_side(commands[name], work, args.threads)
                print(f"repeat {r + 1} {name}: {row[name]['episodes_per_s']:.2f} episodes/s "
                      f"({row[name]['seconds']:.1f} s)", flush=True)  # fmt: skip
            row["ratio"] = row["ours"]["episodes_per_s"] / row["trl"]["episodes_per_s"]
            row["cpu_ratio"] = row["trl"]["cpu_s"] / row["ours"]["cpu_s"]  # per episode: same n
            rows.append(row)
    model = args.model or (
        f"{args.model_size} (instructloop.tinymodel, random init)"
        if args.model_size
        else "instructloop/base (shipped pretrained base)"
    )
    meta = {
        "model": model,
        "machine_detail": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "load_avg_before": load_before,
            "gpu": torch.cuda.get_device_name(args.device)
            if args.device.startswith("cuda")
            else None,
        },
        "trl": rows[0]["trl"].get("trl"),
    }
    report(rows, args, meta)


if __name__ == "__main__":
    main()

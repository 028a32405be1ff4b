"""`instructloop ablate`: every algorithm on the same recorded feedback, measured alike.

InstructGPT's reviewers asked whether the reward model is needed at all, how much
feedback is enough, and whether the PPO-vs-SFT comparison is fair. This command answers
them on a deployment's own data: it takes the dataset a loop run recorded (the learner's
SQLite dataset) and, from the same base and with the learner's own trainers:

  1. SFT       the base on every training demonstration: the SFT-only policy, the
               reference (KL) and the starting point of every other algorithm;
  2. per share of the comparisons (25 / 50 / 100% by default, the oldest first, as the
     loop would have had them):
     RM        a reward model from the SFT policy, one epoch (the learner's rule);
     policies  ppo (no pretraining mix), ppo-ptx (PPO-ptx: the LM loss on the base's
               pretraining corpus mixed in, the paper's fix for the alignment tax),
               ppo-ptx-demo (the local loop's default learner: the mix is the
               demonstrations), dpo (the pairs of the rankings, no RM), grpo and rloo
               (our RM as their reward function), each through learner/algorithms.py
               `train_policy` from the same learner settings (`up`'s, then
               --learn-args) and the same budget (`same_budget`): grpo and rloo sample
               as many episodes as PPO, at PPO's learning rate; dpo takes as many
               answers through the policy's gradient as PPO's updates do (two per
               pair), so a share of the pairs rather than one epoch of them;
  3. evaluation of every policy on fresh task prompts that no user sent:
     - exact-match, greedy and sampled (what a user of the task set cares about);
     - win rate against the SFT-only policy by the labelers, on the sampled answers
       (ties half): under the population that ranked the training data (--labeler)
       and under a held-out population that ranked nothing (--heldout-labeler), as
       the paper reported held-out labelers;
     - KL to the SFT reference (summed over the response, the learner's estimate) and
       the mean score of the 100% RM, on --kl-prompts of the evaluation prompts;
     - the alignment tax: the loss on held-out pretraining text (loop/capability.py
       `corpus_loss`), a capability no labeler ranks, against the base's.

What a trivial policy scores, so that the numbers can be read: the SFT-only policy
against itself wins exactly 50% (its row shows it); the base answers 0% right.

Output in --out: ablate.json (every measure, settings, timings), ablate.png (the paper's
Figure 1 in miniature: win rate against SFT-only per algorithm over the share of
comparisons, with exact-match, KL and the tax beside it) and the printed table. Every
stage logs its progress; the JSON is rewritten after each evaluated policy, so a run
stopped half-way keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import random
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import report as report_io

log = logging.getLogger(__name__)

ALGORITHMS = ("ppo", "ppo-ptx", "ppo-ptx-demo", "dpo", "grpo", "rloo")  # + the sft baseline


@dataclass
class AblateConfig:
    """One ablation: the recorded data, what to train on it, how to measure the results."""

    dataset: str = field(
        default="./data",
        metadata={
            "help": "The recorded feedback: a loop data dir (`up --data-dir`: its learner/ "
            "dataset.sqlite3 and split-salt), a learner data dir, or a dataset.sqlite3 file."
        },
    )
    split_salt_file: str = field(
        default="",
        metadata={
            "help": "The deployment's split key: with it, only the learner's training users "
            "train and the RM's held-out accuracy uses the held-out users. Empty: the "
            "split-salt file beside the dataset's learner dir if there is one, else every "
            "user trains (and no RM held-out accuracy is reported)."
        },
    )
    base: str = field(
        default="",
        metadata={"help": "The base model dir (empty: the shipped pretrained base)."},
    )
    algorithms: str = field(
        default=",".join(ALGORITHMS),
        metadata={"help": "Comma-separated, of: " + ", ".join(ALGORITHMS) + "."},
    )
    fractions: str = field(
        default="0.25,0.5,1",
        metadata={"help": "Shares of the comparisons (oldest first) each algorithm trains on."},
    )
    learn_args: str = field(
        default="",
        metadata={
            "help": "`instructloop learn` options for the trainers (--sft-*, --rm-*, "
            "--ppo-*, --algorithm's options), over the local loop's defaults (`up`)."
        },
    )
    ptx_coef: float = field(
        default=1.0,
        metadata={"help": "PPO-ptx's weight of the pretraining-corpus LM loss (ppo-ptx row)."},
    )
    labeler: str = field(
        default="instructloop.loop.labelers:correct_concise",
        metadata={
            "help": "The population that ranked the training data (comma-separated "
            "module:function specs), judging the evaluation."
        },
    )
    heldout_labeler: str = field(
        default="instructloop.loop.labelers:correct_polite",
        metadata={"help": "A held-out population that ranked nothing, judging too ('' = none)."},
    )
    eval_prompts: int = field(default=200, metadata={"help": "Fresh evaluation prompts."})
    kl_prompts: int = field(
        default=64, metadata={"help": "Evaluation prompts for the KL and the RM score."}
    )
    eval_temperature: float = field(
        default=1.0, metadata={"help": "Temperature of the sampled evaluation answers."}
    )
    max_tokens: int = field(default=16, metadata={"help": "Tokens per evaluation answer."})
    corpus_documents: int = field(
        default=200, metadata={"help": "Held-out pretraining documents of the tax measure."}
    )
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)."})
    seed: int = field(default=0, metadata={"help": "Seed of the evaluation prompts."})
    out: str = field(default="ablate-out", metadata={"help": "Where results go."})


# ---------------------------------------------------------------- inputs


def dataset_paths(spec: str, salt_file: str) -> tuple[Path, Path | None]:
    """(dataset.sqlite3, split-salt file or None) of a loop dir, learner dir or file."""
    p = Path(spec)
    for candidate in (p, p / "dataset.sqlite3", p / "learner" / "dataset.sqlite3"):
        if candidate.is_file():
            db = candidate
            break
    else:
        raise ValueError(f"no dataset.sqlite3 at {spec} (nor in its learner/ dir)")
    if salt_file:
        return db, Path(salt_file)
    beside = db.parent.parent / "split-salt"  # main.py keeps it beside the learner dir
    return db, beside if beside.is_file() else None


def learner_configs(learn_args: str):
    """(SFTStepConfig, RewardConfig, PPOConfig, AlignConfig) as `instructloop learn`
    would build them from the local loop's defaults and then `learn_args`."""
    from instructloop.cliargs import dataclass_from_args
    from instructloop.learner import cli as learner_cli
    from instructloop.learner.config import AlignConfig, PPOConfig, RewardConfig, SFTStepConfig

    from .up import TINY_LEARNER_ARGS

    parser = argparse.ArgumentParser(prog="ablate --learn-args", add_help=False)
    learner_cli.register(parser.add_subparsers())
    args = parser.parse_args(["learn", *shlex.split(TINY_LEARNER_ARGS), *shlex.split(learn_args)])
    pick = learner_cli.prefixed_from_args
    return (
        pick(SFTStepConfig, args, "sft"),
        pick(RewardConfig, args, "rm"),
        pick(PPOConfig, args, "ppo"),
        dataclass_from_args(AlignConfig, args),
    )


def same_budget(ppo_cfg, align_cfg, learn_args: str):
    """align_cfg with the budget of PPO's: the TRL algorithms train at PPO's learning
    rate, and DPO stops after as many answers through the policy's gradient as PPO's
    updates take (episodes x epochs; a pair is two answers), unless --learn-args sets
    them itself."""
    changes = {}
    if "--dpo-learning-rate" not in learn_args:
        changes["dpo_learning_rate"] = ppo_cfg.learning_rate
    if "--rl-learning-rate" not in learn_args:
        changes["rl_learning_rate"] = ppo_cfg.learning_rate
    if "--dpo-max-steps" not in learn_args and "--dpo-epochs" not in learn_args:
        answers = ppo_cfg.iterations * ppo_cfg.rollout_prompts * ppo_cfg.ppo_epochs
        changes["dpo_max_steps"] = max(1, math.ceil(answers / 2 / align_cfg.dpo_batch_size))
    return dataclasses.replace(align_cfg, **changes)


def ppo_variant(algorithm: str, ppo_cfg, ptx_coef: float):
    """The PPO config of a ppo* row: `ppo` without a pretraining mix, `ppo-ptx` with the
    base's pretraining corpus at ptx_coef (the paper's PPO-ptx), `ppo-ptx-demo` as the
    learner settings have it (the local loop's: demonstrations)."""
    if algorithm == "ppo":
        return dataclasses.replace(ppo_cfg, ptx_coef=0.0)
    if algorithm == "ppo-ptx":
        return dataclasses.replace(ppo_cfg, ptx_coef=ptx_coef, ptx_data="corpus")
    return dataclasses.replace(ppo_cfg, ptx_data="demonstrations")


def evaluation_prompts(n: int, seed: int, exclude: set[str]) -> list[str]:
    """n task prompts that no recorded user sent (the evaluation is on unseen prompts)."""
    from .tasks import make_prompt

    rng = random.Random(f"ablate-eval-{seed}")
    out: list[str] = []
    while len(out) < n:
        p = make_prompt(rng)
        if p not in exclude:
            out.append(p)
    return out


# ---------------------------------------------------------------- the run


class Ablation:
    """Trains and measures; `rows` are the table, one per (algorithm, share)."""

    def __init__(self, cfg: AblateConfig):
        from instructloop.learner.dataset import Dataset, DatasetConfig

        from .labelers import load_population

        self.cfg = cfg
        self.out = Path(cfg.out)
        self.work = self.out / "work"
        db, salt_file = dataset_paths(cfg.dataset, cfg.split_salt_file)
        salt = salt_file.read_bytes().strip() if salt_file else b""
        self.dataset = Dataset(DatasetConfig(path=str(db), split_salt=salt))
        self.split = "train" if salt else None
        self.algorithms = [a.strip() for a in cfg.algorithms.split(",") if a.strip()]
        unknown = sorted(set(self.algorithms) - set(ALGORITHMS))
        if unknown:
            raise ValueError(f"unknown algorithms {unknown}: choose from {', '.join(ALGORITHMS)}")
        self.fractions = sorted(float(f) for f in cfg.fractions.split(","))
        if not self.fractions or not all(0 < f <= 1 for f in self.fractions):
            raise ValueError(f"--fractions must be shares in (0, 1], got {cfg.fractions!r}")
        self.sft_cfg, self.rm_cfg, self.ppo_cfg, align_cfg = learner_configs(cfg.learn_args)
        self.align_cfg = same_budget(self.ppo_cfg, align_cfg, cfg.learn_args)
        self.train_population = load_population(cfg.labeler)
        self.heldout_population = (
            load_population(cfg.heldout_labeler) if cfg.heldout_labeler else []
        )
        self.rows: list[dict] = []
        self.started = time.time()
        self.work.mkdir(parents=True, exist_ok=True)

    def data(self):
        ds, split = self.dataset, self.split
        comparisons = ds.comparisons(split)
        heldout = ds.comparisons("heldout") if split else []
        demos = ds.demonstrations(split)
        prompts = ds.rl_prompts(split)
        if not comparisons:
            raise ValueError("the dataset has no training comparisons to ablate on")
        return comparisons, heldout, demos, prompts

    def run(self) -> dict:
        import torch

        from instructloop.learner.algorithms import ptx_texts, train_policy
        from instructloop.learner.reward import train_reward_model
        from instructloop.learner.sft import run_sft
        from instructloop.pretrain import SHIPPED_BASE

        from .evaluate import CheckpointDecoder

        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        comparisons, heldout, demos, prompts = self.data()
        base = Path(cfg.base) if cfg.base else Path(SHIPPED_BASE)
        log.info(
            "ablate: %d comparisons, %d demonstrations, %d RL prompts (%s users); "
            "algorithms %s at %s of the comparisons",
            len(comparisons), len(demos), len(prompts), self.split or "all",
            ",".join(self.algorithms), ",".join(f"{f:g}" for f in self.fractions),
        )  # fmt: skip
        seen = {c.prompt for c in comparisons} | {d.prompt for d in demos} | set(prompts)
        self.eval_prompts = evaluation_prompts(cfg.eval_prompts, cfg.seed, seen)
        self.decoder = CheckpointDecoder(
            self.eval_prompts, max_tokens=cfg.max_tokens, temperature=cfg.eval_temperature,
            seed=cfg.seed, threads=cfg.threads or torch.get_num_threads(),
        )  # fmt: skip
        self.sft_answers = None  # what every policy's win rate is measured against

        # ---- 1. SFT: the baseline, the reference and everyone's starting point
        sft_dir = self.work / "sft"
        if demos:
            t = time.perf_counter()
            run_sft(cfg=self.sft_cfg, demonstrations=demos, init_dir=base, out_dir=sft_dir)
            sft_s = time.perf_counter() - t
        else:  # comparisons only: the base is the reference, as in the learner
            sft_dir, sft_s = base, 0.0
        self.sft_dir = sft_dir
        self.measure("base", 0.0, base, seconds=0.0)
        self.measure("sft", 0.0, sft_dir, seconds=sft_s, extra={"demonstrations": len(demos)})

        # ---- 2. per share of the comparisons: an RM, then every algorithm from SFT
        for frac in self.fractions:
            used = comparisons[: max(1, math.ceil(frac * len(comparisons)))]
            rm_dir = self.work / f"rm-{frac:g}"
            t = time.perf_counter()
            rm = train_reward_model(
                self.rm_cfg, used, init_dir=sft_dir, out_dir=rm_dir, heldout=heldout,
                demonstrations=demos,
                ranked_demonstrations=demos if self.rm_cfg.demo_comparisons else (),
            )  # fmt: skip
            rm_s = time.perf_counter() - t
            self.rm_last = rm_dir
            for alg in self.algorithms:
                out_dir = self.work / f"{alg}-{frac:g}"
                ppo_cfg, ptx = self.ppo_cfg, ()
                if alg.startswith("ppo"):
                    ppo_cfg = ppo_variant(alg, self.ppo_cfg, cfg.ptx_coef)
                    ptx = ptx_texts(ppo_cfg, demonstrations=demos)
                log.info("ablate: %s on %d comparisons (%g)", alg, len(used), frac)
                t = time.perf_counter()
                metrics = train_policy(
                    "ppo" if alg.startswith("ppo") else alg, ppo_cfg=ppo_cfg,
                    align_cfg=self.align_cfg, prompts=prompts, comparisons=used,
                    policy_dir=sft_dir, reward_dir=rm_dir, ref_dir=sft_dir, out_dir=out_dir,
                    ptx_texts=ptx,
                )  # fmt: skip
                self.measure(
                    alg, frac, out_dir, seconds=time.perf_counter() - t,
                    extra={
                        "comparisons": len(used), "rm_seconds": rm_s,
                        "rm_heldout_accuracy": rm.get("heldout_accuracy", float("nan")),
                        "episodes": metrics.get("episodes", 0), "pairs": metrics.get("pairs", 0),
                        "steps": metrics.get("steps", 0),
                    },
                )  # fmt: skip
        # KL and RM score of every policy under the last (largest) RM: one yardstick
        self.score_all()
        self.save()
        return self.report()

    # ------------------------------------------------------------ measuring

    def measure(self, name: str, frac: float, path: Path, seconds: float, extra=None) -> None:
        from .capability import corpus_loss
        from .labelers import population_win_rate

        t = time.perf_counter()
        ans = self.decoder.answers(path)
        if name == "sft":
            self.sft_answers = ans
        greedy, sampled = ans.exact_match(self.eval_prompts)
        row = {
            "algorithm": name, "fraction": frac, "path": str(path), "train_seconds": seconds,
            "exact_match": greedy, "exact_match_sampled": sampled,
            "corpus_loss": corpus_loss(
                path, documents=self.cfg.corpus_documents, threads=self.cfg.threads or 1
            ),
        }  # fmt: skip
        sft = self.sft_answers
        if sft is not None:  # every row after the base's
            row["win_vs_sft"] = population_win_rate(
                self.train_population, self.eval_prompts, ans.sampled, sft.sampled
            )
            if self.heldout_population:
                row["win_vs_sft_heldout"] = population_win_rate(
                    self.heldout_population, self.eval_prompts, ans.sampled, sft.sampled
                )
        row.update(extra or {})
        row["eval_seconds"] = time.perf_counter() - t
        self.rows.append(row)
        log.info(
            "ablate: %s @%g: exact %.3f/%.3f win vs SFT %s, corpus loss %.3f (%.0fs)",
            name, frac, greedy, sampled, report_io.fmt(row.get("win_vs_sft")), row["corpus_loss"],
            seconds,
        )  # fmt: skip
        self.save()

    def score_all(self) -> None:
        """KL to the SFT reference and the mean RM score, every trained policy."""
        from instructloop.learner.ppo import evaluate_policy

        prompts = self.eval_prompts[: self.cfg.kl_prompts]
        for row in self.rows:
            if row["algorithm"] == "base":
                continue
            m = evaluate_policy(
                row["path"], self.rm_last, prompts, ref_dir=self.sft_dir, cfg=self.ppo_cfg
            )
            row["kl_to_sft"], row["rm_score"] = m["kl"], m["mean_score"]

    def report(self) -> dict:
        base_loss = next(r["corpus_loss"] for r in self.rows if r["algorithm"] == "base")
        for r in self.rows:
            r["alignment_tax"] = r["corpus_loss"] - base_loss
        return {
            "config": asdict(self.cfg),
            "learner": {
                "sft": asdict(self.sft_cfg),
                "rm": asdict(self.rm_cfg),
                "ppo": asdict(self.ppo_cfg),
                "align": asdict(self.align_cfg),
            },  # fmt: skip
            "seconds": round(time.time() - self.started, 1),
            "eval_prompts": len(self.eval_prompts),
            "rows": self.rows,
        }

    def save(self) -> None:
        report_io.write_json(self.report(), self.out, name="ablate.json")


# ---------------------------------------------------------------- command


def _ablate(args: argparse.Namespace) -> int:
    import sys

    from rich.console import Console
    from rich.table import Table

    from instructloop.cliargs import dataclass_from_args

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = dataclass_from_args(AblateConfig, args)
    try:
        ablation = Ablation(cfg)
        report = ablation.run()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # the trainers are in the `learn` extra
        print(
            f"error: ablate runs the learner's trainers and needs {e.name!r}: "
            "pip install 'instructloop[learn]' (scripts/install.sh installs it)",
            file=sys.stderr,
        )
        return 2
    table = Table(title=f"instructloop ablate ({report['seconds']:.0f}s)")
    for _, header, _ in report_io.ABLATION_COLUMNS:
        table.add_column(header)
    for cells in report_io.ablation_rows(report):
        table.add_row(*cells)
    console = Console(width=max(Console().width, 160))  # eleven columns: never wrap them
    console.print(table)
    out = Path(cfg.out)
    (out / "ablate.md").write_text(report_io.ablation_markdown(report) + "\n")
    try:
        plot = report_io.write_ablation_plot(report, out)
    except ImportError:
        plot = None  # matplotlib is in the `sim` extra
    written = [out / "ablate.json", out / "ablate.md", *([plot] if plot else [])]
    console.print("results: " + ", ".join(str(p) for p in written))
    return 0


def register(subparsers) -> None:
    from instructloop.cliargs import add_dataclass_arguments

    p = subparsers.add_parser(
        "ablate",
        help="run PPO, PPO-ptx, DPO, GRPO and RLOO on the same recorded feedback, compare",
        description="Train every algorithm from the same SFT policy on the same recorded "
        "feedback (a loop run's learner dataset), at several shares of the comparisons, "
        "and measure each on fresh task prompts: exact-match, labeler win rate against the "
        "SFT-only policy (training and held-out labelers), KL to the SFT reference, and "
        "the alignment tax (loss on held-out pretraining text). Writes ablate.json, "
        "ablate.md and ablate.png to --out.",
    )
    add_dataclass_arguments(p, AblateConfig)
    p.set_defaults(func=_ablate)

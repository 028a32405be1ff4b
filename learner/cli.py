"""`instructloop learn`: the learner's subcommand, options from its config dataclasses.

The process options (LearnerConfig, ConsumerConfig, RoundConfig) and step 3's choice of
algorithm (AlignConfig: --algorithm, --dpo-*, --rl-*) are unprefixed. The three
trainers share field names (learning_rate, seed, ...), so their options carry a prefix:
--sft-*, --rm-*, --ppo-* (e.g. --ppo-iterations, --rm-learning-rate).
"""

from __future__ import annotations

import argparse
import logging
import sys

from instructloop.cliargs import add_dataclass_arguments, dataclass_from_args
from instructloop.learner.config import (
    ALGORITHMS,
    GATE_REWARD_MODELS,
    AlignConfig,
    LearnerConfig,
    PPOConfig,
    RewardConfig,
    RoundConfig,
    SFTStepConfig,
)
from instructloop.learner.consumer import ConsumerConfig

PREFIXED = (("sft", SFTStepConfig), ("rm", RewardConfig), ("ppo", PPOConfig))


def add_prefixed_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str) -> None:
    """add_dataclass_arguments with every option renamed --PREFIX-NAME (dest PREFIX_NAME)."""
    scratch = argparse.ArgumentParser(add_help=False)
    add_dataclass_arguments(scratch, cls)
    group = parser.add_argument_group(f"{cls.__name__} (--{prefix}-*)", (cls.__doc__ or "").strip())
    for action in scratch._actions:
        action.option_strings = [
            f"--no-{prefix}-{s[5:]}" if s.startswith("--no-") else f"--{prefix}-{s[2:]}"
            for s in action.option_strings
        ]
        action.dest = f"{prefix}_{action.dest}"
        if action.metavar and not action.metavar.startswith("{"):
            action.metavar = f"{prefix}_{action.metavar}".upper()
        group._add_action(action)


def prefixed_from_args(cls: type, args: argparse.Namespace, prefix: str):
    strip = len(prefix) + 1
    values = {k[strip:]: v for k, v in vars(args).items() if k.startswith(prefix + "_")}
    return dataclass_from_args(cls, argparse.Namespace(**values))


def _learn(args: argparse.Namespace) -> int:
    from instructloop.learner.main import Configs, run  # torch, transformers: only here

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        cfgs = Configs(
            learner=dataclass_from_args(LearnerConfig, args),
            consumer=dataclass_from_args(ConsumerConfig, args),
            round=dataclass_from_args(RoundConfig, args),
            align=dataclass_from_args(AlignConfig, args),
            **{p: prefixed_from_args(cls, args, p) for p, cls in PREFIXED},
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run(cfgs)


def register(subparsers) -> None:
    """Add the `learn` subcommand to the `instructloop` command's subparsers."""
    p = subparsers.add_parser(
        "learn",
        help="run the learner: consume feedback, SFT -> RM -> PPO rounds, publish versions",
        description="Consume the server's prompt and feedback streams into a dataset under "
        "--data-dir and run InstructGPT rounds (SFT on new demonstrations, reward model, "
        "PPO or the --algorithm chosen, gate on held-out users) when enough new comparisons "
        "arrived; publish each "
        "candidate to --model-store and the registry, and promote it if it passed the gate.",
    )
    add_dataclass_arguments(p, LearnerConfig)
    add_dataclass_arguments(p, ConsumerConfig)
    add_dataclass_arguments(p, RoundConfig)
    add_dataclass_arguments(p, AlignConfig)
    for action in p._actions:
        if action.dest == "algorithm":
            action.choices, action.metavar = ALGORITHMS, None  # --help lists them
        if action.dest == "gate_reward_model":
            action.choices, action.metavar = GATE_REWARD_MODELS, None
    for prefix, cls in PREFIXED:
        add_prefixed_arguments(p, cls, prefix)
    p.set_defaults(func=_learn)

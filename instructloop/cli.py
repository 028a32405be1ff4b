"""The `instructloop` command.

Server side:  serve, init-model, learn; up (Redis + server + learner), simulate (users).
Client side:  generate, feedback, model (instructloop.clients.cli);
              models, users, export (instructloop.clients.models_cli, users_cli, export: admin);
              web (instructloop.web: pages for labelers and operators).
Heavy imports (vLLM, torch) happen inside the subcommand that needs them, so the client
commands start fast.
"""

from __future__ import annotations

import argparse
import sys

from instructloop.cliargs import add_dataclass_arguments, dataclass_from_args


def _serve(args: argparse.Namespace) -> int:
    from instructloop.serve.app import run
    from instructloop.serve.config import ServerConfig

    return run(dataclass_from_args(ServerConfig, args))


def _init_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from instructloop.pretrain import PretrainConfig, pretrain_base

    out = Path(args.dir)
    if out.exists():
        if not args.force:
            print(f"error: {out} exists; pass --force to replace it", file=sys.stderr)
            return 1
        import shutil

        shutil.rmtree(out)
    cfg = dataclass_from_args(PretrainConfig, args)
    if args.random_init:
        from instructloop.tinymodel import build_tiny_model

        print(f"building a random-init model (BPE tokenizer) in {out} ...", file=sys.stderr)
        build_tiny_model(out, cfg.shape())
    else:
        print(f"pretraining the base model in {out} ...", file=sys.stderr)
        pretrain_base(out, cfg)
    print(f"done: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from instructloop.clients import cli as client_cli
    from instructloop.clients import export, models_cli, users_cli
    from instructloop.learner import cli as learner_cli
    from instructloop.loop import ablate
    from instructloop.loop import cli as loop_cli
    from instructloop.pretrain import PretrainConfig
    from instructloop.serve.config import ServerConfig
    from instructloop.web import cli as web_cli

    parser = argparse.ArgumentParser(
        prog="instructloop",
        description="The InstructGPT recipe as a live service: serve a policy on vLLM, "
        "collect rankings, learn, hot-swap.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "serve",
        help="run the gRPC server (vLLM engine, Redis logging)",
        description="Run one server replica. With no --redis-url it starts an embedded "
        "redis-server with AOF persistence under --data-dir; with no --model it serves the "
        "default base model, pretraining it on first start (minutes, once).",
    )
    add_dataclass_arguments(p, ServerConfig)
    p.set_defaults(func=_serve)

    p = sub.add_parser(
        "init-model",
        help="pretrain the small default base model locally (no downloads)",
        description="Pretrain a small Llama-architecture model (head_dim 64, one token per "
        "character) on a corpus generated here: free text that uses the task skills "
        "(reversing, sorting, upper-casing, counting, copying) and worksheets of "
        "instructions without answers, never an instruction followed by its answer. "
        "Deterministic for a seed and --max-steps; writes an HF-format directory. "
        "--random-init builds an untrained model of the same shape instead (BPE tokenizer).",
    )
    p.add_argument("dir", help="output directory")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.add_argument(
        "--random-init", action="store_true", help="no pretraining: random weights, BPE tokenizer"
    )
    add_dataclass_arguments(p, PretrainConfig)
    p.set_defaults(func=_init_model)

    client_cli.register(sub)
    models_cli.register(sub)
    users_cli.register(sub)
    export.register(sub)
    learner_cli.register(sub)
    loop_cli.register(sub)
    ablate.register(sub)
    web_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

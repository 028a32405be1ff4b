"""The `instructloop` command.

Server side:  serve, init-model, learn; up (Redis + server + learner), simulate (users).
Client side:  generate, feedback, model (instructloop.clients.cli);
              models (instructloop.clients.models_cli, admin).
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

    from instructloop.tinymodel import TinyModelConfig, build_tiny_model

    out = Path(args.dir)
    if out.exists():
        if not args.force:
            print(f"error: {out} exists; pass --force to replace it", file=sys.stderr)
            return 1
        import shutil

        shutil.rmtree(out)
    cfg = dataclass_from_args(TinyModelConfig, args)
    print(f"building the tiny default model in {out} ...", file=sys.stderr)
    build_tiny_model(out, cfg)
    print(f"done: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from instructloop.clients import cli as client_cli
    from instructloop.clients import models_cli
    from instructloop.learner import cli as learner_cli
    from instructloop.loop import cli as loop_cli
    from instructloop.serve.config import ServerConfig
    from instructloop.tinymodel import TinyModelConfig

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
        "default tiny model, building it on first start.",
    )
    add_dataclass_arguments(p, ServerConfig)
    p.set_defaults(func=_serve)

    p = sub.add_parser(
        "init-model",
        help="build the small default policy locally (no downloads)",
        description="Build a tiny Llama-architecture model (random init, head_dim 64) and a "
        "BPE tokenizer trained with `tokenizers`, as an HF-format directory.",
    )
    p.add_argument("dir", help="output directory")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    add_dataclass_arguments(p, TinyModelConfig)
    p.set_defaults(func=_init_model)

    client_cli.register(sub)
    models_cli.register(sub)
    learner_cli.register(sub)
    loop_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

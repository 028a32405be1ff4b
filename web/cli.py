"""`instructloop web`: run the web app on its own (uvicorn), against a running server."""

from __future__ import annotations

import argparse
import sys

from instructloop.cliargs import add_dataclass_arguments, dataclass_from_args

from .config import WebConfig


def _web(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        print(f"error: the web app needs the `web` extra ({e}): pip install -e '.[web]'")
        return 1

    cfg = dataclass_from_args(WebConfig, args)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.secure_cookies:
        print(
            f"warning: serving plain HTTP on {cfg.host}: session cookies cross the network in "
            "the clear; put the app behind HTTPS and pass --secure-cookies",
            file=sys.stderr,
        )
    print(f"instructloop web on http://{cfg.host}:{cfg.port}/ (gRPC {cfg.target})", flush=True)
    uvicorn.run(
        create_app(cfg),
        host=cfg.host,
        port=cfg.port,
        log_level=cfg.log_level,
        timeout_graceful_shutdown=5,  # open event streams end then
    )
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "web",
        help="pages for labelers and operators (sign-in, labeling, playground, dashboard)",
        description="A small web app over the gRPC API: labelers rank queued prompts' samples "
        "with the keyboard or by drag, write demonstrations and try the playground; operators "
        "watch versions, the canary and replicas live, promote, roll back, freeze and export "
        "feedback. Sign in with a credential from `instructloop users add`, or the admin "
        "token; the credential stays on the server.",
    )
    add_dataclass_arguments(p, WebConfig)
    p.set_defaults(func=_web)

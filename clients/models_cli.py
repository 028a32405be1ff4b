"""`instructloop models ...`: list, inspect, promote and roll back model versions.

    instructloop models list           # key metrics: RM acc, gate win rate, KL, feedback
    instructloop models show v3        # every metric, gate measures, lineage
    instructloop models promote v3 --reason "wins 71% on held-out"
    instructloop models rollback [v1]
    instructloop models freeze --reason "incident 42" / unfreeze
    instructloop models canary v4 --share 0.1 / canary --clear

Every subcommand needs the admin credential: --admin-token, $INSTRUCTLOOP_ADMIN_TOKEN,
or the server's DATA_DIR/admin-token file (--data-dir).
"""

from __future__ import annotations

import argparse
import getpass
from datetime import UTC, datetime

from rich.console import Console
from rich.table import Table

from instructloop.v1 import admin_pb2

from .admin import KEY_METRICS, AdminClient, default_token, key_metrics
from .cli import _command, _print_json, connection_options
from .sdk import default_target, tls_credentials


def admin_options() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Parent parsers of every admin subcommand: connection and credential; --reason."""
    common, group = connection_options("connection and credential", timeout=30.0)
    group.add_argument(
        "--admin-token",
        metavar="TOKEN",
        default=None,
        help="admin credential (default: $INSTRUCTLOOP_ADMIN_TOKEN, else DATA_DIR/admin-token)",
    )
    group.add_argument(
        "--data-dir",
        metavar="DIR",
        default=None,
        help="the server's data directory, to read admin-token from "
        "(default: $INSTRUCTLOOP_DATA_DIR, else ./data)",
    )
    group.add_argument(
        "--actor",
        metavar="NAME",
        default=None,
        help="your name in the audit log (default: your login name)",
    )
    reason = argparse.ArgumentParser(add_help=False)
    reason.add_argument("--reason", default="", help="why, for the audit log")  # fmt: skip

    return common, reason


def register(subparsers: argparse._SubParsersAction) -> None:
    common, reason = admin_options()

    p = subparsers.add_parser(
        "models", help="list, promote and roll back model versions (admin)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    q = sub.add_parser("list", parents=[common], help="versions, aliases, replicas")
    q.set_defaults(func=_command(_list, _connect))
    q = sub.add_parser("show", parents=[common], help="one version: manifest, metrics, lineage")
    q.add_argument("version", help="version id, e.g. v3")
    q.set_defaults(func=_command(_show, _connect))
    q = sub.add_parser("promote", parents=[common, reason], help="make VERSION current")
    q.add_argument("version", help="version id, e.g. v3")
    q.set_defaults(func=_command(_promote, _connect))
    q = sub.add_parser("rollback", parents=[common, reason],
                       help="make `previous` (or VERSION) current again")  # fmt: skip
    q.add_argument("version", nargs="?", default="", help="version id (default: previous)")
    q.set_defaults(func=_command(_rollback, _connect))
    q = sub.add_parser("freeze", parents=[common, reason],
                       help="stop automatic promotion by the learner")  # fmt: skip
    q.set_defaults(func=_command(_freeze, _connect))
    q = sub.add_parser("unfreeze", parents=[common, reason], help="allow automatic promotion")
    q.set_defaults(func=_command(_unfreeze, _connect))
    q = sub.add_parser("canary", parents=[common, reason],
                       help="route a share of traffic to a LoRA version")  # fmt: skip
    q.add_argument("version", nargs="?", default="", help="version id (omit with --clear)")
    q.add_argument("--share", type=float, default=0.1, help="share of traffic, 0..0.5")
    q.add_argument("--clear", action="store_true", help="stop the canary")
    q.add_argument(
        "--promote-at",
        type=float,
        default=0.0,
        metavar="RATE",
        help="promote the canary once its arena win rate reaches RATE (0: never)",
    )
    q.add_argument(
        "--rollback-at",
        type=float,
        default=0.0,
        metavar="RATE",
        help="end the canary once its win rate falls to RATE (0: never)",
    )
    q.add_argument(
        "--min-comparisons",
        type=int,
        default=50,
        metavar="N",
        help="arena judgements needed before either decision, each user's judgement of a "
        "prompt counted once (default: 50)",
    )
    q.add_argument(
        "--min-users",
        type=int,
        default=0,
        metavar="N",
        help="distinct users needed before the canary is promoted or ended; 0 = the server "
        "default 5",
    )
    q.set_defaults(func=_command(_canary, _connect))


def _connect(args: argparse.Namespace) -> AdminClient:
    token = args.admin_token if args.admin_token is not None else default_token(args.data_dir)
    try:
        actor = args.actor or getpass.getuser()
    except (OSError, KeyError):
        actor = "admin"
    timeout = args.timeout if args.timeout > 0 else None
    return AdminClient(
        args.target or default_target(), token=token, actor=actor, timeout=timeout,
        credentials=tls_credentials(args.tls_ca),
    )  # fmt: skip


def _when(ts) -> str:
    if not ts.seconds:
        return ""
    return datetime.fromtimestamp(ts.seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _list(args, admin: AdminClient, console: Console) -> int:
    reply = admin.list_versions()
    if args.json:
        _print_json(reply)
        return 0
    table = Table(title="model versions", title_justify="left")
    for col in ("version", "aliases", "kind", "parent", "created", "gate"):
        table.add_column(col)
    for label, _ in KEY_METRICS:
        table.add_column(label, justify="right")
    table.add_column("feedback", justify="right")
    for v in reply.versions:
        gate = "" if v.kind == "base" else ("passed" if v.gate.passed else "rejected")
        key = key_metrics(v)
        shown = ["-" if key[label] is None else f"{key[label]:.3f}" for label, _ in KEY_METRICS]
        row = [v.id, ",".join(v.aliases), v.kind, v.parent, _when(v.created), gate]
        table.add_row(*row, *shown, str(v.feedback_count))
    console.print(table)
    if reply.freeze.frozen:
        console.print(f"[yellow]automatic promotion frozen[/] by {reply.freeze.actor}: "
                      f"{reply.freeze.reason}")  # fmt: skip
    c = reply.canary
    if c.version:
        outcomes = f"{c.wins} wins, {c.losses} losses, {c.ties} ties"
        console.print(f"canary {c.version} takes {c.share:.0%} of traffic; "
                      f"arena win rate {c.win_rate:.1%} ({outcomes})")  # fmt: skip
    replicas = Table(title="replicas", title_justify="left")
    for col in ("replica", "mode", "serving", "seen", "last refused swap"):
        replicas.add_column(col)
    for r in reply.replicas:
        replicas.add_row(r.replica_id, r.mode, r.version, _when(r.seen), r.last_swap_error)
    console.print(replicas)
    return 0


def _show(args, admin: AdminClient, console: Console) -> int:
    detail = admin.get_version(args.version)
    if args.json:
        _print_json(detail)
        return 0
    info = detail.info
    table = Table(show_header=False, title=f"version {info.id}", title_justify="left")
    rows = [
        ("aliases", ", ".join(info.aliases)), ("kind", info.kind), ("parent", info.parent),
        ("lineage", " <- ".join([info.id, *detail.lineage])), ("base", info.base_model),
        ("path", info.path), ("created", _when(info.created)), ("checksum", info.checksum),
        ("gate", f"{'passed' if info.gate.passed else 'rejected'}: {info.gate.reason}"),
        ("feedback", f"{len(detail.feedback_ids)} records"),
    ]  # fmt: skip
    rows += [(f"metric {k}", f"{v:.4g}") for k, v in sorted(info.metrics.items())]
    rows += [(f"gate {k}", f"{v:.4g}") for k, v in sorted(info.gate.measures.items())]
    if info.excluded_users:
        users = ", ".join(info.excluded_users)
        rows.append(("left out", f"{info.excluded_feedback} judgements of {users}"))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    return 0


def _print_change(args, change: admin_pb2.AliasChange, console: Console) -> int:
    if args.json:
        _print_json(change)
    else:
        console.print(f"{change.alias}: {change.from_version or '-'} -> "
                      f"{change.to_version or '-'} (by {change.actor})")  # fmt: skip
    return 0


def _promote(args, admin: AdminClient, console: Console) -> int:
    return _print_change(args, admin.promote(args.version, args.reason), console)


def _rollback(args, admin: AdminClient, console: Console) -> int:
    return _print_change(args, admin.rollback(args.version, args.reason), console)


def _canary(args, admin: AdminClient, console: Console) -> int:
    version = "" if args.clear else args.version
    change = admin.set_canary(
        version, args.share, args.reason, promote_at=args.promote_at,
        rollback_at=args.rollback_at, min_comparisons=args.min_comparisons,
        min_users=args.min_users,
    )  # fmt: skip
    return _print_change(args, change, console)


def _print_freeze(args, state: admin_pb2.FreezeState, console: Console) -> int:
    if args.json:
        _print_json(state)
    else:
        console.print("automatic promotion " + ("frozen" if state.frozen else "allowed"))
    return 0


def _freeze(args, admin: AdminClient, console: Console) -> int:
    return _print_freeze(args, admin.freeze(args.reason), console)


def _unfreeze(args, admin: AdminClient, console: Console) -> int:
    return _print_freeze(args, admin.unfreeze(args.reason), console)

"""`instructloop users ...`: credentials, roles, suspensions and labeler quality (admin).

    instructloop users add ann --role labeler      # prints ann's token, once
    instructloop users add shop-backend --role app --token-out shop.token
    instructloop users list                        # counts, agreement, flags
    instructloop users suspend mallory --reason "inverts every ranking"
    instructloop users reinstate mallory
    instructloop users revoke ann

Roles: app (Generate), labeler (Generate and feedback), admin (everything, the Admin
service included). Every subcommand needs the admin credential, as `instructloop models`.
"""

from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console
from rich.table import Table

from instructloop.v1 import admin_pb2

from .admin import AdminClient
from .cli import UsageError, _command, _print_json
from .models_cli import _connect, _when, admin_options


def register(subparsers: argparse._SubParsersAction) -> None:
    common, reason = admin_options()
    p = subparsers.add_parser(
        "users", help="add, list, suspend and revoke users and their credentials (admin)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sub = p.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    q = sub.add_parser("add", parents=[common], help="create a user and print its token once")
    q.add_argument("user", help="user id: 1..64 letters, digits, '.', '_', '-' or '@'")
    q.add_argument(
        "--role", choices=("labeler", "app", "admin"), default="labeler",
        help="labeler: Generate and feedback; app: Generate only; admin: everything "
        "(default: labeler)",
    )  # fmt: skip
    q.add_argument(
        "--token-out", metavar="PATH", default=None,
        help="write the token to this new file (mode 0600) instead of printing it",
    )  # fmt: skip
    q.set_defaults(func=_command(_add, _connect))
    q = sub.add_parser("list", parents=[common], help="users, roles, counts, agreement, flags")
    q.set_defaults(func=_command(_list, _connect))
    for name, what in (
        ("suspend", "refuse a user's feedback and leave all of it out of the next round"),
        ("reinstate", "lift a suspension"),
        ("revoke", "revoke a user's credential for good"),
    ):
        q = sub.add_parser(name, parents=[common, reason], help=what)
        q.add_argument("user", help="user id")
        q.set_defaults(func=_command(_change, _connect))


def _add(args, admin: AdminClient, console: Console) -> int:
    response = admin.add_user(args.user, args.role)
    if args.token_out:
        try:
            fd = os.open(args.token_out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            # The user exists now, with a token nobody has: say so, and how to recover.
            raise UsageError(
                f"user {args.user} was added, but {args.token_out} cannot be written "
                f"({e.strerror}); revoke it and add another id"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(response.token + "\n")
    if args.json:
        _print_json(response)
        return 0
    console.print(f"added [bold]{response.user.user_id}[/] ({response.user.role})")
    if args.token_out:
        console.print(f"token written to {args.token_out}")
    else:
        print(response.token)
        print("keep this token: it is not stored and cannot be shown again", file=sys.stderr)
    return 0


def _pct(value: float, n: int) -> str:
    return f"{value:.0%} of {n}" if n else "-"


def _list(args, admin: AdminClient, console: Console) -> int:
    response = admin.list_users()
    if args.json:
        _print_json(response)
        return 0
    table = Table(title="users", title_justify="left")
    for col in ("user", "role", "state", "since", "comparisons", "demos", "RM agrees",
                "peers agree", "flag"):  # fmt: skip
        table.add_column(col)
    for u in response.users:
        state = "revoked" if u.revoked else ("suspended" if u.suspended else "active")
        q = u.quality
        table.add_row(
            u.user_id, u.role, state if not u.suspend_reason else f"{state}: {u.suspend_reason}",
            _when(u.created), str(q.comparisons), str(q.demonstrations),
            _pct(q.rm_agreement, q.rm_pairs), _pct(q.peer_agreement, q.peer_pairs),
            q.flag_reason if q.flagged else "",
        )  # fmt: skip
    console.print(table)
    n = response.labeler_agreement_pairs
    console.print(
        f"inter-labeler agreement {response.labeler_agreement:.1%} over {n} pairs"
        if n
        else "inter-labeler agreement: no prompt judged by two users yet"
    )
    return 0


def _change(args, admin: AdminClient, console: Console) -> int:
    action = args.users_command
    if action == "revoke":
        info: admin_pb2.UserInfo = admin.revoke_user(args.user, args.reason)
    else:
        info = admin.suspend_user(args.user, args.reason, suspend=action == "suspend")
    if args.json:
        _print_json(info)
        return 0
    done = {"suspend": "suspended", "reinstate": "reinstated", "revoke": "revoked"}[action]
    console.print(f"{info.user_id}: {done}")
    return 0

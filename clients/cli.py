"""Client subcommands of the `instructloop` command: generate, feedback, task, model.

instructloop/cli.py calls register(subparsers) and then args.func(args); every func here
returns an exit code: 0 on success, 1 when the server returns an error (printed as
`error: CODE: details` on stderr), 2 for a usage error, 130 when interrupted, 141 when
stdout was closed early (a pipe into `head`).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from datetime import UTC
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from instructloop.v1 import api_pb2

from .sdk import Client, default_target, default_user_token, stream_deltas, tls_credentials


class UsageError(Exception):
    """A command line that cannot be turned into a request."""


# --- argument parsing -------------------------------------------------------------------


def connection_options(title: str, timeout: float) -> tuple[argparse.ArgumentParser, Any]:
    """A parent parser with --target, --timeout and --json, and its option group."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group(title)
    group.add_argument(
        "--target",
        metavar="HOST:PORT",
        default=None,
        help="server address (default: $INSTRUCTLOOP_TARGET, else localhost:50051)",
    )
    group.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=timeout,
        help=f"deadline of the call, retries included; 0 waits forever (default: {timeout:g})",
    )
    group.add_argument(
        "--tls-ca",
        metavar="PEM",
        default=None,
        help="connect with TLS, trusting this CA certificate (default: $INSTRUCTLOOP_TLS_CA; "
        "unset: plaintext)",
    )
    group.add_argument("--json", action="store_true", help="print the server's response as JSON")
    return common, group


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the generate, feedback, task and model subcommands to the `instructloop` parser."""
    common, group = connection_options("connection and output", timeout=60.0)
    group.add_argument(
        "--token-file",
        metavar="PATH",
        default=None,
        help="file holding your credential (from `instructloop users add`); default: "
        "$INSTRUCTLOOP_TOKEN, else DATA_DIR/user-token, which `instructloop up` writes",
    )
    user = argparse.ArgumentParser(add_help=False)
    user.add_argument(
        "--user",
        metavar="USER",
        default=None,
        help="user id sent with the call: the server takes it from your credential, so set it "
        "only for a server in open mode (default: $INSTRUCTLOOP_USER; with no credential, "
        "your login name)",
    )
    formatter = argparse.RawDescriptionHelpFormatter

    p = subparsers.add_parser(
        "generate",
        parents=[user, common],
        formatter_class=formatter,
        help="sample answers from the served policy",
        description="Sample N answers to PROMPT from the model version being served.\n"
        "The output names the prompt_id and every sample_id: pass them to\n"
        "`instructloop feedback` to rank, choose, rate or correct the answers.",
        epilog="examples:\n"
        "  instructloop generate --n 4 'Explain a Redis stream in two sentences.'\n"
        "  instructloop generate --chat --stream --max-tokens 200 'Write a haiku.'\n"
        "  echo 'Summarise: ...' | instructloop generate --json -",
    )
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text; '-' reads it from stdin")
    p.add_argument(
        "--n",
        type=int,
        default=1,
        metavar="N",
        help="number of samples, 1..16 (default: 1); use 4..9 to rank them afterwards",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=0,
        metavar="N",
        help="tokens per sample at most (default: 0, the server's default)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        metavar="T",
        help="sampling temperature; 0 is greedy (default: 1.0)",
    )
    p.add_argument(
        "--top-p", type=float, metavar="P", help="nucleus sampling cut, 0..1 (default: 1.0)"
    )
    p.add_argument(
        "--top-k", type=int, metavar="K", help="sample among the K likeliest tokens only"
    )
    p.add_argument(
        "--seed",
        type=int,
        metavar="S",
        help="random seed: same prompt, parameters, seed and version give the same answers",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STR",
        help="stop a sample before this string; repeat the option for several",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="send PROMPT as a user message, rendered with the model's chat template",
    )
    p.add_argument(
        "--system",
        metavar="TEXT",
        help="with --chat, a system message placed before PROMPT",
    )
    p.add_argument(
        "--no-log",
        action="store_true",
        help="keep this prompt out of the training data (it cannot receive feedback)",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="print text as it is generated (with --json: one JSON message per line)",
    )
    p.set_defaults(func=_command(_generate))

    p = subparsers.add_parser(
        "feedback",
        formatter_class=formatter,
        help="judge the samples of a logged prompt",
        description="Send your judgement of the samples that `instructloop generate`\n"
        "returned. One judgement per user per prompt; it trains the next policy version.",
        epilog="examples:\n"
        "  instructloop feedback rank P S3 S1=S2 S4      S3 best, S1 and S2 tied, S4 worst\n"
        "  instructloop feedback choose P S2 S1          S2 is better than S1\n"
        "  instructloop feedback demo P 'The answer I wanted.'\n"
        "  instructloop feedback rate P S1=6 S2=3        scores on the server's scale",
    )
    kinds = p.add_subparsers(dest="feedback_kind", metavar="KIND", required=True)
    key = argparse.ArgumentParser(add_help=False)
    key.add_argument(
        "--key",
        default="",
        metavar="KEY",
        help="idempotency key: resending the same feedback with the same key is not "
        "counted twice (default: a fresh random key)",
    )
    parents = [user, key, common]
    prompt_help = "the prompt_id printed by `instructloop generate`"

    q = kinds.add_parser(
        "rank",
        parents=parents,
        help="order samples best to worst",
        description="Rank the samples of PROMPT_ID from best to worst. Tie samples by "
        "joining their ids with '=', e.g. S1=S2.",
    )
    q.add_argument("prompt_id", metavar="PROMPT_ID", help=prompt_help)
    q.add_argument(
        "samples", nargs="+", metavar="SAMPLE", help="sample ids, best first; S1=S2 ties them"
    )
    q.set_defaults(func=_command(_rank))

    q = kinds.add_parser(
        "choose",
        parents=parents,
        help="prefer one sample over another",
        description="Say which of two samples of PROMPT_ID is better.",
    )
    q.add_argument("prompt_id", metavar="PROMPT_ID", help=prompt_help)
    q.add_argument("chosen", metavar="CHOSEN", help="the better sample id")
    q.add_argument(
        "rejected",
        metavar="REJECTED",
        nargs="?",
        default="",
        help="the worse sample id; may be left out when the prompt has exactly two samples",
    )
    q.set_defaults(func=_command(_choose))

    q = kinds.add_parser(
        "demo",
        parents=parents,
        help="write the answer you wanted",
        description="Send the answer you would have wanted for PROMPT_ID (a demonstration).",
    )
    q.add_argument("prompt_id", metavar="PROMPT_ID", help=prompt_help)
    q.add_argument("text", metavar="TEXT", help="the ideal answer; '-' reads it from stdin")
    q.set_defaults(func=_command(_demo))

    q = kinds.add_parser(
        "rate",
        parents=parents,
        help="score samples",
        description="Score samples of PROMPT_ID on the server's rating scale "
        "(see `instructloop model`, 1..7 by default).",
    )
    q.add_argument("prompt_id", metavar="PROMPT_ID", help=prompt_help)
    q.add_argument(
        "scores", nargs="+", metavar="SAMPLE=SCORE", help="a sample id and its score, e.g. S1=5"
    )
    q.set_defaults(func=_command(_rate))

    p = subparsers.add_parser(
        "task",
        formatter_class=formatter,
        help="take prompts other users sent from the labeling queue",
        description="Labelers (role labeler or admin) take work from the labeling queue: a\n"
        "prompt another user sent and its samples, leased to you for a while. Judge\n"
        "it with `instructloop feedback rank PROMPT_ID ...` (that closes the lease), or\n"
        "give it back with `instructloop task skip TASK_ID`.",
        epilog="examples:\n"
        "  instructloop task next\n"
        "  instructloop feedback rank P S3 S1=S2 S4\n"
        "  instructloop task skip T --reason 'not my language' --cannot-rank",
    )
    steps = p.add_subparsers(dest="task_step", metavar="STEP", required=True)
    q = steps.add_parser(
        "next",
        parents=[user, common],
        help="lease the next task and show it",
        description="Lease one queue item and show its prompt and samples. While your "
        "lease is live you get the same task again. Exit code 1 with NOT_FOUND when "
        "there is nothing for you.",
    )
    q.set_defaults(func=_command(_task_next))
    q = steps.add_parser(
        "skip",
        parents=[user, common],
        help="give a leased task back",
        description="Give TASK_ID back: it goes to other labelers, never back to you. With "
        "--cannot-rank (and a --reason) it also counts as unrankable; items that enough "
        "labelers cannot rank leave the queue.",
    )
    q.add_argument("task_id", metavar="TASK_ID", help="the task_id printed by `task next`")
    q.add_argument("--reason", default="", metavar="TEXT", help="why (kept for operators)")
    q.add_argument(
        "--cannot-rank",
        action="store_true",
        help="you cannot judge this item (needs --reason), rather than a plain skip",
    )
    q.set_defaults(func=_command(_task_skip))

    p = subparsers.add_parser(
        "model",
        parents=[common],
        help="show the served model version and server limits",
        description="Show which model version the server runs, since when, and its limits.",
    )
    p.set_defaults(func=_command(_model))


def _token(args: argparse.Namespace) -> str:
    if args.token_file:
        try:
            with open(args.token_file) as f:
                return f.read().strip()
        except OSError as e:
            raise UsageError(f"cannot read --token-file: {e.strerror}") from None
    return default_user_token()


def _public_client(args: argparse.Namespace) -> Client:
    timeout = args.timeout if args.timeout > 0 else None
    return Client(
        args.target or default_target(),
        timeout=timeout,
        credentials=tls_credentials(args.tls_ca),
        token=_token(args),
    )


def _command(
    handler: Callable[[argparse.Namespace, Any, Console], int],
    connect: Callable[[argparse.Namespace], Any] = _public_client,
) -> Callable[[argparse.Namespace], int]:
    """Wrap a handler: open the client, map errors to messages and exit codes."""

    def run(args: argparse.Namespace) -> int:
        try:
            with connect(args) as client:
                return handler(args, client, Console(highlight=False))
        except grpc.RpcError as error:
            code = error.code() if hasattr(error, "code") else None
            details = error.details() if hasattr(error, "details") else str(error)
            name = code.name if code is not None else "UNKNOWN"
            print(f"error: {name}: {details}", file=sys.stderr)
            return 1
        except UsageError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # e.g. piped into `head`
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so the exit flush does not fail again
            return 141

    return run


def _user(args: argparse.Namespace) -> str:
    """The user id to send: --user, $INSTRUCTLOOP_USER, else empty (the server takes it
    from the credential), or the login name when there is no credential (open mode)."""
    if args.user:
        return args.user
    if os.environ.get("INSTRUCTLOOP_USER"):
        return os.environ["INSTRUCTLOOP_USER"]
    if _token(args):
        return ""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name in some containers
        return ""


def _text(value: str) -> str:
    return sys.stdin.read() if value == "-" else value


def _print_json(message: Message, indent: int | None = 2) -> None:
    print(
        json_format.MessageToJson(
            message,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
            indent=indent,
        )
    )


# --- generate ---------------------------------------------------------------------------


def _generate(args: argparse.Namespace, client: Client, console: Console) -> int:
    prompt = _text(args.prompt)
    messages = None
    if args.chat or args.system:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": prompt})
    kwargs: dict[str, Any] = dict(
        prompt=None if messages else prompt,
        messages=messages,
        n=args.n,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        user_id=_user(args),
        log=not args.no_log,
    )
    if not args.stream:
        response = client.generate(**kwargs)
        if args.json:
            _print_json(response)
            return 0
        _print_header(console, response)
        for sample in response.samples:
            console.print(_sample_panel(sample.index, sample.text, sample))
        return 0

    texts: dict[int, str] = {}
    final: api_pb2.GenerateResponse | None = None
    stream = client.generate_stream(**kwargs, step_deltas=True)
    if args.json:
        for message in stream:
            _print_json(message, indent=None)
        return 0
    if args.n <= 1:  # one sample: plain text straight to the terminal
        for message in stream:
            if message.HasField("final"):
                final = message.final
            for delta in stream_deltas(message):
                sys.stdout.write(delta.text)
            sys.stdout.flush()
        print()
    else:  # several samples grow side by side in live panels
        with Live(console=console, vertical_overflow="visible") as live:
            for message in stream:
                if message.HasField("final"):
                    final = message.final
                for delta in stream_deltas(message):
                    texts[delta.index] = texts.get(delta.index, "") + delta.text
                panels = [_sample_panel(i, texts[i]) for i in sorted(texts)]
                live.update(Group(*panels), refresh=False)
        if not console.is_terminal:
            console.print()  # Live leaves its last frame unterminated when piped
    if final is not None:
        _print_header(console, final)
        console.print(_samples_table(final))
    return 0


def _finish(reason: int) -> str:
    try:
        return api_pb2.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()
    except ValueError:  # a reason newer than these stubs
        return str(reason)


def _print_header(console: Console, response: api_pb2.GenerateResponse) -> None:
    console.print(
        f"prompt_id [bold]{escape(response.prompt_id)}[/]   "
        f"version [bold]{escape(response.version)}[/]   "
        f"prompt tokens {response.prompt_token_count}"
    )
    if not response.logged:
        console.print("[yellow]not logged: this prompt cannot receive feedback[/]")


def _sample_panel(index: int, text: str, sample: api_pb2.Sample | None = None) -> Panel:
    title = f"sample {index}" + (f" · {escape(sample.sample_id)}" if sample else "")
    subtitle = f"{_finish(sample.finish_reason)} · {sample.token_count} tokens" if sample else None
    return Panel(Text(text), title=title, subtitle=subtitle, title_align="left")


def _samples_table(response: api_pb2.GenerateResponse) -> Table:
    table = Table("index", "sample_id", "finish", "tokens", "version")
    for s in response.samples:
        table.add_row(
            str(s.index), s.sample_id, _finish(s.finish_reason), str(s.token_count), s.version
        )
    return table


# --- feedback ---------------------------------------------------------------------------


def _feedback_user(args: argparse.Namespace) -> str:
    user = _user(args)
    if not user and not _token(args):
        raise UsageError("no credential and no user id: pass --token-file, or --user (open mode)")
    return user


def _print_feedback(
    args: argparse.Namespace, console: Console, response: api_pb2.SubmitFeedbackResponse
) -> int:
    if args.json:
        _print_json(response)
    elif response.duplicate:
        console.print(f"feedback_id {escape(response.feedback_id)} (duplicate: already recorded)")
    else:
        console.print(f"feedback_id {escape(response.feedback_id)}")
    return 0


def _rank(args: argparse.Namespace, client: Client, console: Console) -> int:
    tiers = [item.split("=") for item in args.samples]
    if any(not sid for tier in tiers for sid in tier):
        raise UsageError("empty sample id in the ranking (write ties as S1=S2)")
    ranking = [tier[0] if len(tier) == 1 else tier for tier in tiers]
    response = client.rank(
        args.prompt_id, ranking, user_id=_feedback_user(args), idempotency_key=args.key
    )
    return _print_feedback(args, console, response)


def _choose(args: argparse.Namespace, client: Client, console: Console) -> int:
    response = client.choose(
        args.prompt_id,
        args.chosen,
        args.rejected,
        user_id=_feedback_user(args),
        idempotency_key=args.key,
    )
    return _print_feedback(args, console, response)


def _demo(args: argparse.Namespace, client: Client, console: Console) -> int:
    text = _text(args.text)
    response = client.demonstrate(
        args.prompt_id, text, user_id=_feedback_user(args), idempotency_key=args.key
    )
    return _print_feedback(args, console, response)


def _rate(args: argparse.Namespace, client: Client, console: Console) -> int:
    scores: dict[str, float] = {}
    for item in args.scores:
        sample_id, _, score = item.rpartition("=")
        try:
            scores[sample_id] = float(score)
        except ValueError:
            raise UsageError(f"expected SAMPLE=SCORE, got {item!r}") from None
        if not sample_id:
            raise UsageError(f"expected SAMPLE=SCORE, got {item!r}")
    response = client.rate(
        args.prompt_id, scores, user_id=_feedback_user(args), idempotency_key=args.key
    )
    return _print_feedback(args, console, response)


# --- task -------------------------------------------------------------------------------


def _task_next(args: argparse.Namespace, client: Client, console: Console) -> int:
    task = client.next_task(user_id=_feedback_user(args))
    if args.json:
        _print_json(task)
        return 0
    until = task.lease_expires.ToDatetime(tzinfo=UTC)
    console.print(
        f"task_id [bold]{escape(task.task_id)}[/]   prompt_id [bold]{escape(task.prompt_id)}[/]"
        f"   labeler {task.lease_number} of {task.overlap}"
    )
    console.print(
        f"leased until {until:%H:%M:%S} UTC   queue: {task.queue_waiting} waiting, "
        f"{task.queue_leased} leased"
    )
    console.print(Panel(Text(task.prompt), title="prompt", title_align="left"))
    for sample in task.samples:
        console.print(_sample_panel(sample.index, sample.text, sample))
    console.print(
        f"rank it: instructloop feedback rank {escape(task.prompt_id)} SAMPLE ...   "
        f"give it back: instructloop task skip {escape(task.task_id)}"
    )
    return 0


def _task_skip(args: argparse.Namespace, client: Client, console: Console) -> int:
    if args.cannot_rank and not args.reason.strip():
        raise UsageError("--cannot-rank needs a --reason")
    response = client.skip_task(
        args.task_id, args.reason, args.cannot_rank, user_id=_feedback_user(args)
    )
    if args.json:
        _print_json(response)
    elif response.dropped:
        console.print(f"dropped: enough labelers cannot rank it ({response.queue_waiting} wait)")
    else:
        console.print(f"given back ({response.queue_waiting} items wait)")
    return 0


# --- model ------------------------------------------------------------------------------


def _model(args: argparse.Namespace, client: Client, console: Console) -> int:
    info = client.get_model()
    if args.json:
        _print_json(info)
        return 0
    limits = info.limits
    loaded = (
        info.loaded_at.ToDatetime(tzinfo=UTC).isoformat() if info.HasField("loaded_at") else "-"
    )
    table = Table(show_header=False, title="served model", title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for name, value in [
        ("version", info.version),
        ("base model", info.base_model),
        ("loaded at", loaded),
        ("since last swap", f"{info.seconds_since_swap:.1f} s"),
        ("max model len", str(info.max_model_len)),
        ("max n", str(limits.max_n)),
        ("max tokens", str(limits.max_tokens)),
        ("max prompt tokens", str(limits.max_prompt_tokens)),
        ("max prompt chars", str(limits.max_prompt_chars)),
        ("rating range", f"{limits.rating_min:g} .. {limits.rating_max:g}"),
    ]:
        table.add_row(name, Text(value))
    console.print(table)
    if info.last_swap_error:
        console.print(Text(f"last swap refused: {info.last_swap_error}", style="red"))
    return 0

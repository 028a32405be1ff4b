"""`instructloop export`: accepted judgements as JSON lines, one per judgement.

    instructloop export > feedback.jsonl
    instructloop export --after 1767225600000-0 --limit 50000 --out more.jsonl

What it reads: the Redis feedback stream, through the Admin API (ExportFeedback), not the
learner's dataset. The stream is where every judgement lands first, whichever learner
(or none) runs, and the server can reach it from anywhere the API reaches (the dataset
is a SQLite file on the learner's own disk); the web dashboard exports the same lines
through the same call. Bound: the stream holds what the learner has not trimmed yet (it
trims acknowledged entries older than its --stream-retention-s, one day), and one call
sends at most --limit lines (server cap 100,000), read from Redis 500 at a time; each
line's entry_id is the cursor to page on with --after. For older judgements, the
learner's dataset is the archive.

A line: entry_id, feedback_id, created (RFC 3339), user, prompt_id, kind, version (of the
prompt), sample_versions (sample id -> version; two versions in an arena), and the
judgement: tiers (a ranking's tiers best first, ties inside a tier; a choice as two
tiers), scores (a rating: sample id -> score), demonstration (text).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from instructloop.v1 import admin_pb2

__all__ = ["export_line", "register"]


def export_line(item: admin_pb2.FeedbackExport) -> dict[str, Any]:
    """One exported judgement as a JSON-ready dict (see the module docstring)."""
    record = item.record
    fb = record.feedback
    kind = fb.WhichOneof("kind") or ""
    line: dict[str, Any] = {
        "entry_id": item.entry_id,
        "feedback_id": record.feedback_id,
        "created": record.created.ToJsonString() if record.created.seconds else "",
        "user": fb.user_id,
        "prompt_id": fb.prompt_id,
        "kind": kind,
        "version": record.version,
        "sample_versions": dict(sorted(item.sample_versions.items())),
    }
    if kind == "ranking":
        line["tiers"] = [list(t.sample_ids) for t in fb.ranking.tiers]
    elif kind == "choice":
        chosen, rejected = fb.choice.chosen_sample_id, fb.choice.rejected_sample_id
        line["tiers"] = [[chosen], [rejected]] if rejected else [[chosen]]
    elif kind == "rating":
        line["scores"] = {s.sample_id: s.score for s in fb.rating.scores}
    elif kind == "demonstration":
        line["demonstration"] = fb.demonstration.text
    return line


def register(subparsers: argparse._SubParsersAction) -> None:
    from .cli import _command
    from .models_cli import _connect, admin_options

    common, _ = admin_options()
    p = subparsers.add_parser(
        "export",
        parents=[common],
        help="accepted judgements as JSON lines (admin)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--after",
        default="",
        metavar="ENTRY_ID",
        help="start after this entry_id (the last line of a previous export); default: the "
        "oldest judgement the stream keeps",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=10_000,
        metavar="N",
        help="lines at most (default: 10000; the server allows 100000 per call)",
    )
    p.add_argument("--out", default="-", metavar="FILE", help="write here (default: stdout)")
    p.set_defaults(func=_command(_export, _connect))


def _export(args, admin, console) -> int:
    out = sys.stdout if args.out == "-" else open(args.out, "w")  # noqa: SIM115
    n = 0
    try:
        for item in admin.export_feedback(args.after, args.limit):
            out.write(json.dumps(export_line(item), ensure_ascii=False) + "\n")
            n += 1
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"exported {n} judgement(s)", file=sys.stderr)
    return 0

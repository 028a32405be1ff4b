"""`instructloop up` and `instructloop simulate`: options from their config dataclasses."""

from __future__ import annotations

import argparse
import asyncio
import sys

from instructloop.cliargs import add_dataclass_arguments, dataclass_from_args

from .simulate import SimulateConfig
from .up import UpConfig


def _up(args: argparse.Namespace) -> int:
    from .up import run

    return run(dataclass_from_args(UpConfig, args))


def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _view(sim):
    """The live progress: totals, then one row per version."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    s = sim.stats
    head = Text.assemble(
        ("instructloop simulate  ", "bold"),
        f"{sim.elapsed():6.0f}s  serving {sim.current or '?'}  ",
        f"comparisons {s.comparisons}/{sim.cfg.max_comparisons} ",
        f"({s.overlapping} overlapping"
        + (f", {s.adversarial} adversarial" if sim.adversaries else "")
        + f")  demonstrations {s.demonstrations}  ",
        f"via queue: {s.generated} prompts from {len(sim.apps)} apps  "
        if sim.cfg.via_queue
        else "",
        (f"errors {s.errors}" if s.errors else "", "red"),
        (f" ({s.dead_users} users died)" if s.dead_users else "", "red"),
    )
    table = Table(box=None, header_style="bold")
    heldout = bool(sim.measurer.heldout)
    columns = ("version", "status", "comps used", "exact greedy", "exact sampled",
               "win vs v0", "win vs SFT") + ("held-out v0", "held-out SFT") * heldout + (
               "corpus", "tax", "RM held-out acc", "KL", "gate (RM) win")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col == "status" else "right")
    rows = sorted(sim.versions.values(), key=lambda v: (v["seen_at_s"], v["id"]))
    for v in rows:
        status = v["status"] + (" *" if "current" in v.get("aliases", []) else "")
        style = {"promoted": "green", "rejected": "red"}.get(v["status"], "")
        used = v["comparisons_used"]
        table.add_row(
            v["id"], Text(status, style=style), "-" if used is None else str(int(used)),
            _fmt(v["exact_match"]), _fmt(v["exact_match_sampled"]),
            _fmt(v["labeler_win_rate"]), _fmt(v["labeler_win_rate_vs_sft"]),
            *(_fmt(v["labeler_win_rate_heldout"]),
              _fmt(v["labeler_win_rate_vs_sft_heldout"])) * heldout,
            _fmt(v["corpus_loss"]), _fmt(v["corpus_tax"], "+.3f"),
            _fmt(v["rm_heldout_accuracy"]), _fmt(v["kl"]), _fmt(v["gate_win_rate"]),
        )  # fmt: skip
    goals = [f"exact match >= {sim.cfg.target_exact_match:.0%}"] * bool(sim.cfg.target_exact_match)
    goals += [f"win vs v0 >= {sim.cfg.target_win_rate:.0%}"] * bool(sim.cfg.target_win_rate)
    foot = Text(
        f"goal: a promoted version with {' and '.join(goals) or 'no target'}   "
        f"({len(sim.eval_prompts)} held-out prompts; * = current; held-out: the win rates "
        "by --heldout-labeler; corpus: loss in nats/token on held-out pretraining text, "
        "tax: corpus minus v0's)"
    )
    if s.last_error:
        foot.append(f"\nlast error: {s.last_error}", style="red")
    return Group(head, table, foot)


def _simulate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from .simulate import Simulation, write_report

    cfg = dataclass_from_args(SimulateConfig, args)
    try:
        sim = Simulation(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    console = Console(stderr=True)
    try:
        if cfg.live:
            with Live(_view(sim), console=console, refresh_per_second=2) as live:
                report = asyncio.run(sim.run(show=lambda: live.update(_view(sim))))
        else:
            last = {"n": -1}

            def show() -> None:
                if sim.stats.comparisons // 100 != last["n"]:
                    last["n"] = sim.stats.comparisons // 100
                    console.print(_view(sim))

            report = asyncio.run(sim.run(show=show))
    except KeyboardInterrupt:
        report = sim.report()
        console.print("interrupted: writing the report of what ran")
    except Exception as e:  # noqa: BLE001 - one line for a person, not a traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    console.print(_view(sim))
    path, plot = write_report(report, cfg.out)
    reached, best = report["reached_target"], report["best"]
    targets = cfg.target_win_rate or cfg.target_exact_match
    if report["failed"]:
        console.print(f"[red]stopped: {report['failed']}[/red]")
    elif reached:
        console.print(
            f"[green]reached the targets with {reached['version']} after "
            f"{reached['comparisons']} comparisons, {reached['seconds']:.0f}s: "
            f"exact match {_fmt(reached['exact_match'], '.1%')}, "
            f"win rate vs v0 {_fmt(reached['win_rate'], '.1%')}[/green]"
        )
    elif targets:
        console.print(
            "[yellow]targets not reached; best promoted: "
            + (
                f"{best['id']}: exact match {_fmt(best['exact_match'], '.1%')}, win vs v0 "
                f"{_fmt(best['labeler_win_rate'], '.1%')}"
                if best
                else "none"
            )
            + "[/yellow]"
        )
    if best:
        console.print(
            f"{best['id']}: held-out labelers' win vs v0 "
            f"{_fmt(best['labeler_win_rate_heldout'], '.1%')}, vs SFT-only "
            f"{_fmt(best['labeler_win_rate_vs_sft_heldout'], '.1%')}; alignment tax "
            f"{_fmt(best['corpus_tax'], '+.3f')} nats/token on held-out corpus text "
            f"(corpus loss {_fmt(best['corpus_loss'])}), counting "
            f"{_fmt(best['count_exact_match'], '.1%')}"
        )
    d = report.get("detection") or {}
    if d:
        line = (
            f"inter-labeler agreement {_fmt(d['labeler_agreement'], '.1%')} over "
            f"{d['labeler_agreement_pairs']} pairs; flagged by the learner: "
            f"{_fmt(d['honest_flagged'], '.0%')} of {d['honest']} honest users"
        )
        if d["adversaries"]:
            line += (
                f", {_fmt(d['adversaries_flagged'], '.0%')} of {d['adversaries']} "
                f"{d['adversary']} adversaries"
            )
        console.print(line)
    console.print(f"report: {path}" + (f", plot: {plot}" if plot else " (no matplotlib: no plot)"))
    if report["failed"]:
        return 1
    return 0 if reached or not targets else 3


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "up",
        help="run the whole loop locally: embedded Redis, server, learner",
        description="Start the embedded Redis, the server on the default base model and the "
        "learner as child processes, and print where to connect. Ctrl-C (or SIGTERM) stops "
        "the learner, then the server, then Redis. A second `up` on the same --data-dir "
        "resumes: versions, the dataset and the queues survive.",
    )
    add_dataclass_arguments(p, UpConfig)
    p.set_defaults(func=_up)

    p = subparsers.add_parser(
        "simulate",
        help="simulated users drive a running loop; measures exact match and win rates",
        description="A population of simulated users sends prompts of a task set, ranks the "
        "K samples with a labeler (--labeler module:function, a callable (prompt, samples) "
        "-> ranking), sometimes writes a demonstration; each user has its own credential, a "
        "share may be adversaries (--adversaries, --adversary), and the learner's held-out "
        "users only evaluate. With --via-queue, simulated apps send the prompts and the "
        "labelers take their work only from the server's labeling queue (NextTask; the "
        "server needs --queue-share > 0). Shows "
        "live progress and writes report.json and report.png to --out. Every version is "
        "measured by greedy and sampled exact-match, labeler win rate vs v0 and vs its "
        "round's SFT-only policy, RM held-out accuracy and KL. Exit code 0 when a promoted "
        "version reached the targets, 3 when none did, 1 when every user died.",
    )
    add_dataclass_arguments(p, SimulateConfig)
    p.set_defaults(func=_simulate)

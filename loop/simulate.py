"""`instructloop simulate`: simulated users drive a running loop through the public API.

Every simulated user does what a real one would, and nothing else:

  1. Generate(prompt, n=K) for a prompt of the task set (tasks.py);
  2. rank the K samples with the labeler (labelers.py) and SubmitFeedback(ranking);
  3. sometimes write a demonstration (the labeler's `demonstrate(prompt)`).

Users are split into training and held-out users by the learner's own stable hash of the
user id (same fraction and salt as the learner), so the held-out users' feedback only
ever evaluates (RM held-out accuracy, the gate), as InstructGPT split by customer.

Measuring (InstructGPT's win rate): at the start, while v0 serves, one sample per
held-out evaluation prompt is recorded from v0 (in LoRA mode v0 can also be pinned
later). Whenever GetModel reports a new served version, the simulator asks that version
(pinned by id) for one sample per evaluation prompt and the labeler compares the two:
a win counts 1, a tie 1/2. ListVersions (Admin API) gives every published version's
gate result, RM held-out accuracy and KL. Requests for evaluation are not logged.

The run ends when a served version reaches --target-win-rate, at --max-minutes, or
--settle-s after the last comparison was sent with no new version; then report.json
and report.png are written to --out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from instructloop.clients import AsyncClient
from instructloop.clients.admin import AdminClient, default_token
from instructloop.clients.sdk import default_target
from instructloop.learner.dataset import user_split  # pure: the split contract, no training

from . import report as report_io
from .labelers import check_ranking, compare, load_labeler
from .tasks import make_prompt

UNREACHABLE_S = 60.0  # the server answered nothing for this long: stop and report


def _default_data_dir() -> str:
    return os.environ.get("INSTRUCTLOOP_DATA_DIR", "./data")


@dataclass
class SimulateConfig:
    """A population of simulated users, their labeler, and when to stop."""

    target: str = field(
        default_factory=default_target,
        metadata={"help": "Server address (default: $INSTRUCTLOOP_TARGET or localhost:50051)."},
    )
    data_dir: str = field(
        default_factory=_default_data_dir,
        metadata={
            "help": "The loop's data dir: the admin token is read from DATA_DIR/admin-token."
        },
    )
    admin_token: str = field(
        default="",
        metadata={"help": "Admin credential (default: $INSTRUCTLOOP_ADMIN_TOKEN or file)."},
    )
    labeler: str = field(
        default="instructloop.loop.labelers:correct_concise",
        metadata={"help": "The users' preference: a callable (prompt, samples) -> ranking."},
    )
    users: int = field(default=50, metadata={"help": "Simulated users."})
    heldout_fraction: float = field(
        default=0.2, metadata={"help": "Held-out share of users: the learner's --heldout-fraction."}
    )
    split_salt: str = field(
        default="instructloop-split-v1", metadata={"help": "The learner's --split-salt."}
    )
    k: int = field(
        default=8,
        metadata={"help": "Samples per prompt that a user ranks (K): C(K,2) pairs for the RM."},
    )
    max_tokens: int = field(default=16, metadata={"help": "Tokens per sample."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    demo_prob: float = field(
        default=0.8, metadata={"help": "Chance that a user also writes a demonstration."}
    )
    rate: float = field(
        default=3.0, metadata={"help": "Comparisons per second, all users together (0: no cap)."}
    )
    concurrency: int = field(default=4, metadata={"help": "Users acting at the same time."})
    max_comparisons: int = field(default=2000, metadata={"help": "Comparisons to send at most."})
    max_minutes: float = field(default=20.0, metadata={"help": "Wall-time limit of the run."})
    settle_s: float = field(
        default=300.0,
        metadata={"help": "After the last comparison, wait this long for a new version."},
    )
    eval_prompts: int = field(
        default=100, metadata={"help": "Held-out evaluation prompts for the win rate vs v0."}
    )
    eval_temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature of the evaluation samples."}
    )
    target_win_rate: float = field(
        default=0.8, metadata={"help": "Stop once a served version reaches it (0: never)."}
    )
    poll_s: float = field(default=2.0, metadata={"help": "How often to check the served version."})
    seed: int = field(default=0, metadata={"help": "Seed of prompts, users and demonstrations."})
    out: str = field(default="simulate-out", metadata={"help": "Where report.json/.png go."})
    live: bool = field(default=True, metadata={"help": "Live progress display (rich)."})


@dataclass
class Stats:
    comparisons: int = 0
    heldout_comparisons: int = 0
    demonstrations: int = 0
    errors: int = 0
    last_error: str = ""


class Simulation:
    def __init__(self, cfg: SimulateConfig):
        self.cfg = cfg
        self.labeler = load_labeler(cfg.labeler)
        self.demonstrate = getattr(self.labeler, "demonstrate", None)
        self.rng = random.Random(cfg.seed)
        users = [f"sim-{cfg.seed}-{i:03d}" for i in range(cfg.users)]
        split = {u: user_split(u, cfg.heldout_fraction, cfg.split_salt) for u in users}
        self.train_users = [u for u in users if split[u] == "train"]
        self.heldout_users = [u for u in users if split[u] == "heldout"]
        if not self.heldout_users or not self.train_users:
            raise ValueError("the population needs training and held-out users: raise --users")
        eval_rng = random.Random(cfg.seed + 1_000_003)
        self.eval_prompts = [make_prompt(eval_rng) for _ in range(cfg.eval_prompts)]
        self.stats = Stats()
        self.started = 0  # comparisons begun (a user reserves one before generating)
        self.t0 = time.monotonic()
        self.next_slot = self.t0
        self.v0_samples: list[str] = []
        self.versions: dict[str, dict] = {}  # id -> row (see _refresh_versions)
        self.served: list[dict] = []  # {version, t, comparisons} each time GetModel changed
        self.current = ""
        self.done_sending = asyncio.Event()
        self.stop = asyncio.Event()
        self.last_sent_at = 0.0
        self.reached: dict | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    # ------------------------------------------------------------------- users

    async def _slot(self) -> None:
        """Pace the population to --rate comparisons per second."""
        if self.cfg.rate <= 0:
            return
        now = time.monotonic()
        self.next_slot = max(self.next_slot, now) + 1.0 / self.cfg.rate
        await asyncio.sleep(max(0.0, self.next_slot - 1.0 / self.cfg.rate - now))

    async def user_loop(self, client: AsyncClient) -> None:
        cfg = self.cfg
        while not self.stop.is_set():
            if self.started >= cfg.max_comparisons:
                self.done_sending.set()
                return
            self.started += 1  # reserved before the await: the cap holds across users
            await self._slot()
            heldout = self.rng.random() < len(self.heldout_users) / cfg.users
            user = self.rng.choice(self.heldout_users if heldout else self.train_users)
            prompt = make_prompt(self.rng)
            ranked = False
            try:
                r = await client.generate(
                    prompt, n=cfg.k, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                    user_id=user,
                )  # fmt: skip
                texts = [s.text for s in r.samples]
                tiers = check_ranking(self.labeler(prompt, texts), len(texts))
                ids = [tuple(r.samples[i].sample_id for i in tier) for tier in tiers]
                await client.rank(r.prompt_id, ids, user_id=user)
                ranked = True
                self.stats.comparisons += 1
                self.stats.heldout_comparisons += heldout
                self.last_sent_at = self.elapsed()
                if self.demonstrate is not None and self.rng.random() < cfg.demo_prob:
                    demo = self.demonstrate(prompt)
                    if demo:
                        await client.demonstrate(r.prompt_id, demo, user_id=user)
                        self.stats.demonstrations += 1
            except grpc.RpcError as e:
                if not ranked:
                    self.started -= 1  # give the slot back: no comparison was made
                self.stats.errors += 1
                self.stats.last_error = f"{e.code().name}: {e.details()}"
                await asyncio.sleep(1.0)

    # ------------------------------------------------------------------- measuring

    async def sample_eval(self, client: AsyncClient, version: str) -> list[str | None]:
        """One sample per evaluation prompt from `version` (pinned), not logged."""
        sem = asyncio.Semaphore(8)

        async def one(i: int, prompt: str) -> str | None:
            async with sem:
                try:
                    r = await client.generate(
                        prompt, n=1, max_tokens=self.cfg.max_tokens,
                        temperature=self.cfg.eval_temperature, seed=self.cfg.seed + i,
                        user_id=self.heldout_users[i % len(self.heldout_users)], log=False,
                        version=version,
                    )  # fmt: skip
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                        return None  # the version stopped serving meanwhile
                    raise
                return r.samples[0].text if r.version == version else None

        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(self.eval_prompts))))

    async def record_v0(self, client: AsyncClient) -> None:
        samples = await self.sample_eval(client, "v0")
        if any(s is None for s in samples):
            raise RuntimeError(
                f"v0 is not loaded on the server (it serves {self.current}): the win rate "
                "needs v0's samples. Roll back first (instructloop models rollback v0), use a "
                "fresh --data-dir, or run the loop in LoRA mode (up --enable-lora) to pin v0"
            )
        self.v0_samples = samples  # type: ignore[assignment]

    def win_rate(self, samples: list[str | None]) -> tuple[float, int]:
        outcomes = [
            compare(self.labeler, p, s, v0)
            for p, s, v0 in zip(self.eval_prompts, samples, self.v0_samples, strict=True)
            if s is not None
        ]
        return (sum(outcomes) / len(outcomes) if outcomes else float("nan")), len(outcomes)

    def _refresh_versions(self, admin: AdminClient) -> None:
        listing = admin.list_versions()
        for v in listing.versions:
            row = self.versions.get(v.id)
            if row is None:
                m = dict(v.metrics)
                if v.kind == "base":
                    status = "base"
                elif "win_rate" not in m:
                    status = "sft-weights"  # LoRA mode: the full weights under an adapter
                else:
                    status = "promoted" if v.gate.passed else "rejected"
                row = self.versions[v.id] = {
                    "id": v.id, "kind": v.kind, "parent": v.parent, "status": status,
                    "gate_reason": v.gate.reason,
                    "comparisons_at": self.stats.comparisons,
                    "demonstrations_at": self.stats.demonstrations,
                    "seen_at_s": round(self.elapsed(), 1),
                    "round": m.get("round"), "feedback_seq": m.get("feedback_seq"),
                    "rm_comparisons": m.get("rm_comparisons"),
                    "sft_demonstrations": m.get("sft_demonstrations"),
                    "rm_heldout_accuracy": m.get("rm_heldout_accuracy"),
                    "rm_heldout_pairs": m.get("rm_heldout_pairs"),
                    "kl": m.get("kl"), "gate_win_rate": m.get("win_rate"),
                    "round_seconds": m.get("round_seconds"),
                    "labeler_win_rate": None, "eval_n": 0,
                }  # fmt: skip
            row["aliases"] = list(v.aliases)

    async def monitor(self, client: AsyncClient, admin: AdminClient, show) -> None:
        cfg = self.cfg
        last_ok = self.elapsed()
        while not self.stop.is_set():
            try:
                await asyncio.to_thread(self._refresh_versions, admin)
                model = await client.get_model()
                if model.version != self.current:
                    self.current = model.version
                    self.served.append({
                        "version": model.version, "t": round(self.elapsed(), 1),
                        "comparisons": self.stats.comparisons,
                    })  # fmt: skip
                    await asyncio.to_thread(self._refresh_versions, admin)
                    row = self.versions.get(model.version)
                    if row is not None and model.version != "v0" and not row["eval_n"]:
                        samples = await self.sample_eval(client, model.version)
                        row["labeler_win_rate"], row["eval_n"] = self.win_rate(samples)
                        row["evaluated_at_s"] = round(self.elapsed(), 1)
                        rate = row["labeler_win_rate"]
                        if (
                            cfg.target_win_rate and self.reached is None
                            and row["eval_n"] >= len(self.eval_prompts) // 2
                            and rate >= cfg.target_win_rate
                        ):  # fmt: skip
                            self.reached = {
                                "version": model.version, "win_rate": rate,
                                "comparisons": row["comparisons_at"],
                                "seconds": row["seen_at_s"],
                            }  # fmt: skip
                            self.stop.set()
                last_ok = self.elapsed()
            except grpc.RpcError as e:
                self.stats.errors += 1
                self.stats.last_error = f"{e.code().name}: {e.details()}"
                if self.elapsed() - last_ok > UNREACHABLE_S:
                    self.stats.last_error += f" (for {UNREACHABLE_S:.0f}s: giving up)"
                    self.stop.set()
            show()
            if self.elapsed() > cfg.max_minutes * 60:
                self.stop.set()
            if self.done_sending.is_set() and self.elapsed() - self.last_sent_at > cfg.settle_s:
                self.stop.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), cfg.poll_s)

    # ------------------------------------------------------------------- run

    async def run(self, show=lambda: None) -> dict:
        cfg = self.cfg
        token = cfg.admin_token or default_token(cfg.data_dir)
        async with AsyncClient(cfg.target, timeout=120) as client:
            with AdminClient(cfg.target, token=token, actor="simulate") as admin:
                model = await client.get_model()
                self.current = model.version
                self.served.append({"version": model.version, "t": 0.0, "comparisons": 0})
                await self.record_v0(client)
                await asyncio.to_thread(self._refresh_versions, admin)  # before any traffic
                self.t0 = self.next_slot = time.monotonic()  # the clock starts with traffic
                for row in self.versions.values():
                    row["seen_at_s"] = 0.0  # there before the run
                if threading.current_thread() is threading.main_thread():
                    loop = asyncio.get_running_loop()
                    for sig in (signal.SIGINT, signal.SIGTERM):  # stop, then report
                        loop.add_signal_handler(sig, self.stop.set)
                users = [
                    asyncio.create_task(self.user_loop(client)) for _ in range(cfg.concurrency)
                ]
                try:
                    await self.monitor(client, admin, show)
                finally:
                    self.stop.set()
                    await asyncio.gather(*users, return_exceptions=True)
                await asyncio.to_thread(self._refresh_versions, admin)
        return self.report()

    def report(self) -> dict:
        best = max(
            (v for v in self.versions.values() if v["labeler_win_rate"] is not None),
            key=lambda v: v["labeler_win_rate"], default=None,
        )  # fmt: skip
        return {
            "config": asdict(self.cfg),
            "seconds": round(self.elapsed(), 1),
            "comparisons": self.stats.comparisons,
            "heldout_comparisons": self.stats.heldout_comparisons,
            "demonstrations": self.stats.demonstrations,
            "errors": self.stats.errors,
            "last_error": self.stats.last_error,
            "train_users": len(self.train_users),
            "heldout_users": len(self.heldout_users),
            "reached_target": self.reached,
            "best": best and {k: best[k] for k in ("id", "labeler_win_rate", "comparisons_at")},
            "served": self.served,
            "versions": sorted(
                self.versions.values(), key=lambda v: (v["seen_at_s"], _vnum(v["id"]))
            ),
            "eval": [
                {"prompt": p, "v0": s}
                for p, s in zip(self.eval_prompts, self.v0_samples, strict=True)
            ],
        }


def _vnum(vid: str) -> int:
    return int(vid[1:]) if vid[1:].isdigit() else 0


def write_report(report: dict, out: str) -> tuple[Path, Path | None]:
    out_dir = Path(out)
    path = report_io.write_json(report, out_dir)
    try:
        plot = report_io.write_plot(report, out_dir)
    except ImportError:
        plot = None  # matplotlib is in the `sim` extra
    return path, plot

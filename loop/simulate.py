"""`instructloop simulate`: simulated users drive a running loop through the public API.

Every simulated user does what a real one would, and nothing else:

  1. Generate(prompt, n=K) for a prompt of the task set (tasks.py);
  2. rank the K samples with its labeler (labelers.py; with a population, --labeler a,b,
     user i has labeler i mod n) and SubmitFeedback(ranking);
  3. sometimes write a demonstration (the labeler's `demonstrate(prompt)`).

Every simulated user is a user of the server, with its own labeler credential (added
through the Admin API on first use and kept in DATA_DIR/simulate-users.json, mode 0600).
The learner splits them into training and held-out users by a keyed hash that only the
deployment knows, as InstructGPT split by customer; the simulation cannot choose.
A share of users may be adversaries (--adversaries, --adversary: adversaries.py), and a
share of responses is ranked by a second user too (--overlap), so the learner can measure
agreement between labelers; at the end the report says how many adversaries and how many
honest users the learner flagged.

With --via-queue the work goes through the server's labeling queue, as InstructGPT's
labelers judged prompts customers sent: simulated apps (--apps, role app, their own
credentials) generate the prompts and never rank; the labelers take work only with
NextTask, rank what it hands them and sometimes demonstrate. When the queue has nothing
for a labeler, an app generates a prompt and the labeler asks again. The server must
enqueue prompts (--queue-share > 0; `instructloop up` sets 1): the run checks GetModel
first, and stops with a message if NextTask keeps finding nothing. How many labelers
rank each item is the server's --queue-overlap (--overlap is not used).

Measuring (measure.py), for every version the learner publishes (ListVersions, Admin
API): its checkpoint answers the held-out evaluation prompts (evaluate.py: the files in
the model store that every replica loads), greedily and at --eval-temperature, and

- task success: exact-match rate, greedy and sampled: what a noisy policy cannot fake;
- labeler win rate vs v0 (InstructGPT's win rate): the labeler compares the version's
  sample with v0's for each prompt, a win counts 1, a tie 1/2;
- labeler win rate vs the SFT-only policy of the same round (the paper's PPO vs SFT:
  does the RM + PPO add anything over SFT on the same demonstrations?);
- both win rates again under held-out labelers (--heldout-labeler), who rank nothing
  the learner sees, as InstructGPT reported;
- the corpus loss on held-out pretraining text, and the alignment tax: its rise over
  v0's (capability.py), a capability no labeler ranks; and counting, a skill of that
  text no task asks;
- RM held-out accuracy and KL to the reference, from the version's metrics;

each against the training comparisons the version was trained on (the data-efficiency
curve of report.png). Promoted, rejected and SFT-only versions are all measured.

The run ends when a promoted version reaches every target set (--target-win-rate,
--target-exact-match), at --max-minutes, --settle-s after the last comparison was sent
with no new version, or when every simulated user has died (a labeler that raises ends
its user; the error is counted and shown); then report.json and report.png are written
to --out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
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
from instructloop.v1 import admin_pb2, api_pb2

from . import adversaries
from . import report as report_io
from .evaluate import CheckpointDecoder
from .labelers import Labeler, check_ranking, load_population, member
from .measure import Measurer, best_versions, detection, sft_of, version_row
from .tasks import make_prompt

UNREACHABLE_S = 60.0  # the server answered nothing for this long: stop and report


class QueueStarved(Exception):
    """--via-queue: NextTask keeps finding nothing although the apps keep asking."""


@dataclass
class Judged:
    """A ranking a user sent: what it ranked, for what may follow (a demonstration)."""

    user: str
    prompt: str
    prompt_id: str
    samples: list  # api_pb2.Sample, as the user saw them
    served: str  # the version that was current when they were made


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
        metadata={
            "help": "The users' preference: a callable (prompt, samples) -> ranking, as "
            "module:function; several, comma-separated, make a population (user i gets "
            "labeler i mod n; the win rates give prompt i to labeler i mod n)."
        },
    )
    heldout_labeler: str = field(
        default="instructloop.loop.labelers:correct_polite",
        metadata={
            "help": "Held-out labelers (module:function, comma-separated): they rank "
            "nothing sent to the server and only judge the measured versions, giving the "
            "win rates under labelers who produced no training data ('' = none)."
        },
    )
    users: int = field(default=50, metadata={"help": "Simulated users."})
    adversaries: float = field(
        default=0.0, metadata={"help": "Share of the users who are adversaries (0..1)."}
    )
    adversary: str = field(
        default="inverse",
        metadata={
            "help": "What adversaries do: inverse (reverse every ranking, demonstrate the "
            "worst sample), random (rank at random), promote-canary (rank canary samples "
            "first)."
        },
    )
    overlap: float = field(
        default=0.1,
        metadata={
            "help": "Share of responses a second user ranks too (the learner measures "
            "inter-labeler agreement on them). Not used with --via-queue."
        },
    )
    via_queue: bool = field(
        default=False,
        metadata={
            "help": "Labelers take work only from the server's labeling queue (NextTask); "
            "--apps simulated apps generate the prompts and never rank. Needs a server "
            "with --queue-share > 0; its --queue-overlap sets how many labelers rank each "
            "prompt."
        },
    )
    apps: int = field(
        default=5, metadata={"help": "With --via-queue: simulated apps (role app) that ask."}
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
        default=200, metadata={"help": "Held-out evaluation prompts (every measure)."}
    )
    eval_temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature of the evaluation samples."}
    )
    target_win_rate: float = field(
        default=0.8,
        metadata={"help": "Target: labeler win rate vs v0 of a promoted version (0: none)."},
    )
    target_exact_match: float = field(
        default=0.6,
        metadata={
            "help": "Target: greedy exact-match of a promoted version (0: none). The run "
            "stops once one promoted version reaches every target set."
        },
    )
    corpus_documents: int = field(
        default=200,
        metadata={
            "help": "Held-out pretraining documents each version's corpus loss is measured "
            "on (the alignment tax: a capability no labeler ranks; 0 = neither it nor the "
            "counting probe is measured)."
        },
    )
    eval_threads: int = field(
        default=1, metadata={"help": "torch threads for decoding the evaluation prompts."}
    )
    poll_s: float = field(default=2.0, metadata={"help": "How often to check the served version."})
    seed: int = field(default=0, metadata={"help": "Seed of prompts, users and demonstrations."})
    out: str = field(default="simulate-out", metadata={"help": "Where report.json/.png go."})
    live: bool = field(default=True, metadata={"help": "Live progress display (rich)."})


@dataclass
class Stats:
    comparisons: int = 0
    overlapping: int = 0  # comparisons of a response another user ranked too
    generated: int = 0  # --via-queue: prompts the apps generated
    adversarial: int = 0  # comparisons sent by adversaries
    demonstrations: int = 0
    errors: int = 0
    last_error: str = ""
    dead_users: int = 0  # user loops ended by an error that is not the server's (a labeler's)


class Simulation:
    def __init__(self, cfg: SimulateConfig):
        self.cfg = cfg
        self.population = load_population(cfg.labeler)  # user i ranks with member i mod n
        if not self.population:
            raise ValueError("--labeler names no labeler")
        heldout = load_population(cfg.heldout_labeler)
        self.rng = random.Random(cfg.seed)
        if cfg.users < 2:
            raise ValueError("--users must be at least 2")
        if not 0 <= cfg.adversaries < 1 or not 0 <= cfg.overlap <= 1:
            raise ValueError("--adversaries must be in [0, 1) and --overlap in [0, 1]")
        if cfg.adversary not in adversaries.KINDS:
            raise ValueError(f"--adversary must be one of {', '.join(adversaries.KINDS)}")
        if cfg.via_queue and (cfg.apps < 1 or cfg.users < cfg.concurrency):
            raise ValueError(
                "--via-queue needs --apps >= 1 and --users >= --concurrency (a labeler holds "
                "one lease at a time, so each acting user is a different labeler)"
            )
        self.users = [f"sim-{cfg.seed}-{i:03d}" for i in range(cfg.users)]
        self.apps = [f"sim-{cfg.seed}-app-{i:02d}" for i in range(cfg.apps)] * cfg.via_queue
        self.busy: set[str] = set()  # --via-queue: labelers acting now (one lease each)
        self.max_empty = 0  # --via-queue: empty NextTasks in a row before giving up (_run)
        shuffled = random.Random(cfg.seed + 7).sample(self.users, cfg.users)
        self.adversaries = set(shuffled[: round(cfg.adversaries * cfg.users)])
        self.clients: dict[str, AsyncClient] = {}  # user -> a client with its credential
        eval_rng = random.Random(cfg.seed + 1_000_003)
        self.eval_prompts = [make_prompt(eval_rng) for _ in range(cfg.eval_prompts)]
        self.stats = Stats()
        self.started = 0  # comparisons begun (a user reserves one before generating)
        self.t0 = time.monotonic()
        self.next_slot = self.t0
        decoder = CheckpointDecoder(
            self.eval_prompts, max_tokens=cfg.max_tokens, temperature=cfg.eval_temperature,
            seed=cfg.seed, threads=cfg.eval_threads,
        )  # fmt: skip
        self.measurer = Measurer(
            self.eval_prompts, training=self.population, heldout=heldout, decoder=decoder,
            corpus_documents=cfg.corpus_documents, threads=cfg.eval_threads,
        )  # fmt: skip
        self.answers = self.measurer.answers  # version id -> its evaluation answers
        self.infos: dict[str, admin_pb2.VersionInfo] = {}  # version id -> its registry entry
        self.versions: dict[str, dict] = {}  # id -> row (see _refresh_versions)
        self.failed = ""  # why the run could not go on (every user died)
        self.served: list[dict] = []  # {version, t, comparisons} each time GetModel changed
        self.current = ""
        self.done_sending = asyncio.Event()
        self.stop = asyncio.Event()
        self.last_sent_at = 0.0
        self.reached: dict | None = None
        self.detection: dict = {}  # what the learner flagged (filled at the end of run)

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

    def labeler(self, user: str) -> Labeler:
        """The user's labeler: round-robin over the --labeler population by user number
        (an adversary's is the honest preference it subverts)."""
        return member(self.population, self.users.index(user))

    def _ranking(self, user: str, prompt: str, samples, served: str) -> list[tuple[int, ...]]:
        texts = [s.text for s in samples]
        labeler = self.labeler(user)
        if user in self.adversaries:
            versions = [s.version for s in samples]
            ranking = adversaries.rank(
                self.cfg.adversary, labeler, prompt, texts, versions, served, self.rng
            )
        else:
            ranking = labeler(prompt, texts)
        return check_ranking(ranking, len(texts))

    async def _judge(self, user: str, prompt: str, prompt_id: str, samples, served: str) -> None:
        """One user's ranking of a prompt's samples; `served` is the version that was
        current when they were made (an arena's other samples are the canary's)."""
        tiers = self._ranking(user, prompt, samples, served)
        ids = [tuple(samples[i].sample_id for i in tier) for tier in tiers]
        await self.clients[user].rank(prompt_id, ids)
        self.stats.comparisons += 1
        self.stats.adversarial += user in self.adversaries
        self.last_sent_at = self.elapsed()

    async def _demonstrate(self, user: str, prompt: str, prompt_id: str, samples) -> None:
        """Sometimes (--demo-prob) the user also writes the answer it wanted."""
        if self.rng.random() >= self.cfg.demo_prob:
            return
        if user in self.adversaries:
            texts = [s.text for s in samples]
            demo = adversaries.demonstration(self.cfg.adversary, self.labeler(user), prompt, texts)
        else:
            demonstrate = getattr(self.labeler(user), "demonstrate", None)
            demo = demonstrate(prompt) if demonstrate is not None else None
        if demo:
            await self.clients[user].demonstrate(prompt_id, demo)
            self.stats.demonstrations += 1

    async def _direct(self, user: str) -> Judged:
        """The user asks and ranks its own response."""
        cfg = self.cfg
        prompt = make_prompt(self.rng)
        r = await self.clients[user].generate(
            prompt, n=cfg.k, max_tokens=cfg.max_tokens, temperature=cfg.temperature
        )
        await self._judge(user, prompt, r.prompt_id, r.samples, r.version)
        return Judged(user, prompt, r.prompt_id, r.samples, r.version)

    async def _from_queue(self, user: str) -> Judged:
        """The labeler takes a task from the queue (apps feed it when it has none) and
        ranks it."""
        task = await self._next_task(user)
        samples = task.samples
        served = self.current if self.current in {s.version for s in samples} else ""
        served = served or samples[-1].version
        await self._judge(user, task.prompt, task.prompt_id, samples, served)
        self.stats.overlapping += task.overlap > 1
        return Judged(user, task.prompt, task.prompt_id, samples, served)

    async def _afterwards(self, j: Judged) -> None:
        """After a ranking: sometimes a demonstration; without the queue, a share of
        responses is ranked by a second user too (--overlap)."""
        await self._demonstrate(j.user, j.prompt, j.prompt_id, j.samples)
        if self.cfg.via_queue:
            return
        if self.rng.random() < self.cfg.overlap and self.started < self.cfg.max_comparisons:
            self.started += 1
            second = self.rng.choice([u for u in self.users if u != j.user])
            try:
                await self._judge(second, j.prompt, j.prompt_id, j.samples, j.served)
            except BaseException:
                self.started -= 1
                raise
            self.stats.overlapping += 2

    async def _next_task(self, user: str) -> api_pb2.Task:
        """The labeler's next task. While NextTask finds nothing for it, an app generates
        a prompt (n=K, into the queue at the server's --queue-share) and it asks again;
        QueueStarved after self.max_empty empty answers in a row."""
        cfg = self.cfg
        why = ""
        for _ in range(self.max_empty):
            try:
                return await self.clients[user].next_task()
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                why = e.details()
            app = self.rng.choice(self.apps)
            await self.clients[app].generate(
                make_prompt(self.rng), n=cfg.k, max_tokens=cfg.max_tokens,
                temperature=cfg.temperature,
            )  # fmt: skip
            self.stats.generated += 1
        raise QueueStarved(
            f"NextTask found nothing {self.max_empty} times in a row, each after an app "
            f"generated a prompt: does the server put prompts in its labeling queue "
            f"(--queue-share)? Last answer: {why}"
        )

    def _error(self, e: grpc.RpcError) -> None:
        self.stats.errors += 1
        self.stats.last_error = f"{e.code().name}: {e.details()}"

    async def user_loop(self) -> None:
        cfg = self.cfg
        step = self._from_queue if cfg.via_queue else self._direct
        while not self.stop.is_set():
            if self.started >= cfg.max_comparisons:
                self.done_sending.set()
                return
            self.started += 1  # reserved before the await: the cap holds across users
            await self._slot()
            if cfg.via_queue:  # a labeler holds one lease: each acting one is another user
                user = self.rng.choice([u for u in self.users if u not in self.busy])
            else:
                user = self.rng.choice(self.users)
            self.busy.add(user)
            judged: Judged | None = None
            try:
                judged = await step(user)
                await self._afterwards(judged)
            except grpc.RpcError as e:
                if judged is None:
                    self.started -= 1  # give the slot back: no comparison was made
                self._error(e)
                await asyncio.sleep(1.0)
            except QueueStarved as e:
                self.started -= 1
                self.failed = str(e)
                self.stop.set()
                return
            except Exception as e:  # noqa: BLE001 - the labeler's bug: this user ends
                if judged is None:
                    self.started -= 1
                self.stats.errors += 1
                self.stats.dead_users += 1
                self.stats.last_error = f"user {user} ended: labeler {type(e).__name__}: {e}"
                if self.stats.dead_users >= cfg.concurrency:
                    self.failed = f"every simulated user has died; last: {self.stats.last_error}"
                    self.stop.set()
                return
            finally:
                self.busy.discard(user)

    # ------------------------------------------------------------------- users' credentials

    def _credentials(self, admin: AdminClient) -> dict[str, str]:
        """Every simulated user's token: from DATA_DIR/simulate-users.json, adding the
        users it lacks through the Admin API (labelers, and apps with --via-queue) and
        saving the file (0600)."""
        path = Path(self.cfg.data_dir) / "simulate-users.json"
        tokens = json.loads(path.read_text()) if path.exists() else {}
        roles = {u: "labeler" for u in self.users} | {a: "app" for a in self.apps}
        missing = [u for u in roles if u not in tokens]
        for user in missing:
            try:
                tokens[user] = admin.add_user(user, roles[user]).token
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    raise ValueError(
                        f"user {user} exists on the server but its token is not in {path}: "
                        "run with another --seed (user ids carry it), or revoke the sim users"
                    ) from None
                raise
        if missing:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(tokens, f)
            os.replace(tmp, path)
        return tokens

    def _detection(self, admin: AdminClient) -> dict:
        return detection(admin, self.users, self.adversaries, self.cfg.adversary)

    # ------------------------------------------------------------------- measuring

    def _evaluate(self, vid: str) -> None:
        """Read version vid's checkpoint: its evaluation answers and corpus loss (blocking)."""
        self.measurer.read(vid, self.infos)

    async def measure(self) -> None:
        """Measure every version not yet measured: v0 first, then in publishing order."""
        for vid in sorted(self.versions, key=_vnum):
            row = self.versions[vid]
            if row["eval_n"] or row["status"] == "sft-weights":
                continue
            try:
                if vid not in self.answers:  # read already as another's SFT-only policy
                    await asyncio.to_thread(self._evaluate, vid)
            except OSError as e:  # the store is not at the path the registry names, here
                row["eval_n"] = -1  # not measured; not tried again
                self.stats.errors += 1
                self.stats.last_error = f"cannot read {vid}'s checkpoint: {e}"
                continue
            sft = sft_of(row, self.versions) if row["status"] != "sft" else None
            if sft is not None and sft not in self.answers:
                if self.versions[sft]["eval_n"] < 0:
                    sft = None  # its checkpoint could not be read
                else:
                    await asyncio.to_thread(self._evaluate, sft)
            self.measurer.fill(row, sft)
            row["evaluated_at_s"] = round(self.elapsed(), 1)
            self._check_targets(row)

    def _check_targets(self, row: dict) -> None:
        cfg = self.cfg
        if row["status"] != "promoted" or self.reached is not None:
            return
        goals = {"labeler_win_rate": cfg.target_win_rate, "exact_match": cfg.target_exact_match}
        goals = {k: v for k, v in goals.items() if v}
        if goals and all((row.get(k) or 0.0) >= v for k, v in goals.items()):
            self.reached = {
                "version": row["id"], "win_rate": row.get("labeler_win_rate"),
                "exact_match": row.get("exact_match"),
                "comparisons": row["comparisons_at"], "seconds": row["seen_at_s"],
            }  # fmt: skip
            self.stop.set()

    def _refresh_versions(self, admin: AdminClient) -> None:
        listing = admin.list_versions()
        for v in listing.versions:
            self.infos[v.id] = v
            if v.id not in self.versions:
                self.versions[v.id] = version_row(
                    v, comparisons=self.stats.comparisons,
                    demonstrations=self.stats.demonstrations, t=round(self.elapsed(), 1),
                )  # fmt: skip
            row = self.versions[v.id]
            row["aliases"] = list(v.aliases)

    async def monitor(self, client: AsyncClient, admin: AdminClient, show) -> None:
        cfg = self.cfg
        last_ok = self.elapsed()
        while not self.stop.is_set():
            try:
                await asyncio.to_thread(self._refresh_versions, admin)
                self._saw((await client.get_model()).version)
                last_ok = self.elapsed()
                show()
                await self.measure()
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
        with AdminClient(cfg.target, token=token, actor="simulate") as admin:
            tokens = await asyncio.to_thread(self._credentials, admin)
            self.clients = {u: AsyncClient(cfg.target, timeout=120, token=tokens[u])
                            for u in self.users + self.apps}  # fmt: skip
            client = self.clients[self.users[0]]
            try:
                await self._run(client, admin, show)
            finally:
                for c in self.clients.values():
                    await c.close()
                with contextlib.suppress(grpc.RpcError):
                    self.detection = await asyncio.to_thread(self._detection, admin)
        return self.report()

    async def _run(self, client: AsyncClient, admin: AdminClient, show) -> None:
        cfg = self.cfg
        model = await client.get_model()
        if cfg.via_queue:
            if model.queue_share <= 0:
                raise ValueError(
                    "--via-queue needs a server that puts prompts in its labeling queue, and "
                    f"{cfg.target} runs with --queue-share 0: start it with --queue-share 1 "
                    "(`instructloop up` sets it; `--serve-args '--queue-share 1'` otherwise)"
                )
            # An item needs about 1/share prompts; give up after ten times that for nothing.
            self.max_empty = max(20, math.ceil(10 / model.queue_share))
        self.current = model.version
        self.served.append({"version": model.version, "t": 0.0, "comparisons": 0})
        await asyncio.to_thread(self._refresh_versions, admin)  # before any traffic
        await self.measure()  # v0 (and whatever is there already)
        self.t0 = self.next_slot = time.monotonic()  # the clock starts with traffic
        for row in self.versions.values():
            row["seen_at_s"] = 0.0  # there before the run
        if threading.current_thread() is threading.main_thread():
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):  # stop, then report
                loop.add_signal_handler(sig, self.stop.set)
        users = [asyncio.create_task(self.user_loop()) for _ in range(cfg.concurrency)]
        try:
            await self.monitor(client, admin, show)
        finally:
            self.stop.set()
            await asyncio.gather(*users, return_exceptions=True)
        await asyncio.to_thread(self._refresh_versions, admin)
        if not self.failed:
            await self.measure()  # what appeared since the last look
            await self._follow_current(client)

    async def _follow_current(self, client: AsyncClient, timeout_s: float = 30.0) -> None:
        """Record the server's swap to the registry's `current` version: a run that stops
        as soon as a promoted version reaches the targets may stop between the promotion
        and the server's hot swap (seconds later), and `served` would miss the swap."""
        aliases = {v: r.get("aliases", ()) for v, r in self.versions.items()}
        current = next((v for v, names in aliases.items() if "current" in names), "")
        deadline = time.monotonic() + timeout_s
        while current and self.current != current and time.monotonic() < deadline:
            with contextlib.suppress(grpc.RpcError):
                self._saw((await client.get_model()).version)
            await asyncio.sleep(0.5)

    def _saw(self, version: str) -> None:
        """The server answered GetModel with `version`: a swap if it changed."""
        if version != self.current:
            self.current = version
            self.served.append({
                "version": version, "t": round(self.elapsed(), 1),
                "comparisons": self.stats.comparisons,
            })  # fmt: skip

    def report(self) -> dict:
        best, best_win = best_versions(self.versions.values())
        return {
            "config": asdict(self.cfg),
            "seconds": round(self.elapsed(), 1),
            "comparisons": self.stats.comparisons,
            "overlapping_comparisons": self.stats.overlapping,
            "via_queue": self.cfg.via_queue,
            "generated_prompts": self.stats.generated,
            "adversarial_comparisons": self.stats.adversarial,
            "demonstrations": self.stats.demonstrations,
            "errors": self.stats.errors,
            "last_error": self.stats.last_error,
            "dead_users": self.stats.dead_users,
            "failed": self.failed,
            "users": len(self.users),
            "detection": self.detection,
            "reached_target": self.reached,
            "best": best,
            "best_win_rate": best_win,
            "served": self.served,
            "versions": sorted(
                self.versions.values(), key=lambda v: (v["seen_at_s"], _vnum(v["id"]))
            ),
            "eval": {
                "prompts": self.eval_prompts,
                "answers": {
                    vid: {"greedy": a.greedy, "sampled": a.sampled}
                    for vid, a in self.answers.items()
                },
            },
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

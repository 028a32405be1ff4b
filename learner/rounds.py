"""A learner round: SFT? -> reward model -> policy (PPO, or --algorithm) -> gate -> publish.

One round, top to bottom (Learner.run_round):

  0. resolve   the serving version through the registry (alias `current`): its policy
               weights (base/full: the dir; lora: the base's dir + the adapter);
     quality   every user's agreement with the previous RM (on comparisons it never
               trained on) and with other users on shared prompts, and the flag rule
               (quality.py), written to Redis for operators (UserStore.set_quality). The
               round leaves out ALL feedback and prompts of suspended users and, with
               --exclude-flagged (the default), of flagged ones: no SFT, RM, PPO, RM
               held-out or gate data of theirs; the version records who and how many
               judgements (manifest and registry entry: excluded_users, excluded_feedback).
               With --no-rm-retrain the warm-started RM keeps what their feedback taught
               it before they were left out;
  1. SFT       only if enough new demonstrations arrived: the base model trained on
               every training demonstration so far (or, --no-sft-from-base, the serving
               policy on the new ones); the result becomes the KL reference and the
               policy PPO starts from (sft.py, TRL SFTTrainer);
  2. RM        a new RM from the SFT policy (as the paper's RM), or the base before any
               SFT, one epoch on every training comparison so far (--no-rm-retrain:
               warm-started from the previous RM, one epoch on the new ones); each
               comparison has the demonstration of its prompt ranked first when there
               is one (reward.py);
  3. policy    --algorithm (algorithms.py; PPO by default, ppo.py) from the serving
               policy (or the new SFT policy; --start-from-reference: the reference
               always), reference = the latest SFT policy, or the base model before any
               SFT; the algorithm is recorded in the gate dict;
  4. gate      RM-estimated win rate of the candidate against the serving version on
               held-out prompts (users split by a keyed hash, as the paper split by
               customer; a fresh sample each round, seeded by the split's secret and the
               round) above a threshold, and KL to the reference below a bound (gate.py);
               the RM is the round's, or (--gate-reward-model second) a second one
               trained beside it with the next seed and used by the gate only;
  5. publish   the new SFT policy as a version of its own (never promoted: the
               SFT-only baseline that evaluations compare PPO against, and in LoRA mode
               the weights under the adapter); then the candidate into the model store
               and the registry with its metrics, the feedback ids that trained it and
               the gate result; promote it (auto=True) only if the gate passed and no
               operator froze promotion.

Consistency: everything a round writes goes into DATA_DIR/rounds/r<N>/ and becomes part of
the learner's state (state.json, replaced atomically) only after the version is published.
A round that is abandoned (SIGTERM between phases) or killed leaves the state as it was:
the next start deletes the half-done round dir and redoes the round on the same data.
The store makes a half-written version invisible; the dataset keeps every acknowledged
record, so nothing is lost and nothing is counted twice.

Under torchrun (learner/distributed.py) this runs on rank 0 alone; SFT, the RM and PPO
(`_train`) run on every rank, each on its shard of the global batches.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from instructloop.learner import distributed
from instructloop.learner.algorithms import nothing_to_offer, ptx_texts, round_metrics, train_policy
from instructloop.learner.config import (
    AlignConfig,
    PPOConfig,
    RewardConfig,
    RoundConfig,
    SFTStepConfig,
)
from instructloop.learner.dataset import Dataset
from instructloop.learner.gate import evaluate_gate
from instructloop.learner.ppo import PPOStopped, load_policy
from instructloop.learner.quality import Evidence, Measured, measure
from instructloop.learner.reward import train_reward_model
from instructloop.learner.sft import run_sft
from instructloop.registry import (
    CURRENT,
    Frozen,
    Registry,
    ensure_registered,
    publish_version,
)
from instructloop.store import ModelStore
from instructloop.users import UserStore

log = logging.getLogger(__name__)

COMPARISON_KINDS = ("ranking", "choice", "rating")
QUALITY_STATE = "quality.json"  # in a round's dir: the RM evidence it adds to the state


@dataclass
class RoundState:
    """What the finished rounds leave for the next one (DATA_DIR/state.json)."""

    round: int = 0  # rounds completed (published)
    comparisons_seq: int = 0  # feedback arrival number up to which the RM has trained
    demonstrations_seq: int = 0  # ... up to which SFT has trained
    rm_dir: str = ""  # the latest RM ("" = none yet)
    gate_rm_dir: str = ""  # the latest second RM (--gate-reward-model second; "" = none)
    sft_dir: str = ""  # the latest SFT policy: the KL reference ("" = the base model)
    sft_round: int = 0  # the round that trained it (0 = none)
    sft_version: str = ""  # its published version (the SFT-only policy PPO is judged against)
    last_round_at: float = field(default_factory=time.time)
    last_version: str = ""
    rm_scored_seq: int = 0  # arrival number up to which held-out comparisons met an RM
    rm_evidence: dict[str, list[float]] = field(default_factory=dict)  # user -> Evidence
    # of agreement with RMs that never trained on the comparisons (quality.py), summed

    @classmethod
    def load(cls, path: Path) -> RoundState:
        return cls(**json.loads(path.read_text())) if path.exists() else cls()

    def save(self, path: Path) -> None:
        """Write-fsync-rename: a crash leaves the old state or the new, never half."""
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(asdict(self), indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


@dataclass
class ServingPolicy:
    """The version `current` points at, resolved to directories the trainers can load."""

    id: str
    kind: str  # base | full | lora
    policy_dir: Path  # a full checkpoint, or an adapter dir whose base path is resolved
    weights_version: str  # the version holding its full weights (itself unless lora)
    weights_dir: Path


@dataclass
class RoundResult:
    round: int
    reason: str
    version: str
    promoted: bool
    frozen: bool
    gate: dict
    metrics: dict
    feedback_ids: list[str]
    reference: str
    sft_version: str = ""
    excluded_users: list[str] = field(default_factory=list)


@dataclass
class LeftOut:
    """Whose feedback a round leaves out, and how many judgements of theirs that is."""

    users: list[str]  # sorted: suspended, and flagged with --exclude-flagged
    feedback: int


class RoundAbandoned(Exception):
    """A stop was requested between phases; nothing of this round was published."""


class Learner:
    """Runs rounds against one dataset, model store and registry."""

    def __init__(
        self,
        data_dir: str | Path,
        dataset: Dataset,
        store: ModelStore,
        registry: Registry,
        users: UserStore,
        loop: asyncio.AbstractEventLoop,
        cfg: RoundConfig,
        sft_cfg: SFTStepConfig,
        rm_cfg: RewardConfig,
        ppo_cfg: PPOConfig,
        device: str = "cpu",
        sharding: str = "ddp",
        align_cfg: AlignConfig | None = None,
    ):
        self.data_dir = Path(data_dir)
        self.device = device  # where SFT, RM, PPO and the gate run (resolved, not 'auto')
        self.sharding = sharding  # under torchrun: the RM's and PPO's (ddp | fsdp)
        self.dataset, self.store, self.registry, self.loop = dataset, store, registry, loop
        self.users = users
        self.cfg, self.sft_cfg, self.rm_cfg, self.ppo_cfg = cfg, sft_cfg, rm_cfg, ppo_cfg
        self.align_cfg = align_cfg or AlignConfig()  # step 3's algorithm (default: ppo)
        self.state_path = self.data_dir / "state.json"
        self.state = RoundState.load(self.state_path)
        self.rounds_dir = self.data_dir / "rounds"
        self.rounds_dir.mkdir(parents=True, exist_ok=True)

    def _await(self, coro):
        return self.loop.run_until_complete(coro)

    # ---------------------------------------------------------------- scheduling

    def due(self, now: float | None = None) -> str | None:
        """Why a round should start now, or None: N new comparisons, or T seconds passed
        with some new data (and something the RM can train on, if there is no RM yet).
        With --algorithm sft, only once enough new demonstrations for an SFT run arrived
        (without one such a round has nothing to offer)."""
        if self.align_cfg.algorithm == "sft":
            demos = self.dataset.new_feedback(self.state.demonstrations_seq).get("demonstration", 0)
            if demos < self.sft_cfg.min_demonstrations:
                return None
        new = self.dataset.new_feedback(self.state.comparisons_seq)
        comparisons = sum(new.get(k, 0) for k in COMPARISON_KINDS)
        if not self.state.rm_dir and comparisons == 0:
            return None
        if comparisons >= self.cfg.min_comparisons:
            return f"{comparisons} new comparisons"
        waited = (now or time.time()) - self.state.last_round_at
        if waited >= self.cfg.max_wait_s and sum(new.values()) >= self.cfg.min_new_feedback:
            return f"{waited:.0f}s since the last round, {sum(new.values())} new judgements"
        return None

    # ---------------------------------------------------------------- one round

    def run_round(self, reason: str, stop: threading.Event | None = None) -> RoundResult | None:
        """Run one round; None if there was nothing it could train. Raises RoundAbandoned
        if `stop` is set between phases (before anything is published)."""
        stop = stop or threading.Event()
        n = self.state.round + 1
        work = self.rounds_dir / f"r{n}"
        if (adopted := self._adopt_published(n, work)) is not None:
            return adopted
        shutil.rmtree(work, ignore_errors=True)  # a round abandoned or killed before
        work.mkdir(parents=True)
        t_round = time.perf_counter()
        ds, st = self.dataset, self.state
        seq_hi = ds.last_seq()  # the consumer does not run during a round: nothing newer
        log.info("round %d: start (%s)", n, reason)

        timings: dict[str, float] = {}  # seconds per phase, into the version's metrics
        current = {"name": "", "t": time.perf_counter()}

        def phase(name: str) -> None:
            now = time.perf_counter()
            if current["name"]:
                timings[f"phase_{current['name']}_s"] = now - current["t"]
            current.update(name=name.replace(" ", "_"), t=now)
            if stop.is_set():
                shutil.rmtree(work, ignore_errors=True)
                raise RoundAbandoned(f"round {n} abandoned before {name}: stop requested")
            log.info("round %d: phase %s", n, name)

        # ---- 0. what is serving, and the base model
        phase("resolve")
        serving = self._await(self.resolve_serving(work))
        base_dir = self._await(self.base_dir())

        # ---- labeler quality, and whose feedback this round leaves out
        phase("quality")
        measured = self.measure_users(n, seq_hi, work)
        suspended = self._await(self.users.suspended_users())
        flagged = {u for u, q in measured.users.items() if q.flagged}
        out_users = sorted(set(suspended) | (flagged if self.cfg.exclude_flagged else set()))
        counts = ds.feedback_counts()
        left_out = LeftOut(out_users, sum(sum(counts.get(u, {}).values()) for u in out_users))
        ex = frozenset(out_users)  # every query below leaves them out
        if ex:
            log.info(
                "round %d: leaving out %d users (%d suspended, %d flagged): %d judgements",
                n, len(ex), len(suspended), len(flagged & ex), left_out.feedback,
            )  # fmt: skip
        comparisons = ds.comparisons("train", since_seq=st.comparisons_seq, exclude_users=ex)
        if not comparisons and not st.rm_dir:
            return self._skip(n, work, "no training comparisons yet and no RM")
        log.info(
            "round %d: serving %s (%s); %d new training comparisons",
            n,
            serving.id,
            serving.kind,
            len(comparisons),
        )

        # ---- 1. SFT when new demonstrations arrived: the new reference and PPO's start
        new_demos = ds.demonstrations("train", since_seq=st.demonstrations_seq, exclude_users=ex)
        all_demos = ds.demonstrations("train", exclude_users=ex)
        ref_dir = Path(st.sft_dir) if st.sft_dir else base_dir
        policy_start = serving.policy_dir
        sft_metrics: dict = {}
        sft_ran = len(new_demos) >= self.sft_cfg.min_demonstrations
        demos = new_demos  # what this round's SFT trains on (if it runs)
        algorithm = self.align_cfg.algorithm
        idle = nothing_to_offer(
            algorithm, sft_ran=sft_ran, new_demonstrations=len(new_demos),
            min_demonstrations=self.sft_cfg.min_demonstrations, new_comparisons=len(comparisons),
        )  # fmt: skip
        if idle:
            return self._skip(n, work, f"--algorithm {algorithm}: {idle}")
        if sft_ran:
            phase("sft")
            if self.sft_cfg.from_base:  # the paper's SFT: the base on every demonstration
                init, demos = base_dir, all_demos
            else:  # the serving policy, fine-tuned on the new ones
                init = self._full_weights(serving, work)
            sft_metrics = self._train(
                run_sft,
                stop,
                cfg=self.sft_cfg,
                demonstrations=demos,
                init_dir=init,
                out_dir=work / "sft",
            )
            ref_dir = policy_start = work / "sft"
        elif self.align_cfg.start_from_reference:
            policy_start = ref_dir

        # ---- 2. reward model: from the SFT policy on every comparison, or a warm start
        phase("reward model")
        heldout = ds.comparisons("heldout", exclude_users=ex)
        second = self.cfg.gate_reward_model == "second"
        if comparisons:
            rm_dir = work / "rm"
            if self.rm_cfg.retrain:
                rm_init, rm_demos = ref_dir, all_demos
                rm_data = ds.comparisons("train", exclude_users=ex)
            else:
                rm_init, rm_data, rm_demos = st.rm_dir or ref_dir, comparisons, new_demos
            rm_args = dict(
                comparisons=rm_data,
                heldout=heldout,
                demonstrations=all_demos,
                ranked_demonstrations=rm_demos if self.rm_cfg.demo_comparisons else (),
                sharding=self.sharding,
            )
            rm_metrics = self._train(
                train_reward_model, cfg=self.rm_cfg, init_dir=rm_init, out_dir=rm_dir, **rm_args
            )
            gate_rm_dir, gate_rm_metrics = rm_dir, rm_metrics
            if second:  # the same data and start, the next seed, for the gate alone
                gate_rm_dir = work / "gate_rm"
                gate_rm_metrics = self._train(
                    train_reward_model,
                    cfg=dataclasses.replace(self.rm_cfg, seed=self.rm_cfg.seed + 1),
                    init_dir=ref_dir if self.rm_cfg.retrain else st.gate_rm_dir or ref_dir,
                    out_dir=gate_rm_dir,
                    **rm_args,
                )
            comparisons = rm_data  # what trained this round's RM
        else:
            rm_dir, rm_metrics, gate_rm_metrics = Path(st.rm_dir), {}, {}
            gate_rm_dir = Path(st.gate_rm_dir) if second and st.gate_rm_dir else rm_dir

        # ---- 3. the policy (PPO by default) from the serving (or new SFT) policy, KL to
        # the reference
        phase("ppo" if algorithm == "ppo" else "policy")
        try:
            policy_metrics = self._train(
                train_policy,
                stop,
                algorithm=algorithm,
                ppo_cfg=self.ppo_cfg,
                align_cfg=self.align_cfg,
                prompts=ds.rl_prompts("train", exclude_users=ex),
                comparisons=comparisons,
                policy_dir=policy_start,
                reward_dir=rm_dir,
                out_dir=work / "policy",
                ref_dir=ref_dir,
                ptx_texts=ptx_texts(self.ppo_cfg, all_demos) if algorithm == "ppo" else (),
                sharding=self.sharding,
            )
        except PPOStopped as e:
            shutil.rmtree(work, ignore_errors=True)
            raise RoundAbandoned(f"round {n} abandoned during {algorithm}: {e}") from e

        # ---- 4. gate: beat the serving version on held-out prompts, stay near the reference
        phase("gate")
        gate_prompts = ds.gate_prompts(self.cfg.gate_prompts, n, exclude_users=ex)
        gate = evaluate_gate(
            self.cfg, self.ppo_cfg, work / "policy", serving.policy_dir, ref_dir, gate_rm_dir,
            gate_prompts, self.device,
        )  # fmt: skip
        gate["reward_model"] = "policy" if gate_rm_dir == rm_dir else "second"
        gate["reference"] = "sft" if st.sft_dir or sft_ran else "base"
        gate["algorithm"] = algorithm  # a string: manifest metrics are floats only
        gate["started_from"] = "reference" if policy_start == ref_dir else "serving"
        gate["reason"] = f"{algorithm}: {gate['reason']}"  # what `models show` displays
        gate["learner"] = str(self.data_dir.resolve())  # which learner's round this is

        # ---- 5. publish (from here on the round completes: the steps are short)
        phase("publish")
        trained_on = [c.feedback_id for c in comparisons]
        if sft_ran:
            trained_on += [d.feedback_id for d in demos]
        metrics = {
            "round": n,
            "feedback_seq": seq_hi,
            "rm_heldout_accuracy": rm_metrics.get("heldout_accuracy", float("nan")),
            "rm_heldout_pairs": rm_metrics.get("heldout_pairs", 0),
            "gate_rm_heldout_accuracy": gate_rm_metrics.get("heldout_accuracy", float("nan")),
            "rm_train_loss": rm_metrics.get("train_loss", float("nan")),
            "rm_comparisons": len(comparisons),
            "rm_demo_comparisons": rm_metrics.get("with_demonstration", 0),
            "comparisons_total": len(ds.comparisons("train", exclude_users=ex)),
            "demonstrations_total": len(all_demos),
            "reference_round": n if sft_ran else st.sft_round,
            "sft_demonstrations": len(demos) if sft_ran else 0,
            "sft_loss": sft_metrics.get("train_loss", float("nan")),
            "win_rate": gate["win_rate"],
            "kl": gate["kl"],
            "reward": gate["candidate_score"],
            "serving_reward": gate["serving_score"],
            **round_metrics(algorithm, policy_metrics),
            "train_ranks": distributed.world_size(),
            "excluded_users": len(left_out.users),
            "excluded_feedback": left_out.feedback,
            "users_suspended": len(suspended),
            "users_flagged": len(flagged),
            "labeler_agreement": measured.agreement,
            "labeler_agreement_pairs": measured.agreement_pairs,
            **timings,
            "round_seconds": time.perf_counter() - t_round,
        }
        result = self._await(
            self.publish(
                n, reason, serving, work, gate, metrics, trained_on, demos, sft_ran, left_out
            )
        )
        result.reference = str(ref_dir)

        self._commit(
            n, work, seq_hi, sft_ran, bool(comparisons), result.version, result.sft_version
        )
        log.info(
            "round %d: done in %.1fs: %s %s (win rate %.3f, kl %.3f)",
            n,
            time.perf_counter() - t_round,
            result.version,
            "promoted" if result.promoted else ("frozen" if result.frozen else "not promoted"),
            gate["win_rate"],
            gate["kl"],
        )
        return result

    def _skip(self, n: int, work: Path, why: str) -> None:
        """A round with nothing to train: nothing published, the state kept but for the
        time of the last round (so a timed round waits again), the work dir gone."""
        log.info("round %d: %s; skipped", n, why)
        self.state.last_round_at = time.time()
        self.state.save(self.state_path)
        shutil.rmtree(work, ignore_errors=True)
        return None

    def _train(self, trainer, stop: threading.Event | None = None, **kwargs) -> dict:
        """Run a trainer (run_sft, train_reward_model, train_ppo) on self.device. Under
        torchrun every other rank runs it too, on its own device, with the arguments sent
        from here (the round's data included; main.follow_rank0); this rank alone saves."""
        if distributed.world_size() > 1:
            distributed.send_order((trainer, kwargs))
        if stop is not None:
            kwargs["stop"] = stop
        return trainer(**kwargs, device=self.device)

    def _commit(
        self,
        n: int,
        work: Path,
        seq_hi: int,
        sft_ran: bool,
        rm_trained: bool,
        version: str,
        sft_version: str = "",
    ) -> None:
        """The round is done: the learner's state moves (one atomic file replace)."""
        st = self.state
        st.round, st.comparisons_seq = n, seq_hi
        if sft_ran:
            st.demonstrations_seq, st.sft_dir = seq_hi, str(work / "sft")
            st.sft_round, st.sft_version = n, sft_version
        if rm_trained:
            st.rm_dir = str(work / "rm")
            if (work / "gate_rm").exists():
                st.gate_rm_dir = str(work / "gate_rm")
        if (measured := work / QUALITY_STATE).exists():  # the RM evidence this round added
            q = json.loads(measured.read_text())
            st.rm_evidence, st.rm_scored_seq = q["rm_evidence"], q["rm_scored_seq"]
        st.last_round_at, st.last_version = time.time(), version
        st.save(self.state_path)
        self._prune()

    def _adopt_published(self, n: int, work: Path) -> RoundResult | None:
        """A learner killed after publishing round n but before committing it: the version
        is in the store and the registry, so the round is done; commit it instead of
        training (and publishing) it a second time. Promote it if the crash came before
        the promotion and `current` has not moved since."""
        mine = str(self.data_dir.resolve())
        round_versions = [m for m in self.store.list() if m.metrics.get("round") == n]
        found = [m for m in round_versions if m.gate.get("learner") == mine]
        if not found or not work.is_dir():
            return None
        m = found[-1]
        log.warning("round %d: %s was published before a crash; adopting it", n, m.id)
        promoted = frozen = False
        sft_ids = [
            v.id for v in round_versions if v.metrics.get("sft_only") and v.parent == m.parent
        ]

        async def promote() -> None:
            nonlocal promoted, frozen
            # A crash between the store write and the registry write left it unregistered.
            for v in round_versions:
                mine = v.id == m.id or v.id in sft_ids
                if mine and await ensure_registered(self.registry, self.store, v, "learner"):
                    log.warning("round %d: registered %s (stored, not registered)", n, v.id)
            if not m.gate.get("passed") or await self.registry.alias(CURRENT) != m.parent:
                return
            try:
                await self.registry.promote(
                    m.id, actor="learner", reason=m.gate["reason"], auto=True
                )
                promoted = True
            except Frozen as e:
                frozen = True
                log.warning("round %d: %s is not promoted: %s", n, m.id, e)

        self._await(promote())
        seq = int(m.metrics["feedback_seq"])
        sft_ran = m.metrics.get("sft_demonstrations", 0) > 0 and (work / "sft").is_dir()
        self._commit(
            n, work, seq, sft_ran, m.metrics.get("rm_comparisons", 0) > 0, m.id,
            sft_ids[-1] if sft_ids else "",
        )  # fmt: skip
        return RoundResult(
            n, "adopted after a crash", m.id, promoted, frozen, m.gate, m.metrics,
            list(m.feedback_ids), m.gate.get("reference", ""),
            excluded_users=list(m.excluded_users),
        )  # fmt: skip

    def measure_users(self, n: int, seq_hi: int, work: Path) -> Measured:
        """Every user's quality at the start of round n (quality.measure); that of the
        users an admin added is written to Redis (one entry per user, as users.py bounds
        it; an id only ever seen in feedback is measured and may be flagged, not stored).
        The RM evidence it adds waits in work/quality.json until the round is committed,
        so a redone round counts it once."""
        st = self.state
        m = measure(
            self.dataset, round_no=n, seq_hi=seq_hi, rm_dir=st.rm_dir,
            trained_seq=st.comparisons_seq, scored_seq=st.rm_scored_seq,
            evidence={u: Evidence.from_list(v) for u, v in st.rm_evidence.items()},
            min_judgements=self.cfg.flag_min_judgements, max_length=self.rm_cfg.max_length,
            batch_size=self.rm_cfg.eval_batch_size, device=self.device,
        )  # fmt: skip
        known = {u.user_id for u in self._await(self.users.list())}
        shown = {u: q for u, q in m.users.items() if u in known}
        self._await(self.users.set_quality(shown, m.agreement, m.agreement_pairs))
        evidence = {u: e.to_list() for u, e in m.rm_evidence.items()}
        (work / QUALITY_STATE).write_text(
            json.dumps({"rm_evidence": evidence, "rm_scored_seq": m.rm_scored_seq})
        )
        log.info(
            "round %d: quality of %d users, %d flagged; inter-labeler agreement %.3f on %d "
            "pairs", n, len(m.users), sum(q.flagged for q in m.users.values()), m.agreement,
            m.agreement_pairs,
        )  # fmt: skip
        return m

    async def _publish_version(self, src_dir: Path, left_out: LeftOut, **manifest):
        """Into the store, then the registry, with who the round left out."""
        return await publish_version(
            self.registry, self.store, str(src_dir), excluded_users=left_out.users,
            excluded_feedback=left_out.feedback, **manifest,
        )  # fmt: skip

    async def publish(
        self, n, reason, serving, work, gate, metrics, trained_on, demos, sft_ran, left_out
    ) -> RoundResult:
        kind = "lora" if self.ppo_cfg.lora else "full"
        base_id = await self.base_id()
        base_model = serving.weights_version if kind == "lora" else base_id
        sft_version = ""
        if sft_ran:
            # The SFT-only policy: the baseline an evaluation compares PPO with (does the
            # RM + PPO add anything over SFT on the same data?) and, in LoRA mode, the
            # weights the adapter was trained over. Never promoted on its own.
            sft_info = await self._publish_version(
                work / "sft", left_out, kind="full", parent=serving.id,
                base_model=base_id if kind == "full" else serving.weights_version,
                feedback_ids=[d.feedback_id for d in demos],
                metrics={
                    "round": n, "sft_only": 1.0, "sft_demonstrations": len(demos),
                    "sft_loss": metrics["sft_loss"],
                    "demonstrations_total": metrics["demonstrations_total"],
                    "comparisons_total": metrics["comparisons_total"],
                },
                gate={"passed": False, "reason": f"the SFT-only policy of round {n}: not a "
                      "candidate (PPO's reference and starting point)"},
            )  # fmt: skip
            sft_version = sft_info.id
            if kind == "lora":
                base_model = sft_version
        info = await self._publish_version(
            work / "policy", left_out, kind=kind, parent=serving.id,
            base_model=base_model, feedback_ids=trained_on, metrics=metrics, gate=gate,
        )  # fmt: skip
        log.info("round %d: published %s (%s, gate %s)", n, info.id, kind, gate["reason"])
        promoted = frozen = False
        if gate["passed"]:
            try:
                await self.registry.promote(
                    info.id, actor="learner", reason=f"round {n}: {gate['reason']}", auto=True
                )
                promoted = True
            except Frozen as e:
                frozen = True
                log.warning("round %d: %s passed the gate but is not promoted: %s", n, info.id, e)
        return RoundResult(
            n, reason, info.id, promoted, frozen, gate, metrics, trained_on, "", sft_version,
            left_out.users,
        )  # fmt: skip

    # ---------------------------------------------------------------- versions -> dirs

    async def resolve_serving(self, work: Path) -> ServingPolicy:
        """The `current` version's policy as directories (an adapter gets its base's dir)."""
        vid = await self.registry.alias(CURRENT)
        if not vid:
            raise RuntimeError("no `current` version in the registry: start the server first")
        info = await self.registry.get(vid)
        if info.kind != "lora":
            path = await self._version_dir(info)
            return ServingPolicy(vid, info.kind, path, vid, path)
        base = await self.registry.get(info.base_model)
        base_dir = await self._version_dir(base)
        # The adapter names the directory it was trained over; point it at the base's
        # directory here (a copy: versions are immutable).
        adapter = work / "serving-adapter"
        shutil.copytree(await self._version_dir(info), adapter)
        (adapter / "manifest.json").unlink(missing_ok=True)
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(base_dir)
        (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2))
        return ServingPolicy(vid, "lora", adapter, base.id, base_dir)

    async def _version_dir(self, info) -> Path:
        if info.kind == "base":
            return Path(info.path)
        await asyncio.to_thread(self.store.verify, info.id)  # never train from a bad copy
        return self.store.path(info.id)

    async def base_id(self) -> str:
        bases = [v for v in await self.registry.list() if v.kind == "base"]
        if not bases:
            raise RuntimeError("no base version registered (the server registers v0)")
        return bases[-1].id  # list() is newest first: the oldest base

    async def base_dir(self) -> Path:
        return Path((await self.registry.get(await self.base_id())).path)

    def _full_weights(self, serving: ServingPolicy, work: Path) -> Path:
        """A full checkpoint of the serving policy (an adapter is merged into its base)."""
        if serving.kind != "lora":
            return serving.policy_dir
        model, tokenizer = load_policy(serving.policy_dir, lora=False)
        out = work / "serving-merged"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        return out

    def _prune(self) -> None:
        """Delete round dirs the state no longer refers to (published versions are copies)."""
        st = self.state
        keep = {Path(p).parent for p in (st.rm_dir, st.gate_rm_dir, st.sft_dir) if p}
        for d in self.rounds_dir.iterdir():
            if d.is_dir() and d not in keep:
                shutil.rmtree(d, ignore_errors=True)

"""Labeler quality: how well each user's judgements agree with what the learner knows,
and the rule that flags a user whose feedback a round should leave out.

Two measures per user, both per *judgement* (one comparison: one ranking of K answers is
C(K,2) pairs, and pairs of one ranking are not independent, so a judgement's share of
agreeing pairs is the unit every mean and standard error here is taken over):

  rm    agreement with a reward model that never trained on the judgement. Each comparison
        is scored once, by the first RM that exists after it arrived and did not train on
        it: a training user's comparisons that arrived since the previous RM trained are
        scored by that RM at the start of the next round, before it is replaced; a held-out
        user's comparisons (never trained on) by the first RM after their arrival. A
        training comparison that arrived before the first RM is never scored (that RM
        trains on it). The sums accumulate in the learner's state across rounds, so a
        user's measure grows.
  peer  agreement with other users on the same prompt (same prompt_id, so the same
        samples): the share of this user's strictly ordered sample pairs that another user
        ordered the same way, over every other user's judgement that ordered the pair
        (InstructGPT's inter-labeler agreement, 72.6 +- 1.5% between its labelers).

The rule (flag_user) compares a user with honest users, not with a fixed number: the
honest level of a measure is the median user's mean agreement (most users are honest;
the rule assumes so), which moves with the RM's accuracy (0.6-0.85 on honest data).
Both measures are put on one scale, 1 = the median user, 0 = chance (0.5), -1 = inverted,
combined by precision, and a user is flagged only with enough evidence, when closer to
chance than to the median AND significantly below the median. On synthetic rankings
(honest, inverse and random users, K=8, RM accuracy 0.6-0.85) see flag_user's docstring.

Stdlib and the proto only, except rm_evidence (torch, the RM).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path

from instructloop.learner.dataset import Comparison, Dataset
from instructloop.v1 import admin_pb2

CHANCE = 0.5
MIN_USERS = 3  # users with enough evidence before the median of a measure means anything
# Judgements a user needs to count toward a measure's honest level (a median over users:
# robust to each user's own noise, so a few judgements each will do). Peer evidence is
# thin (only overlapping prompts), and a higher bar left it unused in simulation.
MIN_REF_JUDGEMENTS = 3
MIN_SEPARATION = 0.05  # a measure whose honest level is this close to chance is not used
MIN_SD = 0.05  # floor of the per-judgement sd (a measure where everyone agrees always)
Z = 1.645  # one-sided 5%: at most ~5% of honest users with enough evidence fall below


@dataclass
class Evidence:
    """One user's per-judgement agreement with one source, as sums (kept in the state)."""

    judgements: int = 0  # judgements with at least one scored pair
    total: float = 0.0  # sum over judgements of the share of agreeing pairs, each in [0, 1]
    total_sq: float = 0.0  # sum of its squares (the within-user variance)
    agree: float = 0.0  # agreeing pairs (a tie in the RM's scores counts half)
    pairs: int = 0  # scored pairs

    def add(self, agree: float, pairs: int) -> None:
        """One judgement: `agree` of its `pairs` agreed. A judgement without pairs adds
        nothing."""
        if pairs <= 0:
            return
        share = agree / pairs
        self.judgements += 1
        self.total += share
        self.total_sq += share * share
        self.agree += agree
        self.pairs += pairs

    def merge(self, other: Evidence) -> Evidence:
        return Evidence(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    @property
    def mean(self) -> float:
        """Mean per-judgement agreement (what the rule uses)."""
        return self.total / self.judgements if self.judgements else float("nan")

    @property
    def pair_agreement(self) -> float:
        """Share of agreeing pairs (what operators read: UserQuality.*_agreement)."""
        return self.agree / self.pairs if self.pairs else 0.0

    def to_list(self) -> list[float]:
        return list(astuple(self))

    @classmethod
    def from_list(cls, values: Sequence[float]) -> Evidence:
        j, t, tsq, a, p = values
        return cls(int(j), float(t), float(tsq), float(a), int(p))


@dataclass(frozen=True)
class Reference:
    """What an honest user scores on one measure: the median user's mean agreement, and the
    pooled within-user standard deviation of one judgement's agreement."""

    level: float
    sd: float


def reference(evidence: Iterable[Evidence], min_judgements: int) -> Reference | None:
    """The honest level of a measure from every user's evidence; None when fewer than
    MIN_USERS users have min_judgements, or when the level is within MIN_SEPARATION of
    chance (the measure cannot tell honest users from random ones)."""
    evidence = list(evidence)
    means = [e.mean for e in evidence if e.judgements >= min_judgements]
    if len(means) < MIN_USERS:
        return None
    level = statistics.median(means)
    if level - CHANCE < MIN_SEPARATION:
        return None
    within = sum(e.total_sq - e.total * e.total / e.judgements for e in evidence if e.judgements)
    dof = sum(e.judgements - 1 for e in evidence if e.judgements)
    sd = math.sqrt(max(within, 0.0) / dof) if dof > 0 else 0.0
    return Reference(level, max(sd, MIN_SD))


def flag_user(
    rm: Evidence,
    peer: Evidence,
    rm_ref: Reference | None,
    peer_ref: Reference | None,
    min_judgements: int = 10,
) -> tuple[bool, str]:
    """Whether a user's feedback is not to be trusted, and why (empty when not flagged).

    Each measure with a reference becomes a position on one scale and its standard error,

        p = (mean - 0.5) / (level - 0.5)      1 = the median user, 0 = chance, -1 = inverted
        se = sd / sqrt(judgements) / (level - 0.5)

    and the two combine by precision (weights 1/se^2, as independent). The user is flagged
    when its measures hold at least `min_judgements` judgements together (a new user is never
    flagged on noise) and the combined p is both

        below 0.5                 closer to chance than to the median user, and
        below 1 - 1.645 se        significantly below the median user (one-sided 5%).

    The first condition keeps a user with a taste a little off the median from being
    flagged however much evidence there is; the second keeps an honest user with little
    evidence from being flagged by a noisy mean.

    On synthetic K=8 rankings (100 users, 20% adversaries: half invert every ranking, half
    rank at random; tests/test_learner_quality.py), with the RM measure only:

        RM accuracy   judgements/user   honest flagged   inverse flagged   random flagged
        0.85          10                0%               100%              100%
        0.72          10                0.5%             100%              96%
        0.60          10                0.8%             96%               48%
        0.60          30                2.2%             100%              92%

    A weak RM puts random users close to honest ones and needs more judgements; peer
    agreement on shared prompts separates them sooner (0.60 with 35% of the judgements
    shared: 2.8% / 100% / 98% at 10 judgements).
    """
    positions, weights, evidence, parts = [], [], 0, []
    for name, e, ref in (("rm", rm, rm_ref), ("peer", peer, peer_ref)):
        if ref is None or not e.judgements:
            continue
        scale = ref.level - CHANCE
        se = ref.sd / math.sqrt(e.judgements) / scale
        positions.append((e.mean - CHANCE) / scale)
        weights.append(1.0 / se**2)
        evidence += e.judgements
        parts.append(f"{name} {e.mean:.2f} vs {ref.level:.2f} on {e.judgements}")
    if evidence < min_judgements:
        return False, ""
    p = sum(w * x for w, x in zip(weights, positions, strict=True)) / sum(weights)
    se = 1.0 / math.sqrt(sum(weights))
    if p < 0.5 and p < 1.0 - Z * se:
        what = "inverted" if p < 0 else "near chance"
        return True, f"agreement {what} ({'; '.join(parts)} judgements)"
    return False, ""


# ---------------------------------------------------------------------------- measuring


def peer_evidence(
    comparisons: Sequence[Comparison], distrust: frozenset[str] = frozenset()
) -> tuple[dict[str, Evidence], float, int]:
    """Per-user peer evidence, the overall inter-labeler agreement and its pair count.

    On each prompt that two or more users judged, every strictly ordered sample pair of a
    judgement is checked against every other user's judgement that strictly ordered it
    too (a tie on either side is no evidence). The overall agreement counts each
    (two judgements, sample pair) once. A user in `distrust` is measured like any other,
    but its orders are no evidence about the others (an honest user who shared a prompt
    with an inverting adversary would otherwise look inverted)."""
    by_prompt: dict[str, list[Comparison]] = defaultdict(list)
    for c in comparisons:
        by_prompt[c.prompt_id].append(c)
    evidence: dict[str, Evidence] = defaultdict(Evidence)
    agree_all = compared_all = 0
    for group in by_prompt.values():
        if len({c.user_id for c in group}) < 2:
            continue
        orders = [_order(c) for c in group]  # {(i, j) with i < j: +1 if i better else -1}
        for c, mine in zip(group, orders, strict=True):
            agree = compared = 0
            for o, theirs in zip(group, orders, strict=True):
                if o.user_id == c.user_id or o.user_id in distrust:
                    continue
                for pair, sign in mine.items():
                    if pair in theirs:
                        compared += 1
                        agree += theirs[pair] == sign
            evidence[c.user_id].add(agree, compared)
            if not distrust:
                agree_all += agree
                compared_all += compared
    overall = agree_all / compared_all if compared_all else 0.0
    return dict(evidence), overall, compared_all // 2  # each pair was seen from both sides


def _order(c: Comparison) -> dict[tuple[int, int], int]:
    """The strict order a comparison gives each pair of the prompt's samples."""
    idx = c.samples or list(range(len(c.answers)))
    out = {}
    for a in range(len(idx)):
        for b in range(a + 1, len(idx)):
            if c.tiers[a] != c.tiers[b] and idx[a] != idx[b]:
                i, j = sorted((idx[a], idx[b]))
                better_first = (c.tiers[a] < c.tiers[b]) == (idx[a] == i)
                out[(i, j)] = 1 if better_first else -1
    return out


def rm_evidence(
    rm_dir: str | Path,
    comparisons: Sequence[Comparison],
    max_length: int,
    batch_size: int,
    device: str = "cpu",
) -> dict[str, Evidence]:
    """Per-user agreement of the reward model in rm_dir with these comparisons (one
    batched forward pass over their answers)."""
    from instructloop.learner.device import autocast
    from instructloop.learner.reward import judgement_agreement, load_reward_model

    evidence: dict[str, Evidence] = defaultdict(Evidence)
    if not comparisons:
        return {}
    model, tokenizer = load_reward_model(rm_dir, device=device)
    model.eval()
    with autocast(device):
        per = judgement_agreement(model, tokenizer, comparisons, max_length, batch_size)
    for c, (agree, pairs) in zip(comparisons, per, strict=True):
        evidence[c.user_id].add(agree, pairs)
    return dict(evidence)


@dataclass
class Measured:
    """What measure() found: every user's quality, the inter-labeler agreement, and the RM
    evidence (and how far it has scored) for the learner's state once the round commits."""

    users: dict[str, admin_pb2.UserQuality]
    agreement: float
    agreement_pairs: int
    rm_evidence: dict[str, Evidence]
    rm_scored_seq: int


def measure(
    ds: Dataset,
    *,
    round_no: int,
    seq_hi: int,
    rm_dir: str,
    trained_seq: int,
    scored_seq: int,
    evidence: Mapping[str, Evidence],
    min_judgements: int,
    max_length: int,
    batch_size: int,
    device: str = "cpu",
) -> Measured:
    """Every user of the dataset measured at the start of a round, suspended and flagged
    users too (a measure, not training).

    rm_dir is the previous round's RM ("" before the first), trained on the training
    comparisons up to arrival number `trained_seq`; it scores those it never trained on
    that no RM has scored yet (training users' after trained_seq, held-out users' after
    scored_seq) before this round replaces it, and their sums join `evidence`. Peer
    agreement is recomputed over every comparison."""
    rm = dict(evidence)
    if rm_dir:
        unseen = ds.comparisons("train", since_seq=trained_seq)
        unseen += ds.comparisons("heldout", since_seq=scored_seq)
        for user, e in rm_evidence(rm_dir, unseen, max_length, batch_size, device).items():
            rm[user] = rm.get(user, Evidence()).merge(e)
        scored_seq = seq_hi
    comparisons, counts = ds.comparisons(), ds.feedback_counts()
    peer, agreement, pairs = peer_evidence(comparisons)
    users = user_quality(counts, rm, peer, min_judgements, round_no)
    flagged = frozenset(u for u, q in users.items() if q.flagged)
    if flagged:  # again, without taking the flagged users' word about the others
        peer, _, _ = peer_evidence(comparisons, distrust=flagged)
        users = user_quality(counts, rm, peer, min_judgements, round_no)
    return Measured(users, agreement, pairs, rm, scored_seq)


def user_quality(
    counts: Mapping[str, Mapping[str, int]],
    rm: Mapping[str, Evidence],
    peer: Mapping[str, Evidence],
    min_judgements: int,
    round_no: int,
) -> dict[str, admin_pb2.UserQuality]:
    """Every user's UserQuality: counts (user -> {kind: judgements}), both measures and the
    flag (flag_user against the references of all users)."""
    rm_ref = reference(rm.values(), MIN_REF_JUDGEMENTS)
    peer_ref = reference(peer.values(), MIN_REF_JUDGEMENTS)
    out = {}
    for user in sorted(set(counts) | set(rm) | set(peer)):
        kinds = counts.get(user, {})
        r, p = rm.get(user, Evidence()), peer.get(user, Evidence())
        flagged, why = flag_user(r, p, rm_ref, peer_ref, min_judgements)
        q = admin_pb2.UserQuality(
            comparisons=sum(kinds.get(k, 0) for k in ("ranking", "choice", "rating")),
            demonstrations=kinds.get("demonstration", 0),
            rm_pairs=r.pairs,
            rm_agreement=r.pair_agreement,
            peer_pairs=p.pairs,
            peer_agreement=p.pair_agreement,
            flagged=flagged,
            flag_reason=why,
            round=round_no,
        )
        q.measured.GetCurrentTime()
        out[user] = q
    return out

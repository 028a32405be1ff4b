"""Labeler quality (learner/quality.py): the flag rule on synthetic judgements, peer
agreement by hand, and the references the rule compares users with.

The synthetic population: every judgement ranks K=8 answers whose latent quality has 4
levels (ties are common, as with the simulator's correct_concise labeler). An honest user
ranks by the latent quality; an "inverse" adversary ranks in the opposite order; a
"random" one in a random strict order. The reward model scores latent quality plus
Gaussian noise, its noise set so that it orders honest pairs right 60-85% of the time.
"""

from __future__ import annotations

import math
import random

import pytest
from conftest import report_row

from instructloop.learner.dataset import Comparison
from instructloop.learner.quality import (
    Evidence,
    Reference,
    flag_user,
    peer_evidence,
    reference,
    user_quality,
)

K = 8
RM_NOISE = {0.6: 4.5, 0.72: 2.0, 0.85: 1.0}  # RM accuracy on honest pairs -> score noise sd


def rank(kind: str, quality: list[int], rng: random.Random) -> list[int]:
    """Tiers (0 = best) a user of this kind gives answers of this latent quality."""
    if kind == "honest":
        return [max(quality) - q for q in quality]
    if kind == "inverse":
        return [q - min(quality) for q in quality]
    order = list(range(len(quality)))
    rng.shuffle(order)
    return order  # random: a strict order


def ordered_pairs(tiers: list[int]) -> list[tuple[int, int]]:
    """(better, worse) pairs of one judgement."""
    return [
        (i, j) if tiers[i] < tiers[j] else (j, i)
        for i in range(len(tiers))
        for j in range(i + 1, len(tiers))
        if tiers[i] != tiers[j]
    ]


def population(
    rm_accuracy: float,
    judgements: int,
    n_users: int = 100,
    adversaries: float = 0.2,
    seed: int = 0,
    peer_share: float = 0.0,
) -> tuple[list[str], dict[str, Evidence], dict[str, Evidence]]:
    """Kinds of the users, their RM evidence and their peer evidence.

    A `peer_share` of each user's judgements are of a prompt that one other random user
    judged too (the same samples)."""
    rng = random.Random(seed)
    n_adv = round(n_users * adversaries)
    kinds = ["inverse"] * (n_adv // 2) + ["random"] * (n_adv - n_adv // 2)
    kinds += ["honest"] * (n_users - n_adv)
    sigma = RM_NOISE[rm_accuracy]
    rm: dict[str, Evidence] = {}
    comparisons: list[Comparison] = []
    for u, kind in enumerate(kinds):
        e = rm[f"u{u}"] = Evidence()
        user_sigma = sigma * rng.uniform(0.85, 1.15)  # users' prompts differ a little
        for j in range(judgements):
            quality = [rng.randrange(4) for _ in range(K)]
            scores = [q + rng.gauss(0, user_sigma) for q in quality]
            tiers = rank(kind, quality, rng)
            pairs = ordered_pairs(tiers)
            e.add(sum(scores[w] > scores[lose] for w, lose in pairs), len(pairs))
            if rng.random() < peer_share:
                other = rng.randrange(n_users - 1)
                other += other >= u
                for user, who in ((u, kind), (other, kinds[other])):
                    comparisons.append(
                        Comparison(
                            f"f{u}-{j}-{user}",
                            f"p{u}-{j}",
                            f"u{user}",
                            "",
                            [""] * K,
                            rank(who, quality, rng),
                            list(range(K)),
                        )  # fmt: skip
                    )
    peer, _, _ = peer_evidence(comparisons)
    return kinds, rm, peer


def flag_rates(kinds, rm, peer, min_judgements: int = 10) -> dict[str, float]:
    rm_ref = reference(rm.values(), min_judgements)
    peer_ref = reference(peer.values(), min_judgements)
    flagged: dict[str, list[bool]] = {"honest": [], "inverse": [], "random": []}
    for u, kind in enumerate(kinds):
        user = f"u{u}"
        f, _ = flag_user(rm[user], peer.get(user, Evidence()), rm_ref, peer_ref, min_judgements)
        flagged[kind].append(f)
    return {k: sum(v) / len(v) for k, v in flagged.items()}


@pytest.mark.parametrize(
    ("rm_accuracy", "judgements"), [(0.85, 10), (0.72, 10), (0.6, 10), (0.6, 30)]
)
def test_the_flag_rule_separates_inverse_and_random_users_from_honest_ones(rm_accuracy, judgements):
    """The project's target: >= 90% of adversaries flagged, <= 5% of honest users, with
    20% of users adversarial (half inverse, half random), 100 users, 5 populations."""
    runs = [population(rm_accuracy, judgements, seed=s) for s in range(5)]
    rates = [flag_rates(*run) for run in runs]
    mean = {k: sum(r[k] for r in rates) / len(rates) for k in rates[0]}
    report_row(
        "labeler flag rule, RM only (K=8, 100 users, 20% adversaries, 5 populations)",
        f"RM accuracy {rm_accuracy:.2f}", f"{judgements} judgements/user",
        f"honest flagged {mean['honest']:.1%}", f"inverse {mean['inverse']:.1%}",
        f"random {mean['random']:.1%}",
    )  # fmt: skip
    assert mean["honest"] <= 0.05, mean
    assert mean["inverse"] >= 0.9, mean
    if rm_accuracy >= 0.72 or judgements >= 30:
        assert mean["random"] >= 0.9, mean
    else:  # an RM at 0.6 puts random users 0.1 from honest ones: 10 judgements are not enough
        assert mean["random"] < 0.9, mean


def test_peer_agreement_on_shared_prompts_catches_random_users_the_weak_rm_misses():
    """With a weak RM (0.6) and 10 judgements, random users mostly pass on the RM alone;
    when a third of the judgements share their prompt with another user, the combined
    measure flags them, and honest users stay under 5%."""
    runs = [population(0.6, 10, seed=s, peer_share=0.35) for s in range(5)]
    rates = [flag_rates(*run) for run in runs]
    mean = {k: sum(r[k] for r in rates) / len(rates) for k in rates[0]}
    report_row(
        "labeler flag rule, RM only (K=8, 100 users, 20% adversaries, 5 populations)",
        "RM accuracy 0.60 + peers on 35%", "10 judgements/user",
        f"honest flagged {mean['honest']:.1%}", f"inverse {mean['inverse']:.1%}",
        f"random {mean['random']:.1%}",
    )  # fmt: skip
    assert mean["honest"] <= 0.05 and mean["inverse"] >= 0.9 and mean["random"] >= 0.9, mean


def test_a_user_with_little_evidence_is_not_flagged_however_bad():
    ref = Reference(level=0.8, sd=0.15)
    inverted = Evidence()
    for _ in range(9):
        inverted.add(0, 28)  # every pair the opposite of the RM's order
    assert flag_user(inverted, Evidence(), ref, None, min_judgements=10) == (False, "")
    inverted.add(0, 28)  # the tenth judgement
    flagged, why = flag_user(inverted, Evidence(), ref, None, min_judgements=10)
    assert flagged and "inverted" in why and "rm 0.00 vs 0.80 on 10" in why
    # Peers alone count too, and with no usable reference nothing is flagged.
    assert flag_user(Evidence(), inverted, None, ref, min_judgements=10)[0]
    assert flag_user(inverted, inverted, None, None, min_judgements=10) == (False, "")


def test_a_user_a_little_below_the_median_is_not_flagged_whatever_the_evidence():
    """Significance alone would flag a labeler with a slightly different taste once
    enough judgements pile up; the rule also needs the user closer to chance."""
    ref = Reference(level=0.8, sd=0.15)
    e = Evidence()
    for _ in range(10_000):
        e.add(0.7 * 28, 28)  # 0.7: far below 0.8 in standard errors, above the midpoint
    assert flag_user(e, Evidence(), ref, None) == (False, "")
    near_chance = Evidence()
    for _ in range(200):
        near_chance.add(0.6 * 28, 28)
    assert flag_user(near_chance, Evidence(), ref, None)[0]


def test_references_need_enough_users_and_a_measure_that_beats_chance():
    honest = Evidence()
    for share in (0.7, 0.9) * 5:
        honest.add(share * 10, 10)
    assert reference([honest, honest], 10) is None  # two users: no median to trust
    ref = reference([honest, honest, honest], 10)
    assert ref.level == pytest.approx(0.8) and ref.sd == pytest.approx(0.1 * math.sqrt(10 / 9))
    chance = Evidence()
    for share in (0.5, 0.52) * 5:
        chance.add(share * 10, 10)
    assert reference([chance] * 5, 10) is None  # the RM knows nothing: its measure is unused


def test_peer_agreement_counts_pairs_both_users_ordered():
    """Two users judge the 4 samples of one prompt (answers listed in their own order);
    a third judges another prompt alone and gets no peer evidence."""
    a = Comparison("fa", "p", "alice", "", ["s0", "s1", "s2", "s3"], [0, 1, 2, 2], [0, 1, 2, 3])
    # bob: s1 > s0 > s3 > s2, listed best first
    b = Comparison("fb", "p", "bob", "", ["s1", "s0", "s3", "s2"], [0, 1, 2, 3], [1, 0, 3, 2])
    c = Comparison("fc", "q", "carol", "", ["x", "y"], [0, 1], [0, 1])
    again = Comparison("fa2", "p", "alice", "", ["s0", "s1"], [0, 1], [0, 1])  # not a peer
    peer, agreement, pairs = peer_evidence([a, b, c, again])
    # Pairs both ordered strictly: (0,1) differ; (0,2) (0,3) (1,2) (1,3) agree; (2,3)
    # alice tied. Alice's second judgement repeats (0,1), against bob only: disagrees.
    assert (peer["alice"].agree, peer["alice"].pairs, peer["alice"].judgements) == (4, 6, 2)
    assert (peer["bob"].agree, peer["bob"].pairs) == (4, 6)
    assert "carol" not in peer
    assert agreement == pytest.approx(8 / 12) and pairs == 6


def test_a_distrusted_users_orders_are_no_evidence_about_others():
    """Alice (honest) shared a prompt only with mallory, who inverts: against mallory she
    looks inverted; with mallory distrusted she has no peer evidence, and mallory is still
    measured against her."""
    a = Comparison("fa", "p", "alice", "", ["s0", "s1", "s2"], [0, 1, 2], [0, 1, 2])
    m = Comparison("fm", "p", "mallory", "", ["s0", "s1", "s2"], [2, 1, 0], [0, 1, 2])
    peer, _, _ = peer_evidence([a, m])
    assert peer["alice"].mean == 0.0 and peer["mallory"].mean == 0.0
    peer, _, _ = peer_evidence([a, m], distrust=frozenset({"mallory"}))
    assert "alice" not in peer or peer["alice"].judgements == 0
    assert (peer["mallory"].agree, peer["mallory"].pairs) == (0, 3)


def test_user_quality_fills_every_field_operators_read():
    rm = {"u1": Evidence(), "u2": Evidence()}
    rm["u1"].add(3, 4)
    quality = user_quality(
        {"u1": {"ranking": 2, "choice": 1, "demonstration": 4}, "u3": {"demonstration": 1}},
        rm, {}, min_judgements=10, round_no=7,
    )  # fmt: skip
    assert sorted(quality) == ["u1", "u2", "u3"]
    q = quality["u1"]
    assert (q.comparisons, q.demonstrations, q.rm_pairs, q.rm_agreement) == (3, 4, 4, 0.75)
    assert (q.peer_pairs, q.flagged, q.round) == (0, False, 7) and q.measured.seconds > 0
    assert Evidence.from_list(rm["u1"].to_list()) == rm["u1"]

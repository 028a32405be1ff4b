"""`instructloop simulate`'s measures of every version, one row each.

A row is made when ListVersions first shows a version (`version_row`: what the registry
says, and how many comparisons had been sent then) and filled when the version's
checkpoint has been read (`Measurer.fill`):

- exact match, greedy and sampled, on the held-out evaluation prompts (evaluate.py);
- win rates of its samples against v0's and against its round's SFT-only policy's, by
  the training population (--labeler: `labeler_win_rate`, `labeler_win_rate_vs_sft`) and
  by the held-out population (--heldout-labeler: `..._heldout`), which never ranked
  anything the learner saw; prompt i is judged by member i mod n of each (labelers.py
  `population_win_rate`);
- `corpus_loss` on held-out pretraining text, a capability no labeler ranks
  (capability.py), and the alignment tax `corpus_tax` = corpus_loss - v0's; and
  `count_exact_match`, a skill of that text no task asks (counting words).

The RM held-out accuracy and the KL come from the version's own metrics. At the end of
the run: the best promoted versions (`best_versions`) and what the learner flagged among
the simulated users (`detection`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from instructloop.clients.admin import AdminClient
from instructloop.v1 import admin_pb2

from .capability import corpus_loss, count_exact_match
from .evaluate import Answers, CheckpointDecoder
from .labelers import Labeler, population_win_rate

MEASURES = (  # filled by Measurer.fill; None until then (or when there is nothing to compare)
    "exact_match", "exact_match_sampled",
    "labeler_win_rate", "labeler_win_rate_vs_sft",
    "labeler_win_rate_heldout", "labeler_win_rate_vs_sft_heldout",
    "corpus_loss", "corpus_tax", "count_exact_match", "sft_version",
)  # fmt: skip


def version_row(v: admin_pb2.VersionInfo, *, comparisons: int, demonstrations: int, t: float):
    """A version's row as ListVersions first shows it: registry facts, nothing measured."""
    m = dict(v.metrics)
    if v.kind == "base":
        status = "base"
    elif m.get("sft_only"):
        status = "sft"  # the SFT-only policy of a round: never a candidate
    elif "win_rate" not in m:
        status = "sft-weights"  # LoRA mode, before SFT-only versions were marked
    else:
        status = "promoted" if v.gate.passed else "rejected"
    return {
        "id": v.id, "kind": v.kind, "parent": v.parent, "status": status,
        "gate_reason": v.gate.reason,
        "comparisons_at": comparisons, "demonstrations_at": demonstrations, "seen_at_s": t,
        "round": m.get("round"), "feedback_seq": m.get("feedback_seq"),
        "reference_round": m.get("reference_round"),
        "comparisons_used": m.get("comparisons_total"),
        "demonstrations_used": m.get("demonstrations_total"),
        "rm_comparisons": m.get("rm_comparisons"),
        "sft_demonstrations": m.get("sft_demonstrations"),
        "rm_heldout_accuracy": m.get("rm_heldout_accuracy"),
        "rm_heldout_pairs": m.get("rm_heldout_pairs"),
        "kl": m.get("kl"), "gate_win_rate": m.get("win_rate"),
        "gate_threshold": v.gate.measures.get("win_rate_threshold"),
        "round_seconds": m.get("round_seconds"),
        **dict.fromkeys(MEASURES), "eval_n": 0,
    }  # fmt: skip


def sft_of(row: dict, rows: dict[str, dict]) -> str | None:
    """The SFT-only version of a candidate's round: its reference (None before SFT)."""
    ref = row.get("reference_round")
    if not ref:
        return None
    return next(
        (v["id"] for v in rows.values() if v["status"] == "sft" and v["round"] == ref), None
    )


class Measurer:
    """Reads versions' checkpoints (blocking: call it from a thread) and fills their rows."""

    def __init__(
        self,
        prompts: Sequence[str],
        *,
        training: Sequence[Labeler],
        heldout: Sequence[Labeler],
        decoder: CheckpointDecoder,
        corpus_documents: int,
        threads: int,
    ):
        self.prompts = list(prompts)
        self.training, self.heldout = list(training), list(heldout)
        self.decoder = decoder
        self.corpus_documents, self.threads = corpus_documents, threads
        self.answers: dict[str, Answers] = {}  # version id -> its evaluation answers
        self.corpus_losses: dict[str, float] = {}  # version id -> nats/token
        self.counting: dict[str, float] = {}  # version id -> count_exact_match

    def read(self, vid: str, infos: dict[str, admin_pb2.VersionInfo]) -> None:
        """Decode the evaluation prompts with version vid's checkpoint, and score the
        held-out corpus with it (OSError when the files are not where the registry says)."""
        info = infos[vid]
        base = infos.get(info.base_model) if info.kind == "lora" else None
        base_path = base.path if base else None
        self.answers[vid] = self.decoder.answers(info.path, base_path)
        if self.corpus_documents:
            self.corpus_losses[vid] = corpus_loss(
                info.path, base_path, documents=self.corpus_documents, threads=self.threads
            )
            self.counting[vid] = count_exact_match(info.path, base_path, threads=self.threads)

    def fill(self, row: dict, sft: str | None) -> None:
        """The measures of a read version against v0 and its round's SFT-only policy
        (both read already, where there are any)."""
        vid, ans = row["id"], self.answers[row["id"]]
        row["exact_match"], row["exact_match_sampled"] = ans.exact_match(self.prompts)
        row["eval_n"] = len(self.prompts)
        row["corpus_loss"] = self.corpus_losses.get(vid)
        row["count_exact_match"] = self.counting.get(vid)
        v0_loss = self.corpus_losses.get("v0")
        if row["corpus_loss"] is not None and v0_loss is not None:
            row["corpus_tax"] = row["corpus_loss"] - v0_loss
        against = {"": "v0" if vid != "v0" else None, "_vs_sft": sft}
        for suffix, other in against.items():
            if other is None or other not in self.answers:
                continue
            if suffix:
                row["sft_version"] = other
            for population, tail in ((self.training, ""), (self.heldout, "_heldout")):
                if population:
                    row[f"labeler_win_rate{suffix}{tail}"] = self.win_rate(
                        population, ans, self.answers[other]
                    )

    def win_rate(
        self, population: Sequence[Labeler], ans: Answers, against: Answers
    ) -> float | None:
        """The population's win rate of one version's samples against another's."""
        rate = population_win_rate(population, self.prompts, ans.sampled, against.sampled)
        return rate if math.isfinite(rate) else None


SUMMARY_KEYS = (  # what report.json's "best" and "best_win_rate" keep of a row
    "id", "exact_match", "exact_match_sampled", "labeler_win_rate", "labeler_win_rate_vs_sft",
    "labeler_win_rate_heldout", "labeler_win_rate_vs_sft_heldout",
    "corpus_loss", "corpus_tax", "count_exact_match", "comparisons_at", "comparisons_used",
)  # fmt: skip


def best_versions(rows: Iterable[dict]) -> tuple[dict | None, dict | None]:
    """The promoted versions with the best exact match (then win rate vs v0) and with the
    best win rate vs v0, as SUMMARY_KEYS (None where no promoted version was measured)."""
    promoted = [v for v in rows if v["status"] == "promoted"]
    best = max(
        (v for v in promoted if v["exact_match"] is not None),
        key=lambda v: (v["exact_match"], v["labeler_win_rate"] or 0.0), default=None,
    )  # fmt: skip
    best_win = max(
        (v for v in promoted if v["labeler_win_rate"] is not None),
        key=lambda v: v["labeler_win_rate"], default=None,
    )  # fmt: skip
    return (
        best and {k: best[k] for k in SUMMARY_KEYS},
        best_win and {k: best_win[k] for k in SUMMARY_KEYS},
    )


def detection(
    admin: AdminClient, users: Sequence[str], adversaries: set[str], adversary: str
) -> dict:
    """What the learner flagged: adversaries and honest users, and their agreement."""
    listing = admin.list_users()
    quality = {u.user_id: u.quality for u in listing.users if u.user_id in set(users)}
    honest = [u for u in users if u not in adversaries]
    flagged = {u for u, q in quality.items() if q.flagged}

    def share(group: list[str]) -> float | None:
        return len(flagged & set(group)) / len(group) if group else None

    return {
        "adversary": adversary if adversaries else "",
        "adversaries": len(adversaries),
        "adversaries_flagged": share(sorted(adversaries)),
        "honest": len(honest),
        "honest_flagged": share(honest),
        "measured_users": sum(1 for q in quality.values() if q.round),
        "labeler_agreement": listing.labeler_agreement,
        "labeler_agreement_pairs": listing.labeler_agreement_pairs,
    }

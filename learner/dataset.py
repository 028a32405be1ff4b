"""The learner's own dataset: every logged prompt and every judgement, on disk, queryable.

Records arrive from the Redis streams (see consumer.py) and are written here before they
are acknowledged, so this file is the learner's source of truth. It is one SQLite database
in WAL mode: each insert is a transaction, a process killed mid-write leaves either the
whole record or nothing, and readers never block the writer.

Inserts are idempotent: the primary key of a prompt is its prompt_id and of a judgement
its feedback_id, so a record delivered twice (re-claimed after a crash) is stored once.
A judgement whose prompt has not arrived yet is kept; it joins its prompt when queried.

Queries return plain dataclasses the trainers take as input:
  - comparisons(): one `Comparison` per judged prompt — K answers and the tier of each
    (0 = best). A ranking gives its tiers, a choice is a ranking of 2, a rating becomes a
    ranking by score (equal scores tie).
  - demonstrations(): (prompt, ideal answer) pairs written by users.
  - rl_prompts(): prompt texts for PPO, deduplicated as InstructGPT did.
Every query takes a split ("train", "heldout" or None for both): users are assigned to a
split by a keyed hash of user_id (HMAC-SHA256 under the deployment's secret split salt,
learner/main.py --split-salt-file), as the paper split its data by customer. The key is
what makes the held-out set unchoosable: without it nobody can pick user ids that land in
the users the gate judges by. There is no default key; a dataset without one refuses to
split. Every query also takes `exclude_users`: the users a round leaves out (suspended or
flagged, rounds.py), whose judgements and prompts it then never returns.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import sqlite3
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from instructloop.v1 import records_pb2

Split = Literal["train", "heldout"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS prompts (
    prompt_id TEXT PRIMARY KEY,
    prompt    TEXT NOT NULL,
    user_id   TEXT NOT NULL,
    version   TEXT NOT NULL,
    created   REAL NOT NULL,
    record    BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
    sample_id TEXT PRIMARY KEY,
    prompt_id TEXT NOT NULL,
    idx       INTEGER NOT NULL,
    text      TEXT NOT NULL,
    version   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_by_prompt ON samples (prompt_id, idx);
CREATE TABLE IF NOT EXISTS feedback (
    feedback_id TEXT PRIMARY KEY,
    prompt_id   TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    kind        TEXT NOT NULL,
    created     REAL NOT NULL,
    seq         INTEGER NOT NULL,
    record      BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_by_prompt ON feedback (prompt_id);
CREATE INDEX IF NOT EXISTS feedback_by_seq ON feedback (seq);
CREATE TABLE IF NOT EXISTS dead_letters (
    stream    TEXT NOT NULL,
    entry_id  TEXT NOT NULL,
    error     TEXT NOT NULL,
    raw       BLOB,
    PRIMARY KEY (stream, entry_id)
);
"""


@dataclass
class DatasetConfig:
    """Where the dataset lives and how it is split."""

    path: str = field(
        default="learner-data/dataset.sqlite3",
        metadata={"help": "SQLite file holding every consumed prompt and judgement."},
    )
    heldout_fraction: float = field(
        default=0.1,
        metadata={"help": "Fraction of users (by keyed hash of user_id) held out for evaluation."},
    )
    split_salt: bytes = field(
        default=b"",
        repr=False,  # a secret: never in a repr, a log or an error
        metadata={
            "help": "The deployment's secret key of the user hash (main.py reads it from "
            "--split-salt-file); changing it reshuffles which users are held out. Empty: "
            "the dataset refuses to split (counts and ids still work)."
        },
    )


@dataclass
class Comparison:
    """K answers to one prompt and their tiers (0 = best; equal tiers are ties)."""

    feedback_id: str
    prompt_id: str
    user_id: str
    prompt: str
    answers: list[str]
    tiers: list[int]
    samples: list[int] = field(default_factory=list)  # [K] the prompt's sample index of each
    # answer: two users' comparisons of one prompt judge the same samples (peer agreement)


@dataclass
class Demonstration:
    """An answer a user wrote for a prompt: SFT data and the RM's zero point."""

    feedback_id: str
    prompt_id: str
    user_id: str
    prompt: str
    text: str


def user_split(user_id: str, heldout_fraction: float, salt: bytes) -> Split:
    """Train/held-out assignment of a user: HMAC-SHA256(salt, user_id) read as a number in
    [0, 1). The same on every machine and run that holds the deployment's salt, and not
    predictable without it. ValueError for an empty salt (there is no public default)."""
    if not salt:
        raise ValueError("no split salt: the held-out split needs the deployment's secret")
    digest = hmac.new(salt, user_id.encode(), hashlib.sha256).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    return "heldout" if u < heldout_fraction else "train"


def sample_gate_prompts(prompts: Sequence[str], k: int, salt: bytes, round_no: int) -> list[str]:
    """k of the held-out prompts for round `round_no`'s gate, drawn at random with a seed
    derived from the secret salt and the round: reproducible for the deployment, a fresh
    sample every round, and not predictable by a caller. All of them if there are <= k."""
    if len(prompts) <= k:
        return list(prompts)
    seed = hmac.new(salt, f"gate-prompts\0{round_no}".encode(), hashlib.sha256).digest()
    return random.Random(seed).sample(list(prompts), k)


def dedup_prompts(prompts: Iterable[str]) -> list[str]:
    """Drop every prompt that entirely contains another prompt (and exact repeats).

    InstructGPT's corrected procedure: a prompt that contains a shorter one is a variant of
    it, and keeping both lets one user's template dominate. Shorter prompts are kept.
    Order of first appearance is preserved for the survivors.

    A prompt that contains any other prompt also contains one that contains no other (the
    shortest in its chain), so the survivors are exactly the prompts that contain no other.
    One Aho-Corasick automaton over all of them finds that in time linear in their total
    length (plus the matches read before the first other prompt), where comparing each
    prompt with every kept one grew with the square of their number (bench/dedup.py).
    """
    import ahocorasick

    unique = list(dict.fromkeys(p.strip() for p in prompts if p.strip()))
    if len(unique) < 2:
        return unique
    automaton = ahocorasick.Automaton()
    for p in unique:
        automaton.add_word(p, p)
    automaton.make_automaton()
    return [p for p in unique if all(match == p for _, match in automaton.iter(p))]


def dedup_prompts_by_scanning(prompts: Iterable[str]) -> list[str]:
    """The definition dedup_prompts implements, quadratic (every prompt against every
    kept one): kept as its test's oracle and its benchmark's baseline."""
    unique = list(dict.fromkeys(p.strip() for p in prompts if p.strip()))
    kept: list[str] = []
    for p in sorted(unique, key=len):
        if not any(k in p for k in kept):
            kept.append(p)
    keep = set(kept)
    return [p for p in unique if p in keep]


def tiers_from_feedback(
    feedback: records_pb2.FeedbackRecord, sample_index: dict[str, int]
) -> list[tuple[int, int]] | None:
    """(sample index, tier) pairs of a comparison judgement, or None if it is not one.

    `sample_index` maps the prompt's sample ids to their index. Unknown ids are skipped.
    """
    fb = feedback.feedback
    kind = fb.WhichOneof("kind")
    if kind == "ranking":
        tiers = [[s for s in t.sample_ids] for t in fb.ranking.tiers]
    elif kind == "choice":
        tiers = [[fb.choice.chosen_sample_id], [fb.choice.rejected_sample_id]]
    elif kind == "rating":
        by_score: dict[float, list[str]] = {}
        for s in fb.rating.scores:
            by_score.setdefault(s.score, []).append(s.sample_id)
        tiers = [by_score[score] for score in sorted(by_score, reverse=True)]
    else:
        return None
    out, seen = [], set()
    for tier, ids in enumerate(tiers):
        for sid in ids:
            if sid in sample_index and sid not in seen:
                seen.add(sid)
                out.append((sample_index[sid], tier))
    return out


class Dataset:
    """The learner's dataset in one SQLite file (WAL mode).

    One writer (the consumer) at a time; any number of readers, each with its own Dataset
    object (a connection is not shared between threads that use it at the same time).
    """

    def __init__(self, cfg: DatasetConfig):
        self.cfg = cfg
        Path(cfg.path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(cfg.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a committed record survives power loss
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ---------------------------------------------------------------- writing (idempotent)

    def add_prompt(self, rec: records_pb2.PromptRecord) -> bool:
        """Store a logged prompt and its samples. False if it was already stored."""
        return self.add_batch(prompts=[rec])[0] == 1

    def add_feedback(self, rec: records_pb2.FeedbackRecord) -> bool:
        """Store a judgement. False if this feedback_id was already stored."""
        return self.add_batch(feedback=[rec])[1] == 1

    def add_batch(
        self,
        prompts: Iterable[records_pb2.PromptRecord] = (),
        feedback: Iterable[records_pb2.FeedbackRecord] = (),
        dead_letters: Iterable[tuple[str, str, str, bytes | None]] = (),
    ) -> tuple[int, int]:
        """Store records in one transaction; returns (new prompts, new feedback).

        dead_letters are (stream, entry id, error, raw bytes) of entries that could not be
        parsed: kept so that acknowledging them loses nothing a person could look at.
        """
        new_prompts = new_feedback = 0
        with self.transaction() as db:
            for rec in prompts:
                new_prompts += self._insert_prompt(db, rec)
            for rec in feedback:
                new_feedback += self._insert_feedback(db, rec)
            db.executemany("INSERT OR IGNORE INTO dead_letters VALUES (?, ?, ?, ?)", dead_letters)
        return new_prompts, new_feedback

    @staticmethod
    def _insert_prompt(db: sqlite3.Connection, rec: records_pb2.PromptRecord) -> bool:
        cur = db.execute(
            "INSERT OR IGNORE INTO prompts VALUES (?, ?, ?, ?, ?, ?)",
            (
                rec.prompt_id,
                rec.prompt,
                rec.user_id,
                rec.version,
                rec.created.ToMicroseconds() / 1e6,
                rec.SerializeToString(),
            ),
        )
        if cur.rowcount == 0:
            return False
        db.executemany(
            "INSERT OR IGNORE INTO samples VALUES (?, ?, ?, ?, ?)",
            [
                (s.sample_id, rec.prompt_id, s.index, s.text, s.version or rec.version)
                for s in rec.samples
            ],
        )
        return True

    @staticmethod
    def _insert_feedback(db: sqlite3.Connection, rec: records_pb2.FeedbackRecord) -> bool:
        (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM feedback").fetchone()
        cur = db.execute(
            "INSERT OR IGNORE INTO feedback VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                rec.feedback_id,
                rec.feedback.prompt_id,
                rec.feedback.user_id,
                rec.feedback.WhichOneof("kind") or "",
                rec.created.ToMicroseconds() / 1e6,
                seq,
                rec.SerializeToString(),
            ),
        )
        return cur.rowcount == 1

    # ---------------------------------------------------------------- reading

    def split_of(self, user_id: str) -> Split:
        return user_split(user_id, self.cfg.heldout_fraction, self.cfg.split_salt)

    def gate_prompts(self, k: int, round_no: int, exclude_users: Collection[str] = ()) -> list[str]:
        """The held-out prompts round `round_no`'s gate samples (sample_gate_prompts)."""
        prompts = self.rl_prompts("heldout", exclude_users)
        return sample_gate_prompts(prompts, k, self.cfg.split_salt, round_no)

    def feedback_counts(self) -> dict[str, dict[str, int]]:
        """Judgements per user and kind: {user_id: {"ranking": n, "demonstration": m, ...}}."""
        out: dict[str, dict[str, int]] = {}
        rows = self.db.execute("SELECT user_id, kind, COUNT(*) FROM feedback GROUP BY 1, 2")
        for user, kind, n in rows:
            out.setdefault(user, {})[kind] = n
        return out

    def counts(self) -> dict[str, int]:
        """Rows per table and feedback per kind (for progress and round triggers)."""
        out = {
            t: self.db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
            for t in ("prompts", "samples", "feedback", "dead_letters")
        }
        for kind, n in self.db.execute("SELECT kind, COUNT(*) FROM feedback GROUP BY kind"):
            out[f"feedback_{kind}"] = n
        return out

    def last_seq(self) -> int:
        """Arrival number of the newest judgement: pass it as `since_seq` next round to get
        only what arrived after (one epoch over new data)."""
        return self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM feedback").fetchone()[0]

    def new_feedback(self, since_seq: int = 0) -> dict[str, int]:
        """Judgements per kind that arrived after since_seq (cheap: for round triggers)."""
        rows = self.db.execute(
            "SELECT kind, COUNT(*) FROM feedback WHERE seq > ? GROUP BY kind", (since_seq,)
        )
        return dict(rows.fetchall())

    def feedback_ids(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT feedback_id FROM feedback ORDER BY seq")]

    def _joined_feedback(
        self,
        kinds: tuple[str, ...],
        since_seq: int,
        split: Split | None,
        exclude_users: Collection[str] = (),
    ):
        """Feedback of the given kinds whose prompt has arrived, in arrival order."""
        marks = ",".join("?" * len(kinds))
        rows = self.db.execute(
            f"SELECT f.record, p.prompt FROM feedback f JOIN prompts p USING (prompt_id) "
            f"WHERE f.kind IN ({marks}) AND f.seq > ? ORDER BY f.seq",
            (*kinds, since_seq),
        ).fetchall()
        for blob, prompt in rows:
            rec = records_pb2.FeedbackRecord.FromString(blob)
            if rec.feedback.user_id in exclude_users:
                continue
            if split is not None and self.split_of(rec.feedback.user_id) != split:
                continue
            yield rec, prompt

    def comparisons(
        self, split: Split | None = None, since_seq: int = 0, exclude_users: Collection[str] = ()
    ) -> list[Comparison]:
        """Every ranking, choice and rating with >= 2 answers in >= 2 tiers, by prompt."""
        out = []
        kinds = ("ranking", "choice", "rating")
        for rec, prompt in self._joined_feedback(kinds, since_seq, split, exclude_users):
            samples = self.db.execute(
                "SELECT sample_id, text FROM samples WHERE prompt_id = ? ORDER BY idx",
                (rec.feedback.prompt_id,),
            ).fetchall()
            index = {sid: i for i, (sid, _) in enumerate(samples)}
            ranked = tiers_from_feedback(rec, index)
            if not ranked or len({t for _, t in ranked}) < 2:
                continue  # all tied, or nothing known: no pair to learn from
            out.append(
                Comparison(
                    feedback_id=rec.feedback_id,
                    prompt_id=rec.feedback.prompt_id,
                    user_id=rec.feedback.user_id,
                    prompt=prompt,
                    answers=[samples[i][1] for i, _ in ranked],
                    tiers=[t for _, t in ranked],
                    samples=[i for i, _ in ranked],
                )
            )
        return out

    def demonstrations(
        self, split: Split | None = None, since_seq: int = 0, exclude_users: Collection[str] = ()
    ) -> list[Demonstration]:
        return [
            Demonstration(
                feedback_id=rec.feedback_id,
                prompt_id=rec.feedback.prompt_id,
                user_id=rec.feedback.user_id,
                prompt=prompt,
                text=rec.feedback.demonstration.text,
            )
            for rec, prompt in self._joined_feedback(
                ("demonstration",), since_seq, split, exclude_users
            )
        ]

    def rl_prompts(
        self, split: Split | None = None, exclude_users: Collection[str] = ()
    ) -> list[str]:
        """Logged prompt texts for PPO, deduplicated (containment), in arrival order."""
        rows = self.db.execute("SELECT prompt, user_id FROM prompts ORDER BY created, prompt_id")
        return dedup_prompts(
            p
            for p, u in rows
            if u not in exclude_users and (split is None or self.split_of(u) == split)
        )

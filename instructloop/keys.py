"""The Redis key layout that the server writes and the learner reads.

Every key starts with one prefix, so two deployments can share a Redis. Stream entries
have one field, DATA_FIELD, holding a serialized record from instructloop.v1.records_pb2.
Nothing is trimmed from a stream before the learner has acknowledged it.
"""

from __future__ import annotations

from dataclasses import dataclass

DATA_FIELD = b"data"
QUEUE_SKIPS_MAXLEN = 10_000  # entries kept in the queue_skips stream (approximately)


@dataclass(frozen=True)
class Keys:
    prefix: str = "instructloop"

    @property
    def prompts_stream(self) -> str:
        """Stream of PromptRecord: every logged Generate call."""
        return f"{self.prefix}:stream:prompts"

    @property
    def feedback_stream(self) -> str:
        """Stream of FeedbackRecord: every accepted judgement."""
        return f"{self.prefix}:stream:feedback"

    def prompt(self, prompt_id: str) -> str:
        """A PromptRecord by id, kept for the feedback window (its TTL)."""
        return f"{self.prefix}:prompt:{prompt_id}"

    def judgement(self, prompt_id: str, user_id: str, kind: str) -> str:
        """The feedback id of a user's one judgement of a prompt. kind is "comparison"
        (ranking, choice or rating) or "demonstration": a user may do one of each."""
        return f"{self.prefix}:judged:{prompt_id}:{user_id}:{kind}"

    def idempotency(self, user_id: str, key: str) -> str:
        """'<content hash> <feedback id>' for a client-chosen idempotency key. The user id's
        length comes first, so no (user, key) pair shares a key with another: user "a"
        with key "b:c" is idem:1:a:b:c, user "a:b" with key "c" is idem:3:a:b:c."""
        return f"{self.prefix}:idem:{len(user_id)}:{user_id}:{key}"

    @property
    def learner_lease(self) -> str:
        """The single learner's lease: '<holder> <suffix>', with a TTL it keeps renewing."""
        return f"{self.prefix}:learner:lease"

    # ---- labeling queue (serve/queue.py) ----------------------------------------------
    # A share of logged prompts with n >= 2 (--queue-share) becomes a queue item, in the
    # same MULTI as its log entry; NextTask leases items to labelers, SkipTask gives them
    # back, a comparison closes the judge's lease. Bounds: the waiting set holds at most
    # --queue-max items (enqueueing beyond it drops the oldest, with their hashes); an
    # item's hash expires with its prompt (the prompt's TTL) and is deleted when
    # --queue-overlap labelers judged it, when it is dropped as unrankable, or when it is
    # dropped as the oldest; the scripts remove an expired item's ids when they meet
    # them. Each labeler holds at most one lease, so the lease set is at most one entry per
    # labeler. The scripts derive an item's key from its prompt id (the prefixes below),
    # which a single Redis (not a Redis Cluster) allows, as the rest of this layout.

    @property
    def queue_waiting(self) -> str:
        """Sorted set: prompt id -> enqueue time (ms), the items with a free place (handed
        to fewer than their overlap labelers whose leases are live or who judged them)."""
        return f"{self.prefix}:queue:waiting"

    @property
    def queue_leases(self) -> str:
        """Sorted set: '<prompt id> <user>' -> lease expiry (ms), every live lease (and
        expired ones until NextTask reclaims them)."""
        return f"{self.prefix}:queue:leases"

    @property
    def queue_item_prefix(self) -> str:
        return f"{self.prefix}:queue:item:"

    def queue_item(self, prompt_id: str) -> str:
        """Hash of one item: owner (the prompt's user), at (enqueue ms), need (overlap),
        taken (live leases + judgements), done (judgements), cannot (cannot-rank count),
        leases (lease counter), and per labeler who touched it `u:USER` -> 'L <n> <expiry
        ms>' (leased), 'X <n>' (lease expired), 'S <n>' (skipped), 'C <n>' (cannot rank)
        or 'J' (judged). TTL: its prompt's."""
        return f"{self.queue_item_prefix}{prompt_id}"

    @property
    def queue_lease_of_prefix(self) -> str:
        return f"{self.prefix}:queue:lease:"

    def queue_lease_of(self, user_id: str) -> str:
        """'<prompt id> <lease number> <expiry ms>': the one live lease a labeler holds,
        expiring with it (NextTask returns it again while it is live)."""
        return f"{self.queue_lease_of_prefix}{user_id}"

    @property
    def queue_skips(self) -> str:
        """Stream of SkipTaskRequest (user_id filled in): every skip and cannot-rank, with
        its reason, for operators; capped at about QUEUE_SKIPS_MAXLEN entries."""
        return f"{self.prefix}:stream:queue_skips"

    # ---- users (instructloop/users.py) -------------------------------------------------

    @property
    def users(self) -> str:
        """Hash: user id -> serialized admin_pb2.UserInfo (role, revoked, suspended)."""
        return f"{self.prefix}:users"

    @property
    def credentials(self) -> str:
        """Hash: SHA-256 (hex) of a user's token -> user id. Tokens are never stored."""
        return f"{self.prefix}:credentials"

    @property
    def credential_of(self) -> str:
        """Hash: user id -> SHA-256 (hex) of its token (to revoke it)."""
        return f"{self.prefix}:credential_of"

    @property
    def user_quality(self) -> str:
        """Hash: user id -> serialized admin_pb2.UserQuality, replaced by each round."""
        return f"{self.prefix}:user_quality"

    @property
    def labeler_agreement(self) -> str:
        """Hash: the latest round's inter-labeler agreement and its pair count."""
        return f"{self.prefix}:labeler_agreement"

    def rate_prefix(self) -> str:
        """Prefix of the rate limiter's keys (one per user, kind and window)."""
        return f"{self.prefix}:rate"

    # ---- model registry ----------------------------------------------------------------

    @property
    def versions(self) -> str:
        """Hash: version id -> serialized admin_pb2.VersionInfo."""
        return f"{self.prefix}:versions"

    @property
    def version_seq(self) -> str:
        """Counter that allocates version ids (v1, v2, ...)."""
        return f"{self.prefix}:version_seq"

    @property
    def aliases(self) -> str:
        """Hash: alias ("current", "previous", "canary") -> version id."""
        return f"{self.prefix}:aliases"

    @property
    def freeze(self) -> str:
        """Serialized admin_pb2.FreezeState while automatic promotion is frozen."""
        return f"{self.prefix}:freeze"

    @property
    def canary(self) -> str:
        """Hash: the canary's share, promote_at, rollback_at, min_comparisons, and its
        live outcomes against current (wins, losses, ties)."""
        return f"{self.prefix}:canary"

    @property
    def canary_users(self) -> str:
        """Set: the distinct users who judged the canary (deleted with the canary)."""
        return f"{self.prefix}:canary:users"

    @property
    def canary_judged(self) -> str:
        """Set: '<user> <prompt>' of every judgement counted for the canary, so each user's
        judgement of a prompt counts once (deleted with the canary)."""
        return f"{self.prefix}:canary:judged"

    @property
    def canary_decision(self) -> str:
        """String with a TTL: the replica deciding the canary now. A replica that dies
        while deciding leaves it to expire, and the next judgement decides."""
        return f"{self.prefix}:canary:decision"

    @property
    def audit_stream(self) -> str:
        """Stream of AuditRecord: every registry change, who, when, from and to."""
        return f"{self.prefix}:stream:audit"

    @property
    def events(self) -> str:
        """Pub/sub channel of RegistryEvent."""
        return f"{self.prefix}:events"

    @property
    def replicas(self) -> str:
        """Hash: replica id -> serialized admin_pb2.ReplicaStatus (heartbeats)."""
        return f"{self.prefix}:replicas"

    @property
    def swap_turn(self) -> str:
        """String with a TTL: '<replica> <token>' of the one replica taking a full-weight
        swap now (serve/swapturn.py). The holder renews it; a dead holder's turn expires."""
        return f"{self.prefix}:swap:turn"

"""The Redis key layout that the server writes and the learner reads.

Every key starts with one prefix, so two deployments can share a Redis. Stream entries
have one field, DATA_FIELD, holding a serialized record from instructloop.v1.records_pb2.
Nothing is trimmed from a stream before the learner has acknowledged it.
"""

from __future__ import annotations

from dataclasses import dataclass

DATA_FIELD = b"data"


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

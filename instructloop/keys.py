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
        """'<content hash> <feedback id>' for a client-chosen idempotency key."""
        return f"{self.prefix}:idem:{user_id}:{key}"

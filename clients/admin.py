"""Typed client for the operator API (instructloop.v1.Admin).

Every call carries `authorization: Bearer <token>`; the token comes from the argument,
$INSTRUCTLOOP_ADMIN_TOKEN, or the server's DATA_DIR/admin-token file.

    with AdminClient("localhost:50051", token=...) as admin:
        admin.promote("v3", reason="beats v2 on held-out")
        admin.rollback()                     # back to `previous`
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Self

import grpc

from instructloop.v1 import admin_pb2, admin_pb2_grpc

from .sdk import credential, default_target, tls_credentials

# The few measures an operator reads first, as (label, metrics key): the round's reward
# model on held-out users' comparisons, the gate's RM-estimated win rate against the
# serving version, and the candidate's KL to its reference (learner/rounds.py writes them).
KEY_METRICS = (("RM acc", "rm_heldout_accuracy"), ("gate win", "win_rate"), ("KL", "kl"))


def key_metrics(info: admin_pb2.VersionInfo) -> dict[str, float | None]:
    """The version's KEY_METRICS and its feedback count, by label; None where the version
    has no finite value (the base, a round without held-out comparisons)."""
    out: dict[str, float | None] = {}
    for label, key in KEY_METRICS:
        value = info.metrics.get(key, info.gate.measures.get(key))
        out[label] = value if value is not None and math.isfinite(value) else None
    out["feedback"] = float(info.feedback_count)
    return out


def default_token(data_dir: str | None = None) -> str:
    """$INSTRUCTLOOP_ADMIN_TOKEN, else DATA_DIR/admin-token ($INSTRUCTLOOP_DATA_DIR or ./data)."""
    return credential("INSTRUCTLOOP_ADMIN_TOKEN", "admin-token", data_dir)


class AdminClient:
    def __init__(
        self,
        target: str | None = None,
        *,
        token: str | None = None,
        actor: str = "",
        timeout: float | None = 30.0,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """credentials make the channel a TLS channel (default: TLS trusting
        $INSTRUCTLOOP_TLS_CA when it is set): the token must not cross a network in the
        clear."""
        self.target = target or default_target()
        self.timeout = timeout
        token = default_token() if token is None else token
        self.metadata: tuple[tuple[str, str], ...] = ()
        if token:
            self.metadata += (("authorization", f"Bearer {token}"),)
        if actor:
            self.metadata += (("x-instructloop-actor", actor),)
        credentials = credentials or tls_credentials()
        if credentials is None:
            self.channel = grpc.insecure_channel(self.target)
        else:
            self.channel = grpc.secure_channel(self.target, credentials)
        self._stub = admin_pb2_grpc.AdminStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, method, request):
        return method(request, timeout=self.timeout, metadata=self.metadata)

    def list_versions(self) -> admin_pb2.ListVersionsResponse:
        return self._call(self._stub.ListVersions, admin_pb2.ListVersionsRequest())

    def get_version(self, version: str) -> admin_pb2.VersionDetail:
        return self._call(self._stub.GetVersion, admin_pb2.GetVersionRequest(version=version))

    def promote(self, version: str, reason: str = "") -> admin_pb2.AliasChange:
        request = admin_pb2.PromoteRequest(version=version, reason=reason)
        return self._call(self._stub.Promote, request)

    def rollback(self, version: str = "", reason: str = "") -> admin_pb2.AliasChange:
        request = admin_pb2.RollbackRequest(version=version, reason=reason)
        return self._call(self._stub.Rollback, request)

    def freeze(self, reason: str = "") -> admin_pb2.FreezeState:
        return self._call(self._stub.Freeze, admin_pb2.FreezeRequest(reason=reason))

    def unfreeze(self, reason: str = "") -> admin_pb2.FreezeState:
        return self._call(self._stub.Unfreeze, admin_pb2.FreezeRequest(reason=reason))

    def set_canary(
        self,
        version: str,
        share: float = 0.1,
        reason: str = "",
        *,
        promote_at: float = 0.0,
        rollback_at: float = 0.0,
        min_comparisons: int = 0,
        min_users: int = 0,
    ) -> admin_pb2.AliasChange:
        """Route `share` of traffic to a LoRA version ("" clears the canary). After
        min_comparisons arena judgements (one per user and prompt) from at least min_users
        distinct users (0: the server default, 5), a win rate >= promote_at promotes it
        and one <= rollback_at ends it (0 disables either)."""
        request = admin_pb2.SetCanaryRequest(
            version=version,
            share=share,
            reason=reason,
            promote_at=promote_at,
            rollback_at=rollback_at,
            min_comparisons=min_comparisons,
            min_users=min_users,
        )
        return self._call(self._stub.SetCanary, request)

    # ---- reads ---------------------------------------------------------------------------

    def whoami(self) -> admin_pb2.UserInfo:
        """Who this client's credential belongs to (any valid credential may ask)."""
        return self._call(self._stub.WhoAmI, admin_pb2.WhoAmIRequest())

    def list_audit(self, count: int = 100) -> list:
        """The newest `count` audit records (records_pb2.AuditRecord), newest first."""
        return list(
            self._call(self._stub.ListAudit, admin_pb2.ListAuditRequest(count=count)).records
        )

    def watch_events(self) -> Iterator:
        """The registry's events (records_pb2.RegistryEvent) as they happen: first one with
        action "watching" once subscribed. Cancel the returned call (or leave the loop and
        call .cancel()) to stop."""
        return self._stub.WatchEvents(
            admin_pb2.WatchEventsRequest(), timeout=None, metadata=self.metadata
        )

    def export_feedback(
        self, after: str = "", limit: int = 0
    ) -> Iterator[admin_pb2.FeedbackExport]:
        """Judgements from the feedback stream, oldest first, after the entry id `after`
        (empty: the oldest kept), at most `limit` (0: the server's 10,000)."""
        request = admin_pb2.ExportFeedbackRequest(after=after, limit=limit)
        return self._stub.ExportFeedback(request, timeout=None, metadata=self.metadata)

    # ---- users --------------------------------------------------------------------------

    def add_user(self, user_id: str, role: str = "labeler") -> admin_pb2.AddUserResponse:
        """Create a user; the response's token is its credential, shown this once."""
        request = admin_pb2.AddUserRequest(user_id=user_id, role=role)
        return self._call(self._stub.AddUser, request)

    def list_users(self) -> admin_pb2.ListUsersResponse:
        return self._call(self._stub.ListUsers, admin_pb2.ListUsersRequest())

    def revoke_user(self, user_id: str, reason: str = "") -> admin_pb2.UserInfo:
        return self._call(
            self._stub.RevokeUser, admin_pb2.UserRequest(user_id=user_id, reason=reason)
        )

    def suspend_user(
        self, user_id: str, reason: str = "", suspend: bool = True
    ) -> admin_pb2.UserInfo:
        """Suspend a user (suspend=False reinstates it): its feedback is refused and the
        learner leaves all of it out of its next round."""
        request = admin_pb2.SuspendUserRequest(user_id=user_id, suspend=suspend, reason=reason)
        return self._call(self._stub.SuspendUser, request)

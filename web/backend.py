"""The gRPC calls the web app makes, each with the signed-in user's own credential.

One channel (grpc.aio) for the app; each call carries the session's token, and for the
deployment's shared admin token the operator's name as `x-instructloop-actor`, so the
server authenticates, authorises, rate-limits and audits a page's call exactly as it would
the CLI's. Requests are built with the SDK's helpers (instructloop.clients.wire).
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import grpc.aio

from instructloop.clients import wire
from instructloop.clients.sdk import tls_credentials
from instructloop.v1 import admin_pb2, admin_pb2_grpc, api_pb2, api_pb2_grpc

from .sessions import Session

ACTOR_HEADER = "x-instructloop-actor"
CALL_TIMEOUT_S = 30.0


def metadata(token: str, actor: str = "") -> tuple[tuple[str, str], ...]:
    md = (("authorization", f"Bearer {token}"),)
    return md + ((ACTOR_HEADER, actor),) if actor else md


class Backend:
    def __init__(self, target: str, tls_ca: str = ""):
        self.target = target
        options = wire.channel_options(max_attempts=3)
        credentials = tls_credentials(tls_ca or None)
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self.channel = grpc.aio.secure_channel(target, credentials, options=options)
        self.api = api_pb2_grpc.InstructLoopStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    @staticmethod
    def _kw(session: Session, timeout: float | None = CALL_TIMEOUT_S) -> dict:
        return {"metadata": metadata(session.token, session.actor), "timeout": timeout}

    # ---- sign-in -------------------------------------------------------------------------

    async def whoami(self, token: str) -> admin_pb2.UserInfo:
        return await self.admin.WhoAmI(
            admin_pb2.WhoAmIRequest(), metadata=metadata(token), timeout=CALL_TIMEOUT_S
        )

    # ---- operators -----------------------------------------------------------------------

    async def list_versions(self, s: Session) -> admin_pb2.ListVersionsResponse:
        return await self.admin.ListVersions(admin_pb2.ListVersionsRequest(), **self._kw(s))

    async def list_audit(self, s: Session, count: int) -> admin_pb2.ListAuditResponse:
        return await self.admin.ListAudit(admin_pb2.ListAuditRequest(count=count), **self._kw(s))

    async def promote(self, s: Session, version: str, reason: str) -> admin_pb2.AliasChange:
        request = admin_pb2.PromoteRequest(version=version, reason=reason)
        return await self.admin.Promote(request, **self._kw(s))

    async def rollback(self, s: Session, version: str, reason: str) -> admin_pb2.AliasChange:
        request = admin_pb2.RollbackRequest(version=version, reason=reason)
        return await self.admin.Rollback(request, **self._kw(s))

    async def freeze(self, s: Session, frozen: bool, reason: str) -> admin_pb2.FreezeState:
        method = self.admin.Freeze if frozen else self.admin.Unfreeze
        return await method(admin_pb2.FreezeRequest(reason=reason), **self._kw(s))

    async def set_canary(self, s: Session, request: admin_pb2.SetCanaryRequest):
        return await self.admin.SetCanary(request, **self._kw(s))

    def watch_events(self, s: Session):
        """The registry's events, until cancelled (a server-streaming call)."""
        return self.admin.WatchEvents(admin_pb2.WatchEventsRequest(), **self._kw(s, None))

    def export_feedback(self, s: Session, after: str, limit: int):
        request = admin_pb2.ExportFeedbackRequest(after=after, limit=limit)
        return self.admin.ExportFeedback(request, **self._kw(s, None))

    # ---- everyone ------------------------------------------------------------------------

    async def get_model(self, s: Session) -> api_pb2.ModelInfo:
        return await self.api.GetModel(api_pb2.GetModelRequest(), **self._kw(s))

    def generate_stream(self, s: Session, prompt: str, n: int, max_tokens: int, temperature):
        request = wire.generate_request(
            prompt, None, n, max_tokens, temperature, None, None, None, (), None, "", True,
            step_deltas=True,
        )  # fmt: skip
        return self.api.GenerateStream(request, **self._kw(s, 300.0))

    async def rank(self, s: Session, prompt_id: str, tiers: Sequence[Sequence[str]]):
        request = wire.feedback_request(prompt_id, "", "", ranking=wire.ranking(tiers))
        return await self.api.SubmitFeedback(request, **self._kw(s))

    async def rate(self, s: Session, prompt_id: str, scores: dict[str, float]):
        request = wire.feedback_request(prompt_id, "", "", rating=wire.rating(scores))
        return await self.api.SubmitFeedback(request, **self._kw(s))

    async def demonstrate(self, s: Session, prompt_id: str, text: str):
        demo = api_pb2.Demonstration(text=text)
        request = wire.feedback_request(prompt_id, "", "", demonstration=demo)
        return await self.api.SubmitFeedback(request, **self._kw(s))

    async def next_task(self, s: Session):
        return await self.api.NextTask(api_pb2.NextTaskRequest(), **self._kw(s))

    async def skip_task(self, s: Session, task_id: str, reason: str, cannot_rank: bool):
        request = api_pb2.SkipTaskRequest(task_id=task_id, reason=reason, cannot_rank=cannot_rank)
        return await self.api.SkipTask(request, **self._kw(s))

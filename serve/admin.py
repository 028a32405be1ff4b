"""The Admin gRPC service (operators): versions, canary, users.

Every Admin call needs an admin credential, `authorization: Bearer <token>`: the
deployment's admin token, or the token of a user with role admin (serve/auth.py). None,
or an unknown or revoked one, gives UNAUTHENTICATED; another role PERMISSION_DENIED. The
actor written to the audit stream is the user; a caller with the shared admin token may
name itself with `x-instructloop-actor`. WhoAmI is the one call any valid credential may
make. The two server-streaming calls (WatchEvents, ExportFeedback) authenticate once, when
they start.
"""

from __future__ import annotations

import functools
import logging
import re
from contextvars import ContextVar

import grpc
from redis.exceptions import RedisError

from instructloop.keys import DATA_FIELD
from instructloop.registry import (
    Frozen,
    NothingToRollBackTo,
    Registry,
    RegistryError,
    UnknownVersion,
    now_ts,
)
from instructloop.store import ModelStore, VersionError
from instructloop.users import ADMIN, Caller, UnknownUser, UserError, UserStore
from instructloop.v1 import admin_pb2, admin_pb2_grpc, records_pb2

from .auth import ADMIN_USER, Authenticator
from .errors import PermissionDenied, ResourceExhausted, Unauthenticated

log = logging.getLogger(__name__)
ACTOR_HEADER = "x-instructloop-actor"


_STATUS = {
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnknownVersion: grpc.StatusCode.NOT_FOUND,
    UnknownUser: grpc.StatusCode.NOT_FOUND,
    UserError: grpc.StatusCode.FAILED_PRECONDITION,
    NothingToRollBackTo: grpc.StatusCode.FAILED_PRECONDITION,
    Frozen: grpc.StatusCode.FAILED_PRECONDITION,
    VersionError: grpc.StatusCode.FAILED_PRECONDITION,
    RegistryError: grpc.StatusCode.FAILED_PRECONDITION,
    ValueError: grpc.StatusCode.INVALID_ARGUMENT,
}


# Longest version id, reason or actor an Admin request may carry; longer is refused before
# any work, and error messages never echo more than this.
MAX_ADMIN_FIELD_CHARS = 1024
# Bounds of the read calls: audit records per ListAudit; judgements per ExportFeedback
# (read from Redis EXPORT_PAGE at a time, so a large export never sits in memory whole);
# WatchEvents streams held open at once (each holds one Redis connection of the pool).
DEFAULT_AUDIT, MAX_AUDIT = 100, 1000
DEFAULT_EXPORT, MAX_EXPORT, EXPORT_PAGE = 10_000, 100_000, 500
MAX_WATCHERS = 16
STREAM_ID = re.compile(r"\d{1,20}(-\d{1,20})?")


async def _fail(context, e: Exception) -> None:
    """One status per failure: the registry's own refusals by kind; Redis failing or slow
    is UNAVAILABLE (safe to retry); anything else is a bug here, INTERNAL, as the public
    service says."""
    for kind, code in _STATUS.items():
        if isinstance(e, kind):
            await context.abort(code, str(e))
    if isinstance(e, RedisError | TimeoutError):
        log.warning("admin call: registry unavailable", extra={"error": str(e)})
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"registry unavailable: {e}")
    log.exception("admin call failed")
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")


async def _check_sizes(request, context) -> None:
    """INVALID_ARGUMENT for an over-long string field, naming it and its length only."""
    for desc, value in request.ListFields():
        if isinstance(value, str) and len(value) > MAX_ADMIN_FIELD_CHARS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{desc.name} is {len(value)} characters; the limit is {MAX_ADMIN_FIELD_CHARS}",
            )


_CALLER: ContextVar[str] = ContextVar("admin_caller", default=ADMIN_USER)
_CREDENTIAL: ContextVar[Caller | None] = ContextVar("admin_credential", default=None)


def _actor(context) -> str:
    """Who makes this call, for the audit stream (set by _admin_call)."""
    return _CALLER.get()


async def _authenticate(self, context, *, admin: bool = True) -> None:
    """Check the caller's credential (an admin's, unless admin=False) and remember who it
    is for the audit stream; a failure aborts the call with its status (_fail)."""
    try:
        metadata = context.invocation_metadata() or ()
        caller = await (self.auth.admin(metadata) if admin else self.auth.caller(metadata))
        if caller is None:  # open mode without a credential: nobody to name
            raise Unauthenticated("WhoAmI needs a credential: 'authorization: Bearer <token>'")
        _CREDENTIAL.set(caller)
        if caller.user_id == ADMIN_USER:  # the shared token: the operator names itself
            _CALLER.set(dict(metadata).get(ACTOR_HEADER, ADMIN_USER)[:128])
        else:
            _CALLER.set(caller.user_id)
    except Exception as e:
        await _fail(context, e)


def _admin_call(method=None, *, admin: bool = True):
    """Authenticates the caller (an admin unless admin=False), checks the request's sizes,
    runs the call, maps its failure to one status (_fail)."""
    if method is None:
        return functools.partial(_admin_call, admin=admin)

    @functools.wraps(method)
    async def call(self, request, context):
        await _authenticate(self, context, admin=admin)
        await _check_sizes(request, context)
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await _fail(context, e)

    return call


def _admin_stream(method):
    """_admin_call for a server-streaming method (an async generator): the caller is
    authenticated once, before the first message; a failure mid-stream ends it with its
    status."""

    @functools.wraps(method)
    async def call(self, request, context):
        await _authenticate(self, context)
        await _check_sizes(request, context)
        try:
            async for message in method(self, request, context):
                yield message
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await _fail(context, e)

    return call


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(
        self, registry: Registry, store: ModelStore, users: UserStore, auth: Authenticator
    ):
        self.registry = registry
        self.store = store
        self.users = users
        self.auth = auth
        self._watchers = 0

    @_admin_call
    async def ListVersions(self, request, context):
        canary = await self.registry.canary_state()
        return admin_pb2.ListVersionsResponse(
            versions=await self.registry.list(),
            aliases=await self.registry.aliases(),
            freeze=await self.registry.freeze_state(),
            replicas=await self.registry.replicas(),
            canary_share=canary.share,
            canary=canary,
        )

    @_admin_call
    async def GetVersion(self, request, context):
        info = await self.registry.get(request.version)
        detail = admin_pb2.VersionDetail(info=info)
        if info.kind != "base":
            detail.feedback_ids.extend(self.store.manifest(info.id).feedback_ids)
        parent, seen = info.parent, {info.id}
        while parent and parent not in seen:  # lineage, nearest first
            detail.lineage.append(parent)
            seen.add(parent)
            try:
                parent = (await self.registry.get(parent)).parent
            except UnknownVersion:
                break
        return detail

    @_admin_call
    async def Promote(self, request, context):
        change = await self.registry.promote(request.version, _actor(context), request.reason)
        log.info("promote", extra={"from": change.from_version, "to": change.to_version,
                                   "actor": change.actor})  # fmt: skip
        return change

    @_admin_call
    async def Rollback(self, request, context):
        change = await self.registry.rollback(_actor(context), request.version, request.reason)
        log.info("rollback", extra={"from": change.from_version, "to": change.to_version,
                                    "actor": change.actor})  # fmt: skip
        return change

    @_admin_call
    async def Freeze(self, request, context):
        return await self.registry.freeze(_actor(context), request.reason)

    @_admin_call
    async def Unfreeze(self, request, context):
        return await self.registry.unfreeze(_actor(context), request.reason)

    @_admin_call
    async def SetCanary(self, request, context):
        if request.version:
            info = await self.registry.get(request.version)
            if info.kind != "lora":
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{request.version} is a {info.kind} version; a canary must be a LoRA "
                    "adapter so replicas can serve it beside current",
                )
        return await self.registry.set_canary(
            _actor(context), request.version, request.share, request.reason,
            promote_at=request.promote_at, rollback_at=request.rollback_at,
            min_comparisons=request.min_comparisons, min_users=request.min_users,
        )  # fmt: skip

    # ---- users --------------------------------------------------------------------------

    @_admin_call
    async def AddUser(self, request, context):
        info, token = await self.users.add(request.user_id, request.role, _actor(context))
        log.info("user added", extra={"user": info.user_id, "role": info.role,
                                      "actor": info.actor})  # fmt: skip
        return admin_pb2.AddUserResponse(user=info, token=token)

    @_admin_call
    async def ListUsers(self, request, context):
        agreement, pairs = await self.users.labeler_agreement()
        return admin_pb2.ListUsersResponse(
            users=await self.users.list(),
            labeler_agreement=agreement,
            labeler_agreement_pairs=pairs,
        )

    @_admin_call
    async def RevokeUser(self, request, context):
        info = await self.users.revoke(request.user_id)
        log.info("user revoked", extra={"user": info.user_id, "actor": _actor(context)})
        return info

    @_admin_call
    async def SuspendUser(self, request, context):
        info = await self.users.suspend(request.user_id, request.suspend, request.reason)
        log.info("user suspended" if request.suspend else "user reinstated",
                 extra={"user": info.user_id, "actor": _actor(context)})  # fmt: skip
        return info

    # ---- reads for front ends ------------------------------------------------------------

    @_admin_call(admin=False)
    async def WhoAmI(self, request, context):
        caller = _CREDENTIAL.get()
        if caller is None or caller.user_id == ADMIN_USER:
            return admin_pb2.UserInfo(user_id=ADMIN_USER, role=ADMIN)
        return await self.users.info(caller.user_id)

    @_admin_call
    async def ListAudit(self, request, context):
        count = request.count or DEFAULT_AUDIT
        if count > MAX_AUDIT:
            raise ValueError(f"count is {count}; at most {MAX_AUDIT} records per call")
        return admin_pb2.ListAuditResponse(records=await self.registry.audit_log(count))

    @_admin_stream
    async def WatchEvents(self, request, context):
        if self._watchers >= MAX_WATCHERS:
            raise ResourceExhausted(
                f"this server already streams events to {MAX_WATCHERS} watchers; retry later"
            )
        self._watchers += 1
        try:
            async with self.registry.redis.pubsub() as pubsub:
                await pubsub.subscribe(self.registry.keys.events)
                # Subscribed: from here on no event is missed, so a reader may now list.
                yield records_pb2.RegistryEvent(action="watching", at=now_ts())
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                    if message is not None and message["type"] == "message":
                        yield records_pb2.RegistryEvent.FromString(message["data"])
        finally:
            self._watchers -= 1

    @_admin_stream
    async def ExportFeedback(self, request, context):
        limit = request.limit or DEFAULT_EXPORT
        if limit > MAX_EXPORT:
            raise ValueError(f"limit is {limit}; at most {MAX_EXPORT} per call (page with after)")
        if request.after and not STREAM_ID.fullmatch(request.after):
            raise ValueError("after is a feedback stream entry id, e.g. 1767225600000-0")
        redis, keys = self.registry.redis, self.registry.keys
        start, sent = (f"({request.after}" if request.after else "-"), 0
        while sent < limit:
            entries = await redis.xrange(
                keys.feedback_stream, min=start, max="+", count=min(EXPORT_PAGE, limit - sent)
            )
            if not entries:
                return
            records = [records_pb2.FeedbackRecord.FromString(f[DATA_FIELD]) for _, f in entries]
            async with redis.pipeline(transaction=False) as pipe:
                for record in records:
                    pipe.get(keys.prompt(record.feedback.prompt_id))
                prompts = await pipe.execute()
            for (entry_id, _), record, prompt in zip(entries, records, prompts, strict=True):
                versions = {}
                if prompt is not None:
                    versions = {
                        s.sample_id: s.version
                        for s in records_pb2.PromptRecord.FromString(prompt).samples
                    }
                yield admin_pb2.FeedbackExport(
                    entry_id=entry_id.decode(), record=record, sample_versions=versions
                )
            sent += len(entries)
            start = f"({entries[-1][0].decode()}"

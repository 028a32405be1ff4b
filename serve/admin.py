"""The Admin gRPC service (operators) and the credential check that guards it.

Every Admin call needs `authorization: Bearer <token>` in its metadata: none gives
UNAUTHENTICATED, a wrong one PERMISSION_DENIED. The caller may name itself with
`x-instructloop-actor`; the name goes to the audit stream with every change.
"""

from __future__ import annotations

import functools
import hmac
import logging

import grpc
from redis.exceptions import RedisError

from instructloop.registry import (
    Frozen,
    NothingToRollBackTo,
    Registry,
    RegistryError,
    UnknownVersion,
)
from instructloop.store import ModelStore, VersionError
from instructloop.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)
ADMIN_PREFIX = "/instructloop.v1.Admin/"
ACTOR_HEADER = "x-instructloop-actor"
MISSING_CREDENTIAL = (
    "admin call without credential: send 'authorization: Bearer <admin token>' "
    "(the CLI: instructloop models --admin-token, or $INSTRUCTLOOP_ADMIN_TOKEN)"
)


class AdminAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses Admin calls without the right bearer token; other services pass through."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        if not details.method.startswith(ADMIN_PREFIX):
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        given = metadata.get("authorization")
        if not given:
            return _deny(grpc.StatusCode.UNAUTHENTICATED, MISSING_CREDENTIAL)
        if not hmac.compare_digest(given.encode(), self._expected):
            log.warning("admin call with a wrong credential", extra={"method": details.method})
            return _deny(grpc.StatusCode.PERMISSION_DENIED, "the admin credential is not valid")
        return await continuation(details)


def _deny(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def abort(request, context):
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(abort)


_STATUS = {
    UnknownVersion: grpc.StatusCode.NOT_FOUND,
    NothingToRollBackTo: grpc.StatusCode.FAILED_PRECONDITION,
    Frozen: grpc.StatusCode.FAILED_PRECONDITION,
    VersionError: grpc.StatusCode.FAILED_PRECONDITION,
    RegistryError: grpc.StatusCode.FAILED_PRECONDITION,
    ValueError: grpc.StatusCode.INVALID_ARGUMENT,
}


# Longest version id, reason or actor an Admin request may carry; longer is refused before
# any work, and error messages never echo more than this.
MAX_ADMIN_FIELD_CHARS = 1024


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


def _actor(context) -> str:
    metadata = dict(context.invocation_metadata() or ())
    return metadata.get(ACTOR_HEADER, "admin")[:128]


def _admin_call(method):
    """Checks the request's sizes, runs the call, maps its failure to one status (_fail)."""

    @functools.wraps(method)
    async def call(self, request, context):
        await _check_sizes(request, context)
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await _fail(context, e)

    return call


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, registry: Registry, store: ModelStore):
        self.registry = registry
        self.store = store

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

"""The Admin gRPC service (operators) and the credential check that guards it.

Every Admin call needs `authorization: Bearer <token>` in its metadata: none gives
UNAUTHENTICATED, a wrong one PERMISSION_DENIED. The caller may name itself with
`x-instructloop-actor`; the name goes to the audit stream with every change.
"""

from __future__ import annotations

import hmac
import logging

import grpc

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
    ValueError: grpc.StatusCode.INVALID_ARGUMENT,
}


async def _fail(context, e: Exception) -> None:
    for kind, code in _STATUS.items():
        if isinstance(e, kind):
            await context.abort(code, str(e))
    log.exception("admin call failed")
    await context.abort(grpc.StatusCode.UNAVAILABLE, f"registry unavailable: {e}")


def _actor(context) -> str:
    metadata = dict(context.invocation_metadata() or ())
    return metadata.get(ACTOR_HEADER, "admin")[:128]


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, registry: Registry, store: ModelStore):
        self.registry = registry
        self.store = store

    async def ListVersions(self, request, context):
        try:
            canary = await self.registry.canary_state()
            return admin_pb2.ListVersionsResponse(
                versions=await self.registry.list(),
                aliases=await self.registry.aliases(),
                freeze=await self.registry.freeze_state(),
                replicas=await self.registry.replicas(),
                canary_share=canary.share,
                canary=canary,
            )
        except Exception as e:
            await _fail(context, e)

    async def GetVersion(self, request, context):
        try:
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
        except Exception as e:
            await _fail(context, e)

    async def Promote(self, request, context):
        try:
            change = await self.registry.promote(request.version, _actor(context), request.reason)
        except Exception as e:
            await _fail(context, e)
        log.info("promote", extra={"from": change.from_version, "to": change.to_version,
                                   "actor": change.actor})  # fmt: skip
        return change

    async def Rollback(self, request, context):
        try:
            change = await self.registry.rollback(_actor(context), request.version, request.reason)
        except Exception as e:
            await _fail(context, e)
        log.info("rollback", extra={"from": change.from_version, "to": change.to_version,
                                    "actor": change.actor})  # fmt: skip
        return change

    async def Freeze(self, request, context):
        try:
            return await self.registry.freeze(_actor(context), request.reason)
        except Exception as e:
            await _fail(context, e)

    async def Unfreeze(self, request, context):
        try:
            return await self.registry.unfreeze(_actor(context), request.reason)
        except Exception as e:
            await _fail(context, e)

    async def SetCanary(self, request, context):
        try:
            if request.version:
                info = await self.registry.get(request.version)
                if info.kind != "lora":
                    raise RegistryError(
                        f"{request.version} is a {info.kind} version; a canary must be a LoRA "
                        "adapter so replicas can serve it beside current"
                    )
            return await self.registry.set_canary(
                _actor(context), request.version, request.share, request.reason,
                promote_at=request.promote_at, rollback_at=request.rollback_at,
                min_comparisons=request.min_comparisons,
            )  # fmt: skip
        except RegistryError as e:
            if isinstance(e, UnknownVersion):
                await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except Exception as e:
            await _fail(context, e)

"""The operations dashboard: versions, aliases, gate and key metrics, lineage, canary,
replicas, the audit timeline with "restore this version", the actions (promote, rollback,
freeze, canary: each with a reason, confirmed in the page), live updates from the
registry's events, and the feedback export."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import grpc.aio
from google.protobuf.json_format import MessageToDict
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from instructloop.clients.admin import KEY_METRICS
from instructloop.clients.export import export_line
from instructloop.v1 import admin_pb2

from . import render
from .guard import (
    ADMIN,
    Web,
    fields_of,
    guarded,
    number_field,
    rpc_error,
    text_field,
    web_of,
)
from .sessions import Session

AUDIT_ROWS = 50


async def _dashboard_context(web: Web, session: Session) -> dict:
    versions, audit = await asyncio.gather(
        web.backend.list_versions(session), web.backend.list_audit(session, AUDIT_ROWS)
    )
    known = {v.id for v in versions.versions}
    current = versions.aliases.get("current", "")
    audit_rows = [
        {
            "at": render.when(a.at),
            "actor": a.actor,
            "action": a.action,
            "alias": a.alias,
            "from": a.from_version,
            "to": a.to_version,
            "reason": a.reason,
            "restore": a.to_version if a.to_version in known and a.to_version != current else "",
        }
        for a in audit.records
    ]
    replicas = [
        {
            "id": r.replica_id,
            "version": r.version,
            "mode": r.mode,
            "seen": render.when(r.seen),
            "error": r.last_swap_error,
        }
        for r in versions.replicas
    ]
    return {
        "versions": render.version_rows(versions),
        "aliases": dict(versions.aliases),
        "freeze": versions.freeze,
        "freeze_since": render.when(versions.freeze.since),
        "canary": versions.canary,
        "replicas": replicas,
        "audit": audit_rows,
        "chart": render.chart(versions.versions),
        "lora": [v.id for v in versions.versions if v.kind == "lora"],
        "metric_labels": [label for label, _ in KEY_METRICS],
    }


@guarded(ADMIN, page=True)
async def dashboard(request: Request, session: Session) -> Response:
    web = web_of(request)
    return web.page(request, "dashboard.html", session, **await _dashboard_context(web, session))


@guarded(ADMIN)
async def dashboard_body(request: Request, session: Session) -> Response:
    web = web_of(request)
    context = await _dashboard_context(web, session)
    return web.page(request, "_dashboard_body.html", session, **context)


def _change(message) -> JSONResponse:
    return JSONResponse(MessageToDict(message, preserving_proto_field_name=True))


@guarded(ADMIN, csrf=True)
async def promote(request: Request, session: Session) -> Response:
    f = await fields_of(request)
    version, reason = (
        text_field(f, "version", required=True),
        text_field(f, "reason", required=True),
    )
    return _change(await web_of(request).backend.promote(session, version, reason))


@guarded(ADMIN, csrf=True)
async def rollback(request: Request, session: Session) -> Response:
    f = await fields_of(request)
    version, reason = text_field(f, "version"), text_field(f, "reason", required=True)
    return _change(await web_of(request).backend.rollback(session, version, reason))


@guarded(ADMIN, csrf=True)
async def freeze(request: Request, session: Session) -> Response:
    reason = text_field(await fields_of(request), "reason", required=True)
    frozen = request.url.path.endswith("/freeze")
    return _change(await web_of(request).backend.freeze(session, frozen, reason))


@guarded(ADMIN, csrf=True)
async def canary(request: Request, session: Session) -> Response:
    f = await fields_of(request)
    req = admin_pb2.SetCanaryRequest(
        version=text_field(f, "version"),
        share=number_field(f, "share", 0.1),
        reason=text_field(f, "reason", required=True),
        promote_at=number_field(f, "promote_at", 0.0),
        rollback_at=number_field(f, "rollback_at", 0.0),
        min_comparisons=int(number_field(f, "min_comparisons", 50, int)),
        min_users=int(number_field(f, "min_users", 0, int)),
    )
    return _change(await web_of(request).backend.set_canary(session, req))


@guarded(ADMIN)
async def events(request: Request, session: Session) -> Response:
    """The registry's events as server-sent events (one gRPC WatchEvents per page)."""
    call = web_of(request).backend.watch_events(session)

    async def stream():
        try:
            async for event in call:
                data = {"action": event.action, "alias": event.alias, "version": event.version}
                yield {"event": "registry", "data": json.dumps(data)}
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                yield {"event": "failed", "data": json.dumps({"error": e.details()})}
        finally:
            call.cancel()

    return EventSourceResponse(stream(), ping=15)


@guarded(ADMIN)
async def export(request: Request, session: Session) -> Response:
    """Raw feedback as JSON lines (instructloop.clients.export), streamed as it is read."""
    web = web_of(request)
    after = request.query_params.get("after", "")
    limit = int(number_field(dict(request.query_params), "limit", web.cfg.export_limit, int))
    call = web.backend.export_feedback(session, after, min(limit, web.cfg.export_limit))
    try:  # the first message (or error) decides the status; the rest streams
        first = await call.read()
    except grpc.aio.AioRpcError as e:
        return rpc_error(web, session, e)

    async def lines():
        item = first
        try:
            while item is not grpc.aio.EOF:
                yield json.dumps(export_line(item), ensure_ascii=False) + "\n"
                item = await call.read()
        finally:
            call.cancel()

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    headers = {"content-disposition": f'attachment; filename="feedback-{stamp}.jsonl"'}
    return StreamingResponse(lines(), media_type="application/x-ndjson", headers=headers)

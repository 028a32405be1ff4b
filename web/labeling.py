"""The playground (ask, watch the K samples stream in, rank them) and the labeler page
(take a queued task, rank it by keyboard or drag, skip or say it cannot be ranked, flag a
sample, write a demonstration).

A flagged sample is stored as part of the judgement: with a flag, the tiers go to the
server as a Rating instead of a Ranking, flagged samples at the lowest score of the
server's scale and the tiers spread over the scores above it (render.rating_scores), so
the learner still reads the same order (a rating is a ranking by score) and an operator
finds the flags in the export (score == rating_min)."""

from __future__ import annotations

import json

import grpc
import grpc.aio
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from instructloop.clients import wire

from . import render
from .guard import (
    HTTP_STATUS,
    JUDGES,
    MAX_TEXT,
    BadRequest,
    Web,
    fields_of,
    guarded,
    number_field,
    text_field,
    web_of,
)
from .sessions import Session

# ---- playground ---------------------------------------------------------------------------


@guarded(page=True)
async def playground(request: Request, session: Session) -> Response:
    return web_of(request).page(request, "playground.html", session)


@guarded(csrf=True)
async def generate(request: Request, session: Session) -> Response:
    """GenerateStream as server-sent events: `delta` {i, t} as the engine writes, then one
    `final` with ids, versions and each sample's text rendered as sanitised markdown."""
    f = await fields_of(request)
    prompt = text_field(f, "prompt", required=True, limit=MAX_TEXT)
    n = int(number_field(f, "n", 4, int))
    max_tokens = int(number_field(f, "max_tokens", 64, int))
    temperature = number_field(f, "temperature", 1.0)
    call = web_of(request).backend.generate_stream(session, prompt, n, max_tokens, temperature)

    async def stream():
        texts: dict[int, list[str]] = {}
        try:
            async for chunk in call:
                if not chunk.HasField("final"):
                    for d in wire.stream_deltas(chunk):
                        texts.setdefault(d.index, []).append(d.text)
                        yield {"event": "delta", "data": json.dumps({"i": d.index, "t": d.text})}
                    continue
                final = chunk.final
                samples = []
                for s in final.samples:
                    text = "".join(texts.get(s.index, []))
                    samples.append(
                        {
                            "id": s.sample_id,
                            "index": s.index,
                            "version": s.version,
                            "tokens": s.token_count,
                            "text": text,
                            "html": str(render.markdown(text)),
                        }
                    )
                data = {
                    "prompt_id": final.prompt_id,
                    "version": final.version,
                    "logged": final.logged,
                    "prompt_html": str(render.markdown(prompt)),
                    "samples": samples,
                }
                yield {"event": "final", "data": json.dumps(data)}
        except grpc.aio.AioRpcError as e:
            data = {
                "status": HTTP_STATUS.get(e.code(), 502),
                "error": f"{e.code().name}: {e.details()}",
            }
            yield {"event": "failed", "data": json.dumps(data)}
        finally:
            call.cancel()

    return EventSourceResponse(stream(), ping=15)


# ---- labeling ----------------------------------------------------------------------------


def _progress(web: Web, session: Session) -> dict:
    return {
        "judged": session.judged,
        "skipped": session.skipped,
        "today": web.today(session.user_id),
        "quota": web.cfg.daily_quota,
    }


@guarded(*JUDGES, page=True)
async def label(request: Request, session: Session) -> Response:
    web = web_of(request)
    who = await web.backend.whoami(session.token)
    return web.page(request, "label.html", session, who=who, progress=_progress(web, session))


def _task_json(web: Web, session: Session, task) -> dict:
    prompt = task.prompt
    if task.HasField("chat") and task.chat.messages:
        prompt = "\n\n".join(f"**{m.role}:** {m.content}" for m in task.chat.messages)
    return {
        "task_id": task.task_id,
        "prompt_id": task.prompt_id,
        "prompt_html": str(render.markdown(prompt)),
        "samples": [
            {
                "id": s.sample_id,
                "index": s.index,
                "version": s.version,
                "text": s.text,
                "html": str(render.markdown(s.text)),
            }
            for s in task.samples
        ],
        "lease_expires": task.lease_expires.seconds,
        "queue_waiting": task.queue_waiting,
        "queue_leased": task.queue_leased,
        "progress": _progress(web, session),
    }


@guarded(*JUDGES, csrf=True)
async def next_task(request: Request, session: Session) -> Response:
    web = web_of(request)
    task = await web.backend.next_task(session)
    session.task = task.task_id
    return JSONResponse(_task_json(web, session, task))


@guarded(*JUDGES, csrf=True)
async def skip_task(request: Request, session: Session) -> Response:
    web = web_of(request)
    f = await fields_of(request)
    cannot_rank = bool(f.get("cannot_rank"))
    reason = text_field(f, "reason", required=cannot_rank)
    reply = await web.backend.skip_task(
        session, text_field(f, "task_id", required=True), reason, cannot_rank
    )
    session.skipped += 1
    session.task = None
    return JSONResponse(
        {
            "dropped": reply.dropped,
            "queue_waiting": reply.queue_waiting,
            "progress": _progress(web, session),
        }
    )


def _tiers(value) -> list[list[str]]:
    if not isinstance(value, list) or not all(
        isinstance(t, list) and t and all(isinstance(s, str) for s in t) for t in value
    ):
        raise BadRequest("tiers must be a list of non-empty lists of sample ids, best first")
    return value


@guarded(*JUDGES, csrf=True)
async def feedback(request: Request, session: Session) -> Response:
    """One judgement from the labeler page or the playground: the tiers as a Ranking, or,
    with flagged samples, as a Rating whose lowest score marks the flags (render.
    rating_scores); then the demonstration, if one was written."""
    web = web_of(request)
    f = await fields_of(request)
    prompt_id = text_field(f, "prompt_id", required=True)
    tiers = _tiers(f.get("tiers") or [])
    flagged = f.get("flagged") or []
    if not isinstance(flagged, list) or not all(isinstance(s, str) for s in flagged):
        raise BadRequest("flagged must be a list of sample ids")
    demo = text_field(f, "demonstration", limit=MAX_TEXT)
    if not tiers and not flagged and not demo:
        raise BadRequest("rank the samples, flag one, or write a demonstration")
    out: dict = {}
    if flagged:
        limits = (await web.backend.get_model(session)).limits
        scores = render.rating_scores(tiers, flagged, limits.rating_min, limits.rating_max)
        out["feedback_id"] = (await web.backend.rate(session, prompt_id, scores)).feedback_id
        out["kind"] = "rating"
    elif tiers:
        out["feedback_id"] = (await web.backend.rank(session, prompt_id, tiers)).feedback_id
        out["kind"] = "ranking"
    if "kind" in out:
        session.judged += 1
        web.count_judgement(session.user_id)
        if f.get("task_id") and f.get("task_id") == session.task:
            session.task = None
    if demo:
        try:
            out["demonstration_id"] = (
                await web.backend.demonstrate(session, prompt_id, demo)
            ).feedback_id
        except grpc.aio.AioRpcError as e:
            if "kind" not in out:
                raise
            out["demonstration_error"] = f"{e.code().name}: {e.details()}"
    out["progress"] = _progress(web, session)
    return JSONResponse(out)

"""The web app's guard and shared plumbing: who may call an endpoint, and how a gRPC error
becomes an HTTP answer.

- no session, or a forged or expired cookie: pages redirect to /signin, every other
  endpoint answers 401;
- a session whose role may not use the endpoint: 403 (operators' endpoints need admin,
  labeling needs labeler or admin);
- a state-changing request (POST) without the session's CSRF token: 403.

Who may do what beyond that is the server's decision (roles, suspension, rate limits): a
gRPC error becomes the matching HTTP status with the server's message (one table,
HTTP_STATUS); UNAUTHENTICATED (a credential revoked since sign-in) also ends the session.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import grpc
import grpc.aio
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.templating import Jinja2Templates

from .backend import Backend
from .config import WebConfig
from .sessions import COOKIE, CSRF_FIELD, CSRF_HEADER, Session, Sessions

HERE = Path(__file__).parent
ADMIN, LABELER, APP = "admin", "labeler", "app"
JUDGES = (LABELER, ADMIN)
HOME = {ADMIN: "/dashboard", LABELER: "/label", APP: "/playground"}
MAX_TEXT = 100_000  # characters of a demonstration or prompt the app forwards

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class BadRequest(Exception):
    """A request the app refuses before calling the server (400, with this message)."""


class Web:
    """The app's state: config, sessions, the gRPC backend, templates, daily counts."""

    def __init__(self, cfg: WebConfig, backend: Backend | None = None):
        self.cfg = cfg
        self.sessions = Sessions(cfg.session_ttl_s, cfg.max_sessions)
        self.backend = backend
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        # Judgements per (user, UTC day) sent through this app: the labeler page's quota
        # progress. Bound: only today's entries are kept.
        self.daily: dict[tuple[str, str], int] = {}

    def count_judgement(self, user_id: str) -> int:
        today = datetime.now(UTC).date().isoformat()
        if any(day != today for _, day in self.daily):
            self.daily = {k: n for k, n in self.daily.items() if k[1] == today}
        key = (user_id, today)
        self.daily[key] = self.daily.get(key, 0) + 1
        return self.daily[key]

    def today(self, user_id: str) -> int:
        return self.daily.get((user_id, datetime.now(UTC).date().isoformat()), 0)

    def page(
        self, request: Request, name: str, session: Session | None, status: int = 200, **context
    ) -> Response:
        return self.templates.TemplateResponse(
            request, name, {"session": session, "cfg": self.cfg, **context}, status_code=status
        )


def web_of(request: Request) -> Web:
    return request.app.state.web


def json_error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def rpc_error(web: Web, session: Session | None, e: grpc.aio.AioRpcError) -> JSONResponse:
    status = HTTP_STATUS.get(e.code(), 502)
    if e.code() == grpc.StatusCode.UNAUTHENTICATED and session is not None:
        web.sessions.end(session)
    headers = {}
    retry = dict(e.trailing_metadata() or ()).get("retry-after")
    if retry:
        headers["retry-after"] = str(max(1, round(float(retry))))
    return json_error(status, f"{e.code().name}: {e.details()}", **headers)


async def fields_of(request: Request) -> dict:
    """The request's fields: a JSON object, or a form."""
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = await request.json()
        except ValueError:
            raise BadRequest("the body is not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body
    return dict(await request.form())


Handler = Callable[[Request, Session], Awaitable[Response]]


def guarded(*roles: str, page: bool = False, csrf: bool = False):
    """The session guard (see the module docstring). roles: who may use the endpoint (none:
    any signed-in user); page: a browser page (redirects to sign-in); csrf: state-changing."""

    def wrap(handler: Handler):
        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            web = web_of(request)
            session = web.sessions.get(request.cookies.get(COOKIE))
            if session is None:
                if page:
                    return RedirectResponse(f"/signin?next={quote(request.url.path)}", 303)
                return json_error(401, "not signed in (or the session ended): sign in again")
            if roles and session.role not in roles:
                message = (
                    f"{session.user_id} has role {session.role}; this needs {' or '.join(roles)}"
                )
                if page:
                    return web.page(request, "error.html", session, 403, message=message)
                return json_error(403, message)
            if csrf:
                presented = request.headers.get(CSRF_HEADER)
                if presented is None:
                    with contextlib.suppress(Exception):
                        presented = (await fields_of(request)).get(CSRF_FIELD)
                if not Sessions.csrf_ok(session, presented):
                    return json_error(403, "missing or wrong CSRF token: reload the page")
            try:
                return await handler(request, session)
            except BadRequest as e:
                return json_error(400, str(e))
            except grpc.aio.AioRpcError as e:
                return rpc_error(web, session, e)

        return endpoint

    return wrap


def text_field(fields: dict, name: str, *, required: bool = False, limit: int = 1024) -> str:
    value = fields.get(name, "")
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be text")
    value = value.strip()
    if required and not value:
        raise BadRequest(f"{name} is required")
    if len(value) > limit:
        raise BadRequest(f"{name} is over {limit} characters")
    return value


def number_field(fields: dict, name: str, default: float, cast=float) -> float:
    value = fields.get(name, "")
    if value in ("", None):
        return default
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name} must be a number") from None

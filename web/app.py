"""The web app: sign-in and sign-out, the routes, security headers, `create_app`.

Every handler is thin: read the request, make gRPC calls with the session's credential
(backend.py), render. The session guard is guard.py; the dashboard's handlers are ops.py,
the playground's and the labeler page's labeling.py.
"""

from __future__ import annotations

import contextlib

import grpc
import grpc.aio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from . import labeling, ops
from .backend import Backend
from .config import WebConfig
from .guard import ADMIN, HERE, HOME, Web, guarded, json_error, web_of
from .sessions import COOKIE, CSRF_FIELD, SIGNIN_COOKIE, Session

# ---- sign-in ------------------------------------------------------------------------------


async def home(request: Request) -> Response:
    session = web_of(request).sessions.get(request.cookies.get(COOKIE))
    return RedirectResponse(HOME.get(session.role, "/playground") if session else "/signin", 303)


def _signin_page(request: Request, error: str = "", status: int = 200) -> Response:
    web = web_of(request)
    nonce, cookie = web.sessions.signin_nonce()
    response = web.page(request, "signin.html", None, status, nonce=nonce, error=error)
    response.set_cookie(
        SIGNIN_COOKIE,
        cookie,
        max_age=900,
        path="/signin",
        httponly=True,
        samesite="strict",
        secure=web.cfg.secure_cookies,
    )
    return response


async def signin_form(request: Request) -> Response:
    return _signin_page(request)


async def signin(request: Request) -> Response:
    web = web_of(request)
    form = await request.form()
    if not web.sessions.signin_ok(request.cookies.get(SIGNIN_COOKIE), form.get(CSRF_FIELD)):
        return _signin_page(request, "The form expired or came from elsewhere: try again.", 403)
    token = str(form.get("token", "")).strip()
    if not token:
        return _signin_page(request, "Paste your credential.", 400)
    try:
        who = await web.backend.whoami(token)
    except grpc.aio.AioRpcError as e:
        if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return _signin_page(request, "That credential is not valid (unknown or revoked).", 401)
        return _signin_page(request, f"The server did not answer: {e.code().name}", 503)
    name = str(form.get("name", "")).strip()[:64]
    actor = (name or "web") if who.user_id == ADMIN else who.user_id
    session = web.sessions.create(token, who.user_id, who.role, actor)
    target = str(form.get("next", ""))
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        target = HOME.get(who.role, "/playground")
    response = RedirectResponse(target, 303)
    response.set_cookie(
        COOKIE,
        web.sessions.cookie(session),
        max_age=int(web.cfg.session_ttl_s),
        path="/",
        httponly=True,
        samesite="strict",
        secure=web.cfg.secure_cookies,
    )
    response.delete_cookie(SIGNIN_COOKIE, path="/signin")
    return response


@guarded(csrf=True)
async def signout(request: Request, session: Session) -> Response:
    web_of(request).sessions.end(session)
    response = RedirectResponse("/signin", 303)
    response.delete_cookie(COOKIE, path="/")
    return response


# ---- the app ------------------------------------------------------------------------------

# Every response: scripts and styles only from this app's own files (no inline script can
# run, so even a rendering bug cannot execute a model's output), no framing, no referrer.
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; "
        b"img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
        b"frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class SecurityHeaders:
    """Pure ASGI middleware (it leaves streaming responses streaming)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def not_found(request: Request, exc) -> Response:
    return json_error(404, "no such page")


def create_app(cfg: WebConfig, backend: Backend | None = None) -> Starlette:
    """The ASGI app. The gRPC channel opens on startup (it belongs to the serving loop)."""
    web = Web(cfg, backend)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        own = web.backend is None
        if own:
            web.backend = Backend(cfg.target, cfg.tls_ca)
        try:
            yield
        finally:
            if own:
                await web.backend.close()

    routes = [
        Route("/", home),
        Route("/signin", signin_form, methods=["GET"]),
        Route("/signin", signin, methods=["POST"]),
        Route("/signout", signout, methods=["POST"]),
        Route("/dashboard", ops.dashboard),
        Route("/dashboard/body", ops.dashboard_body),
        Route("/export.jsonl", ops.export),
        Route("/playground", labeling.playground),
        Route("/label", labeling.label),
        Route("/api/events", ops.events),
        Route("/api/promote", ops.promote, methods=["POST"]),
        Route("/api/rollback", ops.rollback, methods=["POST"]),
        Route("/api/freeze", ops.freeze, methods=["POST"]),
        Route("/api/unfreeze", ops.freeze, methods=["POST"]),
        Route("/api/canary", ops.canary, methods=["POST"]),
        Route("/api/generate", labeling.generate, methods=["POST"]),
        Route("/api/feedback", labeling.feedback, methods=["POST"]),
        Route("/api/task/next", labeling.next_task, methods=["POST"]),
        Route("/api/task/skip", labeling.skip_task, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={404: not_found},
        middleware=[Middleware(SecurityHeaders)],
    )
    app.state.web = web
    return app

"""The web app end to end: a real authenticated server (vLLM on CPU), real Redis, the real
app on uvicorn (in a thread, on an ephemeral port) and real chromium through Playwright.

One server, one web app and one browser for the module. Screenshots of the dashboard and
the labeler page go to $INSTRUCTLOOP_SCREENSHOTS when it is set (docs/ for the README:
`INSTRUCTLOOP_SCREENSHOTS=docs python -m pytest tests/test_web.py`), else to a temporary
directory, so a test run leaves the tree as it was.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.cookiejar import CookieJar
from pathlib import Path

import grpc
import playwright.sync_api as playwright_api
import pytest
import redis as sync_redis
import redis.asyncio as aioredis
import uvicorn
from conftest import start_servers, stop_server

from instructloop.clients import Client
from instructloop.clients.admin import AdminClient
from instructloop.keys import DATA_FIELD, Keys
from instructloop.redis_embedded import free_port
from instructloop.registry import Registry, load_registry_key, publish_version
from instructloop.store import ModelStore
from instructloop.v1 import api_pb2, records_pb2
from instructloop.variants import full_variant
from instructloop.web.app import create_app
from instructloop.web.config import WebConfig

# Debian's chromium (`apt-get install chromium`, as .ci/run does); a missing browser fails
# these tests, it never skips them.
CHROMIUM = Path("/usr/bin/chromium")

PREFIX = "web"
SHOTS = Path(os.environ.get("INSTRUCTLOOP_SCREENSHOTS") or tempfile.mkdtemp(prefix="web-shots-"))
VIEWPORT = {"width": 1000, "height": 700}
# Metrics of the two published versions, as a learner round would write them.
METRICS = {
    "v1": {"win_rate": 0.58, "rm_heldout_accuracy": 0.66, "kl": 2.4},
    "v2": {"win_rate": 0.63, "rm_heldout_accuracy": 0.71, "kl": 3.1},
}


@dataclass
class Stack:
    server: object
    url: str
    admin_token: str
    redis_url: str

    def admin(self, actor: str = "tester") -> AdminClient:
        return AdminClient(self.server.target, token=self.admin_token, actor=actor)

    def wait_serving(self, version: str, timeout: float = 60.0) -> None:
        with Client(self.server.target, token=self.admin_token) as client:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if client.get_model().version == version:
                    return
                time.sleep(0.1)
            raise AssertionError(f"the server does not serve {version}: {client.get_model()}")

    def feedback(self) -> list[records_pb2.FeedbackRecord]:
        db = sync_redis.Redis.from_url(self.redis_url)
        entries = db.xrange(Keys(PREFIX).feedback_stream)
        return [records_pb2.FeedbackRecord.FromString(f[DATA_FIELD]) for _, f in entries]


def _publish(redis_url: str, key: bytes, store: ModelStore, src: Path, metrics: dict) -> str:
    async def go():
        client = aioredis.Redis.from_url(redis_url)
        try:
            info = await publish_version(
                Registry(client, Keys(PREFIX), key),
                store,
                str(src),
                kind="full",
                parent="v0",
                base_model=str(src),
                feedback_ids=["f-web-test"],
                metrics=metrics,
                gate={"passed": True, "reason": "test", "win_rate": metrics["win_rate"]},
                actor="tester",
            )
            return info.id
        finally:
            await client.aclose()

    return asyncio.run(go())


@pytest.fixture(scope="module")
def stack(tiny_model, redis_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("web")
    store = ModelStore(work / "store")
    key_file = work / "registry-key"
    key = load_registry_key(key_file)
    (server,) = start_servers(
        tiny_model, redis_server.url, [work / "server"], PREFIX,
        "--no-open", "--auth-cache-s", "0", "--model-store", str(store.root),
        "--registry-key-file", str(key_file), "--poll-interval-s", "1",
        "--queue-share", "1",
    )  # fmt: skip
    admin_token = (work / "server" / "admin-token").read_text().strip()
    port = free_port()
    cfg = WebConfig(target=server.target, host="127.0.0.1", port=port, log_level="warning")
    web = uvicorn.Server(
        uvicorn.Config(
            create_app(cfg),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=2,
        )  # fmt: skip
    )
    thread = threading.Thread(target=web.run, name="web", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not web.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert web.started, "the web app did not start"
    s = Stack(server, f"http://127.0.0.1:{port}", admin_token, redis_server.url)
    variants = work / "variants"
    for name, seed in (("v1", 1), ("v2", 2)):
        src = full_variant(tiny_model, variants / name, seed=seed)
        assert _publish(redis_server.url, key, store, src, METRICS[name]) == name
        with s.admin() as admin:
            admin.promote(name, reason=f"test: serve {name}")
        s.wait_serving(name)
    yield s
    web.should_exit = True
    thread.join(timeout=15)
    assert stop_server(server) == 0, server.log_tail()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"no {CHROMIUM}: install Debian's chromium (apt-get install chromium)")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


def _page(browser):
    context = browser.new_context(viewport=VIEWPORT)
    return context, context.new_page()


def sign_in(page, stack: Stack, token: str, name: str = "") -> None:
    page.goto(stack.url + "/signin")
    page.fill("#token", token)
    if name:
        page.fill("#name", name)
    page.click("#signin")
    page.wait_for_load_state("networkidle")


def screenshot(page, name: str) -> None:
    """A small PNG for the README: the viewport, quantized to a palette."""
    from io import BytesIO

    from PIL import Image

    SHOTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")
    png = Image.open(BytesIO(page.screenshot(full_page=False))).convert("RGB")
    png.quantize(colors=96, method=Image.Quantize.MEDIANCUT).save(SHOTS / name, optimize=True)


# ---- plain HTTP, as a script (or another site) would send it -------------------------------


class Http:
    """A cookie-keeping HTTP client that never follows redirects."""

    def __init__(self, base: str):
        self.base = base
        self.jar = CookieJar()

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):
                return None

        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.jar), NoRedirect()
        )

    def call(self, method: str, path: str, data: dict | None = None, headers=None, as_json=False):
        body = None
        headers = dict(headers or {})
        if data is not None:
            if as_json:
                body, headers["content-type"] = json.dumps(data).encode(), "application/json"
            else:
                body = urllib.parse.urlencode(data).encode()
                headers["content-type"] = "application/x-www-form-urlencoded"
        request = urllib.request.Request(self.base + path, body, headers, method=method)
        try:
            with self.opener.open(request, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def sign_in(self, token: str, name: str = "") -> None:
        status, html = self.call("GET", "/signin")
        nonce = re.search(r'name="csrf" value="([^"]+)"', html).group(1)
        status, _ = self.call("POST", "/signin", {"csrf": nonce, "token": token, "name": name})
        assert status == 303, status

    def csrf(self, path: str = "/playground") -> str:
        _, html = self.call("GET", path)
        return re.search(r'<meta name="csrf-token" content="([^"]+)"', html).group(1)


ACTIONS = [
    ("GET", "/dashboard/body", None),
    ("GET", "/api/events", None),
    ("GET", "/export.jsonl", None),
    ("POST", "/api/promote", {"version": "v1", "reason": "forged"}),
    ("POST", "/api/rollback", {"reason": "forged"}),
    ("POST", "/api/freeze", {"reason": "forged"}),
    ("POST", "/api/unfreeze", {"reason": "forged"}),
    ("POST", "/api/canary", {"version": "", "reason": "forged"}),
]


def _labeler(stack: Stack, user: str) -> str:
    with stack.admin() as admin:
        return admin.add_user(user, "labeler").token


# ---- the tests ---------------------------------------------------------------------------


def test_admin_read_calls(stack):
    """The Admin calls the dashboard reads: WhoAmI for any credential, ListAudit, and
    WatchEvents, which says when it listens and then streams a promote."""
    token = _labeler(stack, "wanda")
    with AdminClient(stack.server.target, token=token) as as_labeler:
        who = as_labeler.whoami()
        assert (who.user_id, who.role) == ("wanda", "labeler")
        with pytest.raises(grpc.RpcError) as err:
            as_labeler.list_audit()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with (
        AdminClient(stack.server.target, token="il_forged") as forged,
        pytest.raises(grpc.RpcError) as err,
    ):
        forged.whoami()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with stack.admin() as admin:
        assert admin.whoami().role == "admin"
        audit = admin.list_audit(5)
        assert audit[0].action == "promote" and audit[0].to_version == "v2"
        events = admin.watch_events()
        try:
            assert next(events).action == "watching"
            admin.freeze("watch test")
            event = next(events)
            assert (event.action, event.version) == ("freeze", "")
            admin.unfreeze("watch test done")
            assert next(events).action == "unfreeze"
        finally:
            events.cancel()


def test_operator_rolls_back_from_the_dashboard(stack, browser, tmp_path):
    context, page = _page(browser)
    sign_in(page, stack, stack.admin_token, name="ops-olga")
    assert page.url.endswith("/dashboard")
    page.wait_for_selector("#live.on", timeout=15_000)  # the registry's events are live
    assert page.inner_text("#alias-current") == "v2"
    assert "0.710" in page.inner_text("#versions")  # v2's RM accuracy
    screenshot(page, "dashboard.png")

    page.click("#rollback")
    page.wait_for_selector("#confirm[open]")
    page.fill("#confirm-reason", "v2 answers in upper case: back to v1")
    page.click("#confirm-ok")
    stack.wait_serving("v1")  # every replica follows current
    row = page.locator("#audit .audit-row").filter(has_text="back to v1").first
    row.wait_for(timeout=15_000)
    text = row.inner_text()
    assert "ops-olga" in text and "rollback" in text and "v2 → v1" in text, text
    assert page.inner_text("#alias-current") == "v1"

    # An event from elsewhere reaches the page without a reload (events, not the 10 s poll).
    with stack.admin("cli-carl") as admin:
        admin.freeze("incident 7")
    page.wait_for_selector("#freeze-state .bad", timeout=5_000)
    assert "cli-carl" in page.inner_text("#freeze-state")
    with stack.admin("cli-carl") as admin:
        admin.unfreeze("incident 7 over")

    # "Restore this version" on an audit row, and the readable CLI.
    page.locator("#audit button", has_text="Restore v2").first.click()
    page.fill("#confirm-reason", "restore v2 for the CLI check")
    page.click("#confirm-ok")
    stack.wait_serving("v2")
    listed = subprocess.run(
        [sys.executable, "-m", "instructloop.cli", "models", "list", "--target",
         stack.server.target, f"--admin-token={stack.admin_token}"],
        capture_output=True, text=True, timeout=60, env={"COLUMNS": "160", "PATH": ""},
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    for header in ("RM acc", "gate win", "KL", "feedback"):
        assert header in listed.stdout, listed.stdout
    assert re.search(r"v2 .*0\.710 .*0\.630 .*3\.100", listed.stdout), listed.stdout
    context.close()


def test_signed_out_bad_session_and_forged_csrf_are_refused(stack, browser):
    before = stack.admin().list_versions().aliases["current"]
    anonymous = Http(stack.url)
    for method, path, data in ACTIONS:
        status, _ = anonymous.call(method, path, data)
        assert status == 401, (method, path, status)
    status, _ = anonymous.call("GET", "/dashboard")
    assert status == 303  # pages send a signed-out browser to the sign-in page

    forged = Http(stack.url)
    forged.opener.addheaders = [("Cookie", "il_session=made-up.0123456789abcdef")]
    for method, path, data in ACTIONS:
        status, _ = forged.call(method, path, data)
        assert status == 401, (method, path, status)

    labeler = Http(stack.url)
    labeler.sign_in(_labeler(stack, "lars"))
    csrf = labeler.csrf()
    for method, path, data in ACTIONS:
        status, _ = labeler.call(method, path, data, headers={"x-csrf-token": csrf})
        assert status == 403, (method, path, status)

    operator = Http(stack.url)
    operator.sign_in(stack.admin_token, name="ops-mallory-target")
    for token in (None, "wrong", labeler.csrf()):  # none, made up, another session's
        form = {"reason": "forged form", **({"csrf": token} if token else {})}
        status, body = operator.call("POST", "/api/rollback", form)
        assert status == 403 and "CSRF" in body, (token, status, body)
    status, body = operator.call("POST", "/api/rollback", {"reason": "x"}, {"x-csrf-token": "no"})
    assert status == 403

    # A page on another site posting a form to the app: SameSite=Strict keeps the session
    # cookie off the request, so it arrives signed out.
    context, page = _page(browser)
    sign_in(page, stack, stack.admin_token, name="ops-victim")
    page.goto("about:blank")
    page.set_content(
        f'<form id="f" method="post" action="{stack.url}/api/rollback">'
        '<input name="reason" value="csrf attack"></form>'
    )
    with page.expect_response(f"{stack.url}/api/rollback") as response:
        page.evaluate("document.getElementById('f').submit()")
    assert response.value.status == 401
    context.close()

    assert stack.admin().list_versions().aliases["current"] == before
    audit = stack.admin().list_audit(20)
    assert not [a for a in audit if "forged" in a.reason or "attack" in a.reason]


def test_labeler_ranks_with_the_keyboard(stack, browser):
    """A labeler takes a queued task and ranks it with the keyboard only, ties included;
    the feedback stream stores exactly those tiers, and the demonstration typed in the page
    (digits and shortcut letters in it move nothing). Then "cannot rank" with a reason."""
    with Client(stack.server.target, token=_labeler(stack, "asker")) as asker:
        asked = asker.generate("sort: d b a c", n=4, max_tokens=8, temperature=1.0)
        flagged = asker.generate("uppercase: flag", n=3, max_tokens=8, temperature=1.0)
        other = asker.generate(
            "**bold** <img src=x onerror=alert(1)> <script>alert(2)</script>",
            n=2, max_tokens=8, temperature=1.0,
        )  # fmt: skip
    a, b, c, d = (s.sample_id for s in sorted(asked.samples, key=lambda s: s.index))
    context, page = _page(browser)
    sign_in(page, stack, _labeler(stack, "lena"))
    assert page.url.endswith("/label")
    page.wait_for_selector("#task:not([hidden]) .card:focus")
    assert page.get_attribute("#task", "data-prompt-id") == asked.prompt_id  # oldest first
    for key in ("1", "2", "2", "3"):  # A best; B and C tied; D last (each moves on to the next)
        page.keyboard.press(key)
    page.keyboard.press("k")  # focus C
    page.keyboard.press("n")  # C alone in a new tier below B ...
    assert page.locator("#tiers .tier").count() == 4
    page.keyboard.press("m")  # ... and back: merged with B's tier, a tie again
    assert page.locator("#tiers .tier").count() == 3
    page.keyboard.press("d")
    page.keyboard.type("a b c d\n1 2 n m")
    page.keyboard.press("Escape")
    assert page.locator("#tiers .tier").count() == 3 and page.locator("#pool").is_hidden()
    screenshot(page, "labeler.png")
    page.keyboard.press("Enter")
    # (the app's CSP forbids eval, so the test waits on selectors, not on JS predicates)
    page.wait_for_selector(f'#task[data-prompt-id="{flagged.prompt_id}"]')
    mine = [f for f in stack.feedback() if f.feedback.user_id == "lena"]
    rankings = [f.feedback for f in mine if f.feedback.WhichOneof("kind") == "ranking"]
    demos = [f.feedback for f in mine if f.feedback.WhichOneof("kind") == "demonstration"]
    assert len(rankings) == 1 and rankings[0].prompt_id == asked.prompt_id
    assert [list(t.sample_ids) for t in rankings[0].ranking.tiers] == [[a], [b, c], [d]]
    assert len(demos) == 1 and demos[0].demonstration.text == "a b c d\n1 2 n m"
    assert page.inner_text("#p-judged") == "1"

    # The second task: flag sample A (harmful or broken), B best, C second: a Rating whose
    # lowest score marks the flag, the tiers above it.
    fa, fb, fc = (s.sample_id for s in sorted(flagged.samples, key=lambda s: s.index))
    for key in ("f", "j", "1", "2"):  # f: flag A; j: focus B; 1: B best; 2: C next
        page.keyboard.press(key)
    page.keyboard.press("Enter")
    page.wait_for_selector(f'#task[data-prompt-id="{other.prompt_id}"]')
    mine = [f.feedback for f in stack.feedback() if f.feedback.user_id == "lena"]
    (rated,) = [f for f in mine if f.prompt_id == flagged.prompt_id]
    scores = {x.sample_id: x.score for x in rated.rating.scores}
    assert scores[fa] == 1.0 and scores[fb] > scores[fc] > 1.0, scores

    # The third prompt's markup is shown as text: no element a prompt wrote reaches the page.
    assert page.locator("#prompt strong").count() == 1
    assert page.locator("#prompt img, #prompt script").count() == 0
    assert "<img src=x" in page.inner_text("#prompt")
    page.keyboard.press("c")  # the third task: cannot rank, with a reason
    page.wait_for_selector("#skip-dialog[open]")
    page.keyboard.type("both samples are empty")
    page.keyboard.press("Enter")
    page.wait_for_selector("#empty:not([hidden])")
    db = sync_redis.Redis.from_url(stack.redis_url)
    skips = [api_pb2.SkipTaskRequest.FromString(f[DATA_FIELD])
             for _, f in db.xrange(Keys(PREFIX).queue_skips)]  # fmt: skip
    assert [(s.user_id, s.cannot_rank, s.reason) for s in skips] == [
        ("lena", True, "both samples are empty")
    ]
    context.close()


def test_playground_streams_then_ranks(stack, browser):
    context, page = _page(browser)
    sign_in(page, stack, _labeler(stack, "paula"))
    page.goto(stack.url + "/playground")
    page.fill("#prompt-input", "reverse: stream")
    page.select_option("#n", "2")
    page.fill("#max-tokens", "400")
    page.click("#generate")
    page.wait_for_selector("#gen-status:text-is('done')", timeout=120_000)
    stats = page.evaluate("window.playgroundStats")
    assert stats["textSeenBeforeFinal"], stats
    assert stats["readsBeforeFinal"] >= 2, f"the answer came in one piece: {stats}"
    assert stats["firstDeltaAt"] < stats["finalAt"], stats

    # Rank the two samples as a tie: the first by keyboard, the second dragged onto its tier.
    page.wait_for_selector("#rank-area:not([hidden]) .card:focus")
    page.keyboard.press("1")
    page.drag_and_drop("#pool .card", '#tiers .tier[data-tier="0"]')
    assert page.locator("#tiers .tier").count() == 1 and page.locator("#pool").is_hidden()
    page.keyboard.press("Enter")
    page.wait_for_selector("#toast:not([hidden])")
    assert "Stored (ranking" in page.inner_text("#toast")
    mine = [f for f in stack.feedback() if f.feedback.user_id == "paula"]
    assert len(mine) == 1 and len(mine[0].feedback.ranking.tiers) == 1
    assert len(mine[0].feedback.ranking.tiers[0].sample_ids) == 2

    # The same judgement in the dashboard's export and `instructloop export`.
    operator = Http(stack.url)
    operator.sign_in(stack.admin_token, name="ops-exporter")
    status, body = operator.call("GET", "/export.jsonl")
    assert status == 200
    lines = [json.loads(line) for line in body.splitlines()]
    (line,) = [x for x in lines if x["user"] == "paula"]
    assert line["kind"] == "ranking" and len(line["tiers"][0]) == 2
    assert set(line["sample_versions"].values()) == {"v2"} and line["version"] == "v2"
    exported = subprocess.run(
        [sys.executable, "-m", "instructloop.cli", "export", "--target", stack.server.target,
         f"--admin-token={stack.admin_token}", "--after", lines[0]["entry_id"]],
        capture_output=True, text=True, timeout=60, env={"PATH": ""},
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    cli_lines = [json.loads(x) for x in exported.stdout.splitlines()]
    assert cli_lines == lines[1:]  # --after pages on from an entry id
    context.close()

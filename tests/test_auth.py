"""Users authenticate, roles hold, nobody acts as another user, floods are cut off.

One server in its default mode (authentication on), real Redis, real gRPC over loopback.
Credentials are checked on every call (--auth-cache-s 0) so a revocation shows at once;
the rate limits are small so a flood is quick to send.
"""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
import redis
from conftest import start_servers, stop_server

from instructloop.clients import Client
from instructloop.clients.admin import AdminClient
from instructloop.keys import DATA_FIELD, Keys
from instructloop.v1 import records_pb2

PREFIX = "auth"
FEEDBACK_LIMIT = 6  # per user per minute


@pytest.fixture(scope="module")
def auth_server(tiny_model, redis_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("auth")
    (server,) = start_servers(
        tiny_model, redis_server.url, [work / "server"], PREFIX,
        "--no-open", "--auth-cache-s", "0",
        "--rate-limit-feedback", f"{FEEDBACK_LIMIT}/minute", "--rate-limit-samples", "64/minute",
    )  # fmt: skip
    server.admin_token = (work / "server" / "admin-token").read_text().strip()
    yield server
    assert stop_server(server) == 0, server.log_tail()


def _admin(server, **kw) -> AdminClient:
    return AdminClient(server.target, token=kw.pop("token", server.admin_token), **kw)


def _user(server, user_id: str, role: str = "labeler") -> str:
    with _admin(server) as admin:
        return admin.add_user(user_id, role).token


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def _generate(client: Client, n: int = 2):
    return client.generate("reverse: abc\n", n=n, max_tokens=4, temperature=1.0)


def test_no_credential_no_call(auth_server):
    with Client(auth_server.target, token="") as anonymous:
        assert _code(lambda: _generate(anonymous)) == grpc.StatusCode.UNAUTHENTICATED
        code = _code(lambda: anonymous.choose("p-x", "s-a", "s-b", user_id="ann"))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    with Client(auth_server.target, token="il_not-a-token") as forged:
        assert _code(lambda: _generate(forged)) == grpc.StatusCode.UNAUTHENTICATED


def test_the_server_says_who_judged(auth_server, redis_server):
    token = _user(auth_server, "ann")
    _user(auth_server, "bob")
    with Client(auth_server.target, token=token) as ann:
        r = _generate(ann)
        a, b = (s.sample_id for s in r.samples)
        # ann cannot give feedback as bob, nor ask as bob
        assert _code(lambda: ann.choose(r.prompt_id, a, b, user_id="bob")) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        code = _code(lambda: ann.generate("x\n", max_tokens=2, user_id="bob"))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        ann.choose(r.prompt_id, a, b)  # no user id: the server fills in ann
        # naming her own id passes; a second judgement of the prompt is hers, and refused
        code = _code(lambda: ann.choose(r.prompt_id, b, a, user_id="ann"))
        assert code == grpc.StatusCode.ALREADY_EXISTS
    keys = Keys(PREFIX)
    db = redis.Redis.from_url(redis_server.url)
    prompts = [records_pb2.PromptRecord.FromString(f[DATA_FIELD])
               for _, f in db.xrange(keys.prompts_stream)]  # fmt: skip
    assert {p.user_id for p in prompts if p.prompt_id == r.prompt_id} == {"ann"}
    feedback = [records_pb2.FeedbackRecord.FromString(f[DATA_FIELD])
                for _, f in db.xrange(keys.feedback_stream)]  # fmt: skip
    judged = [f.feedback.user_id for f in feedback if f.feedback.prompt_id == r.prompt_id]
    assert judged == ["ann"], "one judgement per user and prompt, stored as ann's"


def test_roles_revocation_and_suspension(auth_server):
    app_token = _user(auth_server, "shop", role="app")
    labeler_token = _user(auth_server, "cat")
    with Client(auth_server.target, token=app_token) as app:
        r = _generate(app)  # an app may generate ...
        a, b = (s.sample_id for s in r.samples)
        code = _code(lambda: app.choose(r.prompt_id, a, b))  # ... but not judge
        assert code == grpc.StatusCode.PERMISSION_DENIED
    with _admin(auth_server) as admin, Client(auth_server.target, token=labeler_token) as cat:
        admin.suspend_user("cat", "inverts rankings")
        r = _generate(cat)  # a suspended user still generates ...
        a, b = (s.sample_id for s in r.samples)
        code = _code(lambda: cat.choose(r.prompt_id, a, b))  # ... but its feedback is refused
        assert code == grpc.StatusCode.PERMISSION_DENIED
        admin.suspend_user("cat", suspend=False)
        cat.choose(r.prompt_id, a, b)
        listed = {u.user_id: u for u in admin.list_users().users}
        assert listed["cat"].role == "labeler" and not listed["cat"].suspended
        admin.revoke_user("cat")
        assert _code(lambda: _generate(cat)) == grpc.StatusCode.UNAUTHENTICATED
        assert admin.list_users().users  # revoked users stay listed
        assert {u.user_id: u.revoked for u in admin.list_users().users}["cat"]


def test_admin_role_and_actor(auth_server, redis_server):
    labeler = _user(auth_server, "dan")
    boss = _user(auth_server, "boss", role="admin")
    with _admin(auth_server, token=labeler) as not_admin:
        assert _code(not_admin.list_users) == grpc.StatusCode.PERMISSION_DENIED
        assert _code(lambda: not_admin.add_user("eve")) == grpc.StatusCode.PERMISSION_DENIED
    # An admin user is its own actor: the header cannot claim another name.
    with _admin(auth_server, token=boss, actor="someone-else") as admin:
        admin.freeze("maintenance")
        admin.unfreeze("done")
        assert _code(lambda: admin.add_user("dan")) == grpc.StatusCode.FAILED_PRECONDITION
        assert _code(lambda: admin.add_user("bad id!")) == grpc.StatusCode.FAILED_PRECONDITION
        assert _code(lambda: admin.revoke_user("nobody")) == grpc.StatusCode.NOT_FOUND
    db = redis.Redis.from_url(redis_server.url)
    audit = [records_pb2.AuditRecord.FromString(f[DATA_FIELD])
             for _, f in db.xrevrange(Keys(PREFIX).audit_stream, count=20)]  # fmt: skip
    assert {a.actor for a in audit if a.action in ("freeze", "unfreeze")} == {"boss"}


def test_a_flood_is_cut_off_and_others_go_on(auth_server):
    flood, calm = _user(auth_server, "flood"), _user(auth_server, "calm")
    with Client(auth_server.target, token=flood) as f, Client(auth_server.target, token=calm) as c:
        r = _generate(f, n=8)
        ids = [s.sample_id for s in r.samples]
        c_prompt = _generate(c)
        refused = None
        for i in range(FEEDBACK_LIMIT + 2):
            try:  # calls on unknown prompts (NOT_FOUND) count: the limit is on calls
                f.rate(f"p-missing-{i}", {ids[0]: 3.0})
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    refused = e
                    break
                assert e.code() == grpc.StatusCode.NOT_FOUND
        assert refused is not None, "the flood was never refused"
        assert i == FEEDBACK_LIMIT, f"refused after {i} calls; the limit is {FEEDBACK_LIMIT}"
        trailing = dict(refused.trailing_metadata() or ())
        assert 0 < float(trailing["retry-after"]) <= 60, trailing
        assert "retry" in refused.details()
        # another user is not slowed: her feedback goes through at once
        a, b = (s.sample_id for s in c_prompt.samples)
        assert c.choose(c_prompt.prompt_id, a, b).feedback_id
        # samples are limited too: 64 per minute, n=16 per call (8 already used)
        for _ in range(3):
            _generate(f, n=16)
        assert _code(lambda: _generate(f, n=16)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert auth_server.metric("instructloop_rate_limited_total") >= 2


def test_cli_users_and_token_file(auth_server, tmp_path):
    token_file = tmp_path / "fay.token"
    env = {"INSTRUCTLOOP_ADMIN_TOKEN": auth_server.admin_token, "PATH": ""}
    base = [sys.executable, "-m", "instructloop.cli"]
    add = subprocess.run(
        [*base, "users", "add", "fay", "--token-out", str(token_file),
         "--target", auth_server.target],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert add.returncode == 0, add.stderr
    token = token_file.read_text().strip()
    assert token not in add.stdout + add.stderr
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    gen = subprocess.run(
        [*base, "generate", "reverse: ab\n", "--max-tokens", "2", "--json",
         "--target", auth_server.target, "--token-file", str(token_file)],
        capture_output=True, text=True, env={"PATH": ""}, timeout=60,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    listed = subprocess.run(
        [*base, "users", "list", "--target", auth_server.target],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert listed.returncode == 0 and "fay" in listed.stdout, listed.stderr
    log = auth_server.log_path.read_text()
    assert token not in log, "a token reached the server log"
    assert "instructloop.serve.requests: generated" in log, "a line per request by default"

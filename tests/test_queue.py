"""The labeling queue: labelers are handed prompts other users sent, leased, overlapped,
skipped, and closed by their comparisons.

One authenticated server for the module (every logged n >= 2 prompt enters the queue,
each item goes to 2 labelers, leases last 2 s), real Redis, real gRPC over loopback. The
queue keys are cleared before each test, so each test sees only its own items; every
test uses its own users. Bounds (the queue's length, items expiring with their prompt)
are checked on the queue itself against the same Redis, without a server.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import grpc
import pytest
import redis
from conftest import start_servers, stop_server

from instructloop.cli import main as instructloop_main
from instructloop.clients import Client
from instructloop.clients.admin import AdminClient
from instructloop.keys import DATA_FIELD, Keys
from instructloop.serve.config import Limits, QueueConfig
from instructloop.serve.errors import NotFound
from instructloop.serve.logstore import LogStore
from instructloop.serve.queue import LabelingQueue
from instructloop.v1 import api_pb2, api_pb2_grpc, records_pb2

PREFIX = "queue"
LEASE_S = 2.0
KEYS = Keys(PREFIX)


@pytest.fixture(scope="module")
def queue_server(tiny_model, redis_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("queue")
    (server,) = start_servers(
        tiny_model, redis_server.url, [work / "server"], PREFIX,
        "--no-open", "--auth-cache-s", "0",
        "--queue-share", "1", "--queue-overlap", "2", "--queue-lease-s", str(LEASE_S),
        "--no-log-requests",
    )  # fmt: skip
    server.admin_token = (work / "server" / "admin-token").read_text().strip()
    server.tokens, server.clients = {}, {}
    yield server
    for client in server.clients.values():
        client.close()
    assert stop_server(server) == 0, server.log_tail()


@pytest.fixture
def db(redis_server, queue_server):
    """The Redis, with an empty labeling queue."""
    r = redis.Redis.from_url(redis_server.url)
    stale = list(r.scan_iter(f"{KEYS.data_tag}:queue:*"))
    if stale:
        r.delete(*stale)
    yield r
    r.close()


def _user(server, user_id: str, role: str = "labeler") -> Client:
    """A client with the credential of user_id (added on first use; closed with the server)."""
    if user_id not in server.clients:
        with AdminClient(server.target, token=server.admin_token) as admin:
            server.tokens[user_id] = admin.add_user(user_id, role).token
        server.clients[user_id] = Client(server.target, token=server.tokens[user_id], timeout=60)
    return server.clients[user_id]


def _people(server, test: str, *labelers: str) -> list[Client]:
    """An app and the named labelers of one test: [app, labeler, ...]."""
    return [_user(server, f"{test}-app", "app")] + [_user(server, f"{test}-{n}") for n in labelers]


def _code(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def _generate(client: Client, n: int = 4) -> api_pb2.GenerateResponse:
    return client.generate("reverse: abc\n", n=n, max_tokens=4, temperature=1.0)


def _tiers(task: api_pb2.Task) -> list[str]:
    return [s.sample_id for s in reversed(task.samples)]


def _feedback(db, prompt_id: str) -> list[records_pb2.FeedbackRecord]:
    entries = db.xrange(KEYS.feedback_stream)
    records = [records_pb2.FeedbackRecord.FromString(f[DATA_FIELD]) for _, f in entries]
    return [r for r in records if r.feedback.prompt_id == prompt_id]


def test_a_labeler_takes_ranks_and_the_item_leaves(queue_server, db):
    app, ann, bob = _people(queue_server, "q1", "ann", "bob")
    model = ann.get_model()
    assert (model.queue_share, model.queue_overlap) == (1.0, 2)
    r = _generate(app)
    started = time.time()
    task = ann.next_task()
    assert task.prompt_id == r.prompt_id and task.prompt == "reverse: abc\n"
    served = [(s.sample_id, s.text, s.version) for s in r.samples]
    assert [(s.sample_id, s.text, s.version) for s in task.samples] == served
    assert (task.overlap, task.lease_number, task.queue_leased) == (2, 1, 1)
    expires = task.lease_expires.ToNanoseconds() / 1e9
    assert started < expires <= time.time() + LEASE_S + 0.5
    assert ann.next_task().task_id == task.task_id, "a live lease comes back, not a new one"

    ranking = _tiers(task)
    tiered = [ranking[0], tuple(ranking[1:3]), ranking[3]]
    first = ann.rank(task.prompt_id, tiered, idempotency_key="q1-rank")
    assert ann.rank(task.prompt_id, tiered, idempotency_key="q1-rank").duplicate, "a retry"
    err = _code(lambda: ann.rank(task.prompt_id, ranking))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and first.feedback_id in err.details()
    assert db.hget(KEYS.queue_item(r.prompt_id), "done") == b"1", "counted once"
    assert _code(ann.next_task).code() == grpc.StatusCode.NOT_FOUND, "judged: never again"
    (stored,) = _feedback(db, r.prompt_id)
    assert stored.feedback.user_id == "q1-ann"
    tiers = [list(t.sample_ids) for t in stored.feedback.ranking.tiers]
    assert tiers == [[ranking[0]], ranking[1:3], [ranking[3]]]
    assert db.hget(KEYS.queue_item(r.prompt_id), "u:q1-ann") == b"J"
    assert db.zcard(KEYS.queue_leases) == 0

    # The second of its two labelers: a demonstration alone does not close the lease ...
    second = bob.next_task()
    assert (second.prompt_id, second.lease_number) == (r.prompt_id, 2)
    bob.demonstrate(second.prompt_id, "cba")
    assert bob.next_task().task_id == second.task_id
    # ... a comparison does, and with two judgements the item leaves the queue.
    bob.choose(second.prompt_id, ranking[0], ranking[1])
    assert not db.exists(KEYS.queue_item(r.prompt_id))
    assert db.zscore(KEYS.queue_waiting, r.prompt_id) is None
    kinds = sorted(f.feedback.WhichOneof("kind") for f in _feedback(db, r.prompt_id))
    assert kinds == ["choice", "demonstration", "ranking"]


def test_two_labelers_share_an_item_and_a_third_does_not_get_it(queue_server, db):
    app, ann, bob, cat = _people(queue_server, "q2", "ann", "bob", "cat")
    r = _generate(app)
    a, b = ann.next_task(), bob.next_task()
    assert a.prompt_id == b.prompt_id == r.prompt_id
    assert (a.lease_number, b.lease_number, b.queue_leased) == (1, 2, 2)
    err = _code(cat.next_task)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "empty" in err.details()
    ann.rank(a.prompt_id, _tiers(a))
    bob.rank(b.prompt_id, _tiers(b)[::-1])
    assert _code(cat.next_task).code() == grpc.StatusCode.NOT_FOUND
    assert not db.exists(KEYS.queue_item(r.prompt_id))
    assert {f.feedback.user_id for f in _feedback(db, r.prompt_id)} == {"q2-ann", "q2-bob"}


def test_never_the_labelers_own_prompt_nor_one_it_judged(queue_server, db):
    _, lin, max_, ned = _people(queue_server, "q3", "lin", "max", "ned")
    r = _generate(lin, n=2)  # a labeler's own prompt enters the queue too ...
    err = _code(lin.next_task)  # ... but is never handed to it
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "1 are its own prompts" in err.details(), err.details()
    a, b = (s.sample_id for s in r.samples)
    lin.choose(r.prompt_id, a, b)  # the owner's own judgement does not count for the queue
    ned.choose(r.prompt_id, b, a)  # one sent without a lease does
    assert _code(ned.next_task).code() == grpc.StatusCode.NOT_FOUND
    task = max_.next_task()
    assert task.prompt_id == r.prompt_id
    max_.choose(task.prompt_id, a, b)
    assert not db.exists(KEYS.queue_item(r.prompt_id)), "ned and max judged it: done"
    for client in (lin, max_, ned):
        assert _code(client.next_task).code() == grpc.StatusCode.NOT_FOUND


def test_an_expired_lease_returns_the_item(queue_server, db):
    app, ann, bob, cat = _people(queue_server, "q4", "ann", "bob", "cat")
    r = _generate(app)
    first, _ = ann.next_task(), bob.next_task()
    assert _code(cat.next_task).code() == grpc.StatusCode.NOT_FOUND  # both places taken
    time.sleep(first.lease_expires.ToNanoseconds() / 1e9 - time.time() + 0.3)
    task = cat.next_task()  # the expired leases were reclaimed: cat gets the item
    assert (task.prompt_id, task.lease_number) == (r.prompt_id, 3)
    assert _code(ann.next_task).code() == grpc.StatusCode.NOT_FOUND, "leased once: never again"
    # a comparison sent after the lease ran out is stored and still counts
    ann.rank(first.prompt_id, _tiers(first))
    cat.rank(task.prompt_id, _tiers(task))
    assert not db.exists(KEYS.queue_item(r.prompt_id))
    assert db.zcard(KEYS.queue_leases) == 0


def test_skip_and_cannot_rank(queue_server, db):
    app, ann, bob, cat, dan = _people(queue_server, "q5", "ann", "bob", "cat", "dan")
    r = _generate(app)
    task = ann.next_task()
    reply = ann.skip_task(task.task_id, "later")
    assert not reply.dropped and reply.queue_waiting == 1
    assert ann.skip_task(task.task_id, "later").queue_waiting == 1, "a retry is harmless"
    assert _code(ann.next_task).code() == grpc.StatusCode.NOT_FOUND, "skipped: never again"
    err = _code(lambda: ann.skip_task(task.task_id, "garbled", cannot_rank=True))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION

    b = bob.next_task()
    assert b.prompt_id == r.prompt_id, "a skipped item goes to others"
    no_reason = api_pb2.SkipTaskRequest(task_id=b.task_id, cannot_rank=True)
    stub = api_pb2_grpc.InstructLoopStub(bob.channel)
    err = _code(lambda: stub.SkipTask(no_reason, metadata=bob.metadata))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "reason" in err.details()
    assert not bob.skip_task(b.task_id, "the prompt is garbled", cannot_rank=True).dropped
    c = cat.next_task()
    reply = cat.skip_task(c.task_id, "unreadable", cannot_rank=True)
    assert reply.dropped, "two labelers cannot rank it: it leaves the queue"
    assert not db.exists(KEYS.queue_item(r.prompt_id))
    assert _code(dan.next_task).code() == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: dan.skip_task(c.task_id, "x")).code() == grpc.StatusCode.NOT_FOUND
    err = _code(lambda: dan.skip_task("nonsense", "x"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT

    entries = db.xrange(KEYS.queue_skips)
    skips = [api_pb2.SkipTaskRequest.FromString(f[DATA_FIELD]) for _, f in entries]
    mine = [(s.user_id, s.cannot_rank, s.reason) for s in skips if s.user_id.startswith("q5-")]
    assert mine == [
        ("q5-ann", False, "later"),
        ("q5-bob", True, "the prompt is garbled"),
        ("q5-cat", True, "unreadable"),
    ]


def test_only_labelers_take_tasks(queue_server, db):
    app, eve = _people(queue_server, "q6", "eve")
    _generate(app)
    assert _code(app.next_task).code() == grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: app.skip_task("p-x/1")).code() == grpc.StatusCode.PERMISSION_DENIED
    with Client(queue_server.target, token="") as anonymous:
        assert _code(anonymous.next_task).code() == grpc.StatusCode.UNAUTHENTICATED
        err = _code(lambda: anonymous.skip_task("p-x/1"))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    err = _code(lambda: eve.next_task(user_id="q6-app"))  # nobody takes work as another
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    with AdminClient(queue_server.target, token=queue_server.admin_token) as admin:
        admin.suspend_user("q6-eve", "test")
        err = _code(eve.next_task)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "suspended" in err.details()
        admin.suspend_user("q6-eve", suspend=False)
    assert eve.next_task().prompt_id


def test_cli_task_next_and_skip(queue_server, db, tmp_path):
    app, _ = _people(queue_server, "q7", "fay")
    r = _generate(app)
    token_file = tmp_path / "fay.token"
    token_file.write_text(queue_server.tokens["q7-fay"])
    task = [sys.executable, "-m", "instructloop.cli", "task"]
    conn = ["--target", queue_server.target, "--token-file", str(token_file)]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*task, *args, *conn], capture_output=True, text=True, timeout=60)

    shown = cli("next")
    assert shown.returncode == 0, shown.stderr
    assert r.prompt_id in shown.stdout and r.samples[0].sample_id in shown.stdout
    task_id = next(w for w in shown.stdout.split() if w.startswith(r.prompt_id + "/"))
    skipped = cli("skip", task_id, "--reason", "not mine")
    assert skipped.returncode == 0 and "given back" in skipped.stdout, skipped.stderr
    empty = cli("next")
    assert empty.returncode == 1 and "NOT_FOUND" in empty.stderr


def test_simulate_via_queue_ranks_only_what_the_queue_hands_out(queue_server, db, tmp_path):
    """Simulated apps ask, simulated labelers rank only what NextTask hands them."""
    code = instructloop_main([
        "simulate", "--via-queue", "--target", queue_server.target,
        "--data-dir", str(tmp_path), f"--admin-token={queue_server.admin_token}",
        "--seed", "41", "--users", "3", "--apps", "2", "--concurrency", "2", "--k", "4",
        "--max-comparisons", "6", "--rate", "0", "--settle-s", "0", "--eval-prompts", "4",
        "--target-win-rate", "0", "--target-exact-match", "0", "--max-minutes", "3",
        "--no-live", "--out", str(tmp_path / "sim"),
    ])  # fmt: skip
    report = json.loads((tmp_path / "sim" / "report.json").read_text())
    assert code == 0 and not report["failed"], report["last_error"]
    assert report["via_queue"] and report["comparisons"] == 6
    # overlap 2: two labelers per prompt, so the apps asked about half as often (racing
    # workers may each feed the queue at once)
    assert 3 <= report["generated_prompts"] <= 12, report["generated_prompts"]
    entries = db.xrange(KEYS.prompts_stream)
    prompts = [records_pb2.PromptRecord.FromString(f[DATA_FIELD]) for _, f in entries]
    owner = {p.prompt_id: p.user_id for p in prompts}
    entries = db.xrange(KEYS.feedback_stream)
    feedback = [records_pb2.FeedbackRecord.FromString(f[DATA_FIELD]).feedback for _, f in entries]
    ranked = [f for f in feedback if f.user_id.startswith("sim-41-") and f.HasField("ranking")]
    assert len(ranked) == 6
    assert all(owner[f.prompt_id].startswith("sim-41-app-") for f in ranked)
    assert all(not f.user_id.startswith("sim-41-app-") for f in ranked), "apps never rank"


def _record(pid: str) -> records_pb2.PromptRecord:
    r = records_pb2.PromptRecord(prompt_id=pid, prompt="sort: b a", user_id="someone")
    for i in range(2):
        r.samples.add(sample_id=f"{pid}-s{i}", index=i, text="a b", version="v0")
    return r


@pytest.mark.redis_kinds("single", "cluster")
def test_no_log_requests_leaves_no_line_per_call_but_failures(queue_server, db):
    """The module's server runs with --no-log-requests: its answered calls leave no line
    (a server without the option writes one per call: test_auth), a refused one does."""
    app, ann = _people(queue_server, "nolog", "ann")
    _generate(app)
    task = ann.next_task()
    ann.rank(task.prompt_id, _tiers(task))
    assert _code(lambda: ann.rank(task.prompt_id, _tiers(task))).code() == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    log = queue_server.log_path.read_text()  # text format: the message, not its fields
    assert "instructloop.serve.requests" not in log and "servicer: rpc failed" in log, log[-3000:]


def test_the_queue_is_bounded_and_expires_with_its_prompts(redis_server):
    """--queue-max drops the oldest items (with their hashes); an item leaves with its
    prompt's TTL; a prompt with one sample is never enqueued."""
    keys = Keys("queue-bounds")

    async def run() -> None:
        store = LogStore(redis_server.url, keys, prompt_ttl_s=1)
        store.queue = LabelingQueue(store, QueueConfig(queue_share=1, queue_max=3), Limits())
        try:
            for i in range(5):
                await store.log_prompt(_record(f"p-{i}"))
            single = _record("p-single")
            del single.samples[1]
            await store.log_prompt(single)
            waiting = await store.redis.zrange(keys.queue_waiting, 0, -1)
            assert waiting == [b"p-2", b"p-3", b"p-4"]
            assert not await store.redis.exists(keys.queue_item("p-0"), keys.queue_item("p-1"))
            assert await store.redis.exists(keys.queue_item("p-4"))
            assert 0 < await store.redis.pttl(keys.queue_item("p-4")) <= 1000
            await asyncio.sleep(1.2)
            with pytest.raises(NotFound, match="empty"):  # the items expired
                await store.queue.next_task("labeler")
            assert await store.redis.zcard(keys.queue_waiting) == 0, "expired ids are removed"
        finally:
            await store.close()

    asyncio.run(run())

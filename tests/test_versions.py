"""Model versions end to end: two real server replicas (vLLM, LoRA enabled) on one Redis
and one model store, driven through the Admin API.

Each published test version has a distinct greedy output (tests/variants.py), measured
once while it is served alone: its fingerprint. Every response during swaps must carry
the fingerprint of the version it names, which is how we check that the version a
response names is the version whose weights produced it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import pytest
import redis as sync_redis
import redis.asyncio as aioredis
from conftest import start_servers, stop_server

from instructloop.clients import Client
from instructloop.clients.admin import AdminClient
from instructloop.keys import Keys
from instructloop.registry import Frozen, Registry, load_registry_key, publish_version
from instructloop.store import ModelStore
from instructloop.v1 import admin_pb2, api_pb2, api_pb2_grpc
from instructloop.variants import full_variant, lora_variant

TOKEN = "test-admin-token"
PREFIX = "fleet"
DRAIN_S = 3.0  # the replicas' full-swap drain deadline
PROMPT = "reverse: version"
GREEDY = {"n": 1, "max_tokens": 12, "temperature": 0.0}


def registry_call(redis_url: str, action, key: bytes | None = None):
    """Run `action(registry)` on a fresh event loop and Redis connection (signing what it
    registers with `key`, the fleet's registry key)."""

    async def go():
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await action(Registry(client, Keys(PREFIX), key))
        finally:
            await client.aclose()

    return asyncio.run(go())


class Fleet:
    def __init__(self, servers, redis_url: str, store: ModelStore, model: Path, key: bytes):
        self.servers = servers
        self.key = key
        self.model = model
        self.redis_url = redis_url
        self.store = store
        self.clients = [Client(s.target, timeout=60) for s in servers]
        self.admin = AdminClient(servers[0].target, token=TOKEN, actor="tester")
        self.fingerprint: dict[str, str] = {}
        self.convergence_s: list[float] = []

    def publish(self, src: Path, kind: str, base_model: str) -> str:
        async def go(registry):
            info = await publish_version(
                registry, self.store, str(src), kind=kind, parent="v0", base_model=base_model,
                feedback_ids=["f-test"], metrics={"win_rate": 0.7},
                gate={"passed": True, "reason": "test"}, actor="tester",
            )  # fmt: skip
            return info.id

        return registry_call(self.redis_url, go, self.key)

    def wait_all_serving(self, version: str, timeout: float = 60.0) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if all(c.get_model().version == version for c in self.clients):
                return time.monotonic() - start
            time.sleep(0.02)
        states = [(c.get_model().version, c.get_model().last_swap_error) for c in self.clients]
        raise AssertionError(f"replicas did not converge on {version}: {states}")

    def promote(self, version: str) -> float:
        self.admin.promote(version, reason="test")
        elapsed = self.wait_all_serving(version)
        self.convergence_s.append(elapsed)
        return elapsed

    def greedy(self, client: Client, **kw) -> tuple[str, str]:
        r = client.generate(PROMPT, **GREEDY, **kw)
        return r.version, r.samples[0].text


@pytest.fixture(scope="module")
def fleet(tiny_model, redis_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("fleet")
    store = ModelStore(work / "store")
    key_file = work / "registry-key"  # the deployment's: every replica and the publisher
    key = load_registry_key(key_file)
    # No balancer checks these replicas: a swap need not wait for one to notice.
    extra = ("--enable-lora", "--model-store", str(store.root), "--admin-token", TOKEN,
             "--registry-key-file", str(key_file),
             "--poll-interval-s", "1", "--swap-drain-timeout-s", str(DRAIN_S),
             "--swap-drain-grace-s", "0")  # fmt: skip
    servers = start_servers(tiny_model, redis_server.url, [work / "r0", work / "r1"], PREFIX,
                            *extra)  # fmt: skip
    f = Fleet(servers, redis_server.url, store, tiny_model, key)
    variants = work / "variants"
    f.full = [f.publish(full_variant(tiny_model, variants / f"full{i}", seed=i), "full",
                        str(tiny_model)) for i in (1, 2, 3)]  # fmt: skip
    f.lora = [f.publish(lora_variant(tiny_model, variants / f"lora{i}", seed=10 + i), "lora",
                        "v0") for i in (1, 2, 3)]  # fmt: skip
    for version in ["v0", *f.full, *f.lora]:  # fingerprints, one version served at a time
        f.promote(version)
        outputs = {f.greedy(c) for c in f.clients}
        assert len(outputs) == 1, f"replicas disagree on one version: {outputs}"
        ((served, text),) = outputs
        assert served == version
        f.fingerprint[version] = text
    assert len(set(f.fingerprint.values())) == 7, "test versions must have distinct outputs"
    yield f
    for c in f.clients:
        c.close()
    f.admin.close()
    for s in servers:
        assert stop_server(s) == 0, s.log_tail()
    print(f"\nreplica convergence after promote/rollback (s): {sorted(f.convergence_s)}")


def _load(fleet: Fleet, stop: threading.Event, results: list, errors: list, stream: bool, i: int):
    client = fleet.clients[i % len(fleet.clients)]
    while not stop.is_set():
        try:
            if stream:
                text, final = "", None
                for chunk in client.generate_stream(PROMPT, **GREEDY):
                    if chunk.WhichOneof("event") == "delta":
                        text += chunk.delta.text
                    else:
                        final = chunk.final
                results.append((final.version, text))
            else:
                results.append(fleet.greedy(client))
        except grpc.RpcError as e:
            errors.append(f"{e.code().name}: {e.details()}")


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_swaps_under_load_fail_no_request_and_label_every_sample(fleet, mode):
    if mode == "full":
        targets = [*fleet.full, "v0", fleet.full[0]]
    else:
        targets = [*fleet.lora, *fleet.lora[:2]]
    fleet.promote("v0")
    stop, results, errors = threading.Event(), [], []
    workers = [
        threading.Thread(target=_load, args=(fleet, stop, results, errors, i % 3 == 2, i))
        for i in range(6)
    ]
    for w in workers:
        w.start()
    try:
        time.sleep(1.0)
        for version in targets:  # five swaps
            fleet.promote(version)
            time.sleep(0.5)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=60)

    assert errors == [], f"{len(errors)} requests failed during swaps: {errors[:5]}"
    seen = {version for version, _ in results}
    assert seen >= set(targets), f"load did not reach every version: {seen}"
    wrong = [(v, t) for v, t in results if fleet.fingerprint.get(v) != t]
    assert not wrong, f"{len(wrong)}/{len(results)} responses name the wrong version: {wrong[:3]}"


def test_rollback_brings_previous_outputs_back(fleet):
    first, second = fleet.full[0], fleet.full[1]
    fleet.promote(first)
    fleet.promote(second)
    change = fleet.admin.rollback(reason="bad outputs")
    assert (change.from_version, change.to_version, change.actor) == (second, first, "tester")
    fleet.convergence_s.append(fleet.wait_all_serving(first))
    assert all(fleet.greedy(c) == (first, fleet.fingerprint[first]) for c in fleet.clients)

    fleet.admin.rollback("v0")  # to a named version
    fleet.wait_all_serving("v0")
    assert fleet.greedy(fleet.clients[1]) == ("v0", fleet.fingerprint["v0"])

    audit = registry_call(fleet.redis_url, lambda r: r.audit_log(10))
    rollbacks = [a for a in audit if a.action == "rollback"]
    assert [(a.from_version, a.to_version, a.actor) for a in rollbacks[:2]] == [
        (first, "v0", "tester"),
        (second, first, "tester"),
    ]
    assert rollbacks[1].reason == "bad outputs"


@pytest.mark.parametrize("damage", ["flip a byte", "delete a file"])
def test_corrupt_or_partial_version_is_refused_and_old_keeps_serving(fleet, tmp_path, damage):
    fleet.promote(fleet.full[0])
    bad_dir = full_variant(fleet.model, tmp_path / "bad", seed=99)
    bad = fleet.publish(bad_dir, "full", str(fleet.model))
    weights = fleet.store.path(bad) / "model.safetensors"
    if damage == "flip a byte":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        weights.unlink()

    fleet.admin.promote(bad, reason="should be refused")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        infos = [c.get_model() for c in fleet.clients]
        if all(bad in i.last_swap_error for i in infos):
            break
        time.sleep(0.1)
    for info in infos:
        assert bad in info.last_swap_error and "model.safetensors" in info.last_swap_error
        assert info.version == fleet.full[0], "a refused version must not replace the old one"
    for c in fleet.clients:
        assert fleet.greedy(c) == (fleet.full[0], fleet.fingerprint[fleet.full[0]])
    replicas = fleet.admin.list_versions().replicas
    assert sum(bad in r.last_swap_error for r in replicas) == 2
    assert sum(s.metric('instructloop_swaps_total{mode="lora",result="refused"}') > 0
               for s in fleet.servers) == 2  # fmt: skip
    fleet.admin.rollback(fleet.full[0], reason="undo bad promote")


def test_pinning_and_canary_in_lora_mode(fleet):
    l1, l2, l3 = fleet.lora
    for v in (l1, l2):
        fleet.promote(v)
    client = fleet.clients[0]
    pinned = client.generate(PROMPT, **GREEDY, version=l1)
    assert (pinned.version, pinned.samples[0].text) == (l1, fleet.fingerprint[l1])
    with pytest.raises(grpc.RpcError) as err:
        client.generate(PROMPT, **GREEDY, version=fleet.full[2])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not loaded" in err.value.details()

    fleet.admin.set_canary(l3, share=0.5, reason="try l3")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        versions = [fleet.greedy(client) for _ in range(30)]
        if {v for v, _ in versions} == {l2, l3}:
            break
    assert {v for v, _ in versions} == {l2, l3}, "the canary takes a share, current the rest"
    assert all(fleet.fingerprint[v] == t for v, t in versions)
    fleet.admin.set_canary("", reason="done")
    with pytest.raises(grpc.RpcError) as err:
        fleet.admin.set_canary(fleet.full[0], share=0.1)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_freeze_stops_automatic_promotion_only(fleet):
    fleet.promote("v0")
    fleet.admin.freeze(reason="incident")
    try:
        with pytest.raises(Frozen):
            registry_call(fleet.redis_url, lambda r: r.promote(fleet.full[1], "learner", auto=True))
        assert fleet.admin.list_versions().aliases["current"] == "v0"
        fleet.promote(fleet.full[1])  # an operator still can
    finally:
        fleet.admin.unfreeze()
    change = registry_call(fleet.redis_url, lambda r: r.promote("v0", "learner", auto=True))
    assert change.to_version == "v0"
    fleet.wait_all_serving("v0")


def test_admin_calls_need_the_credential(fleet):
    target = fleet.servers[0].target
    for token, code in [("", grpc.StatusCode.UNAUTHENTICATED),
                        ("wrong", grpc.StatusCode.UNAUTHENTICATED)]:  # fmt: skip
        with AdminClient(target, token=token) as admin:
            for call in (admin.list_versions, lambda a=admin: a.promote("v0"),
                         lambda a=admin: a.rollback()):  # fmt: skip
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == code
    info = fleet.admin.get_version(fleet.lora[0])
    assert info.info.kind == "lora" and info.lineage == ["v0"]
    assert list(info.feedback_ids) == ["f-test"]
    with pytest.raises(grpc.RpcError) as err:
        fleet.admin.get_version("v404")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_admin_statuses_name_the_failure_and_never_echo_a_huge_field(fleet):
    # A registry entry that cannot be parsed is a bug or corruption, not an outage: INTERNAL,
    # not UNAVAILABLE ("safe to retry"), as the public service says.
    r = sync_redis.Redis.from_url(fleet.redis_url)
    r.hset(Keys(PREFIX).versions, "v-corrupt", b"\xff not a VersionInfo")
    try:
        with pytest.raises(grpc.RpcError) as err:
            fleet.admin.list_versions()
        assert err.value.code() == grpc.StatusCode.INTERNAL
    finally:
        r.hdel(Keys(PREFIX).versions, "v-corrupt")
        r.close()
    # A replica that died without removing its heartbeat is forgotten after a day.
    stale = admin_pb2.ReplicaStatus(replica_id="r-dead", version="v0")
    stale.seen.FromSeconds(int(time.time()) - 2 * 24 * 3600)
    r = sync_redis.Redis.from_url(fleet.redis_url)
    r.hset(Keys(PREFIX).replicas, "r-dead", stale.SerializeToString())
    assert "r-dead" not in {x.replica_id for x in fleet.admin.list_versions().replicas}
    assert not r.hexists(Keys(PREFIX).replicas, "r-dead")
    r.close()
    huge = "v" * 500_000
    with pytest.raises(grpc.RpcError) as err:
        fleet.admin.promote(huge)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "version is 500000 characters" in err.value.details()
    assert len(err.value.details()) < 200


def _arena_judgements(fleet: Fleet, canary: str, current: str, prefer_canary: bool, count: int):
    """Send `count` choices on arena responses (one canary, one current sample)."""
    client, sent, deadline = fleet.clients[0], 0, time.monotonic() + 60
    while sent < count and time.monotonic() < deadline:
        # top_k=1 decodes greedily yet allows n=2 (vLLM refuses n>1 at temperature 0).
        r = client.generate(PROMPT, n=2, max_tokens=12, temperature=1.0, top_k=1)
        by_version = {s.version: s for s in r.samples}
        if set(by_version) != {canary, current}:
            continue
        for s in r.samples:  # each sample is its own version's output
            assert s.text == fleet.fingerprint[s.version]
        winner, loser = (canary, current) if prefer_canary else (current, canary)
        client.choose(r.prompt_id, by_version[winner].sample_id, by_version[loser].sample_id,
                      user_id=f"arena-{canary}-{sent}")  # fmt: skip
        sent += 1
    assert sent == count, "no arena responses: the canary never took traffic"


def _one_user_ranks_an_arena(fleet: Fleet, canary: str, user: str) -> None:
    """One user ranks one n=16 arena response: all 8 canary samples above all 8 current
    ones (64 canary-vs-current pairs)."""
    client, deadline = fleet.clients[0], time.monotonic() + 60
    while time.monotonic() < deadline:
        r = client.generate(PROMPT, n=16, max_tokens=4, temperature=1.0)
        if {s.version for s in r.samples} != {canary} | {r.version}:
            continue
        order = sorted(r.samples, key=lambda s: s.version != canary)  # canary first
        client.rank(r.prompt_id, [s.sample_id for s in order], user_id=user)
        return
    raise AssertionError("no arena response: the canary never took traffic")


def test_arena_win_rate_promotes_or_ends_the_canary(fleet):
    l1, l2, l3 = fleet.lora
    fleet.promote(l1)

    fleet.admin.set_canary(l2, share=0.5, promote_at=0.7, min_comparisons=4, min_users=4,
                           reason="A/B")  # fmt: skip
    # One user's ranking of an n=16 arena is one judgement, however many pairs it orders.
    _one_user_ranks_an_arena(fleet, l2, user="one-loud-user")
    state = fleet.admin.list_versions()
    assert state.aliases["canary"] == l2 and state.aliases["current"] == l1
    assert (state.canary.wins, state.canary.users) == (1, 1)
    # Three more users preferring the canary make four independent judgements: promoted.
    _arena_judgements(fleet, canary=l2, current=l1, prefer_canary=True, count=3)
    fleet.wait_all_serving(l2)  # users preferred it: promoted
    state = fleet.admin.list_versions()
    assert state.aliases["current"] == l2 and "canary" not in state.aliases
    audit = registry_call(fleet.redis_url, lambda r: r.audit_log(5))
    assert any(a.action == "auto-promote" and a.actor == "canary-judge" for a in audit)

    fleet.admin.set_canary(l3, share=0.5, rollback_at=0.3, min_comparisons=4, min_users=4,
                           reason="A/B")  # fmt: skip
    _arena_judgements(fleet, canary=l3, current=l2, prefer_canary=False, count=4)
    state = fleet.admin.list_versions()
    assert "canary" not in state.aliases, "users preferred current: the canary ends"
    assert state.aliases["current"] == l2


def test_a_stream_that_stops_reading_cannot_hold_a_full_swap(fleet):
    """A GenerateStream client that stops reading holds its lease while the server's writes
    block; the swap ends it after the drain deadline and the stream says why."""
    before = fleet.admin.list_versions().aliases["current"]
    target = next(v for v in fleet.full if v != before)
    # Without BDP probing the client's flow-control window stays at 64 KiB, so a client
    # that does not read soon blocks the server's writes.
    channel = grpc.insecure_channel(fleet.servers[0].target, options=[("grpc.http2.bdp_probe", 0)])
    stub = api_pb2_grpc.InstructLoopStub(channel)
    request = api_pb2.GenerateRequest(
        prompt=PROMPT, n=16,
        sampling=api_pb2.SamplingParams(max_tokens=512, temperature=1.0, logprobs=20),
    )  # fmt: skip
    stream = stub.GenerateStream(request, timeout=300)
    try:
        next(stream)  # started: it holds a lease on the current version
        time.sleep(2.0)  # and stops reading
        fleet.admin.promote(target, reason="swap under a stalled stream")
        took = fleet.wait_all_serving(target, timeout=60)
        with pytest.raises(grpc.RpcError) as err:
            for _ in stream:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "drain deadline" in err.value.details() and target in err.value.details()
        assert took < DRAIN_S + 30
    finally:
        stream.cancel()
        channel.close()
        fleet.promote(before)


def test_a_version_registered_by_hand_in_redis_is_refused(fleet):
    """Anyone who can write to Redis could register a directory and promote it; without
    the deployment's signature no replica loads it, and the old version keeps serving."""
    before = fleet.admin.list_versions().aliases["current"]
    forged = admin_pb2.VersionInfo()
    forged.CopyFrom(registry_call(fleet.redis_url, lambda r: r.get(fleet.full[2])))
    # A "base" entry is loaded from the path it names: without the signature check, any
    # directory that Redis names.
    forged.id, forged.kind, forged.signature = "v-forged", "base", ""
    forged.path = str(fleet.store.path(fleet.full[2]))
    forged.ClearField("aliases")
    r = sync_redis.Redis.from_url(fleet.redis_url)
    r.hset(Keys(PREFIX).versions, "v-forged", forged.SerializeToString())
    try:
        fleet.admin.promote("v-forged", reason="a write to Redis alone")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = [c.get_model() for c in fleet.clients]
            if all("not signed" in m.last_swap_error for m in states):
                break
            time.sleep(0.2)
        assert all("not signed" in m.last_swap_error for m in states), states
        assert all(m.version == before for m in states)
        for c in fleet.clients:
            assert fleet.greedy(c) == (before, fleet.fingerprint[before])
    finally:
        fleet.admin.rollback(before, reason="undo the forged promote")
        r.hdel(Keys(PREFIX).versions, "v-forged")
        r.hset(Keys(PREFIX).aliases, "previous", before)
        r.close()

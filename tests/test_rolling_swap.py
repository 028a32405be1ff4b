"""Three replicas behind HAProxy (deploy/haproxy.cfg, as committed), under continuous
Generate load, through five rolling full-weight swaps, one replica SIGKILLed mid-swap.

Load goes two ways at once: through HAProxy, and straight to the replicas from the SDK
with a multi-address target (round_robin, client-side health checks). What must hold:
- no call fails with anything but UNAVAILABLE (retryable; counted and retried);
- every response's text is the greedy output of the version it names (each version's
  output is distinct, measured once every live replica serves it);
- at no time do two replicas report NOT_SERVING for a swap (their logs' timestamps),
  and HAProxy saw each survivor go DOWN for each swap (it honoured NOT_SERVING);
- the survivors end on the newest version, the fleet going on after the killed
  replica's swap turn expired.

The killed replica is not restarted: a restarted one converges before it serves (the
follower's first sync), which other tests cover; here what matters is that the fleet
does not wait for a dead replica longer than the turn's TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import psutil
import redis.asyncio as aioredis
from conftest import SERVER_START_TIMEOUT_S, launch_server, report_row, stop_server, wait_serving

from instructloop.clients import Client
from instructloop.clients.admin import AdminClient
from instructloop.keys import Keys
from instructloop.process import die_with_parent
from instructloop.redis_embedded import free_port
from instructloop.registry import Registry, load_registry_key, publish_version
from instructloop.store import ModelStore
from instructloop.variants import full_variant

HAPROXY_CFG = Path(__file__).resolve().parents[1] / "deploy" / "haproxy.cfg"
TOKEN = "test-admin-token"
PREFIX = "rolling"
REPLICAS = 3
SWAPS = 5
KILL_AT = 3  # the swap during which the replica taking its turn is SIGKILLed
GRACE_S = 1.5  # --swap-drain-grace-s: over the config's 1 s check interval
TURN_TTL_S = 3.0
PROMPT = "reverse: version"
GREEDY = {"n": 1, "max_tokens": 12, "temperature": 0.0}
SWAP_LOG = re.compile(r"swap to (\S+): (NOT_SERVING|SERVING) at t=([\d.]+)")


def haproxy_stats(url: str) -> dict[str, dict[str, str]]:
    """HAProxy's per-server stats (CSV) of the replicas backend, by server name."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
    return {
        r["svname"]: r
        for r in rows
        if r["pxname"] == "replicas" and r["svname"] not in ("FRONTEND", "BACKEND")
    }


def not_serving_windows(log: str, killed_at: float | None) -> list[tuple[float, float]]:
    """(start, end) of each swap's NOT_SERVING in one replica's log; one still open when
    the replica was killed ends then."""
    windows, start = [], None
    for _, state, t in SWAP_LOG.findall(log):
        if state == "NOT_SERVING":
            start = float(t)
        elif start is not None:
            windows.append((start, float(t)))
            start = None
    if start is not None:
        assert killed_at is not None, "a swap never ended on a live replica"
        windows.append((start, killed_at))
    return windows


def publish_all(
    redis_url: str, store: ModelStore, key: bytes, dirs: list[Path], base: str
) -> list[str]:
    async def go():
        client = aioredis.Redis.from_url(redis_url)
        registry = Registry(client, Keys(PREFIX), key)
        try:
            ids = []
            for d in dirs:
                info = await publish_version(
                    registry, store, str(d), kind="full", parent="v0", base_model=base,
                    gate={"passed": True, "reason": "test"}, actor="tester",
                )  # fmt: skip
                ids.append(info.id)
            return ids
        finally:
            await client.aclose()

    return asyncio.run(go())


def kill_tree(pid: int) -> None:
    """SIGKILL a replica and its engine processes at once, as a node or container dies
    (the engine core would outlive its front end otherwise)."""
    proc = psutil.Process(pid)
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)


class Load:
    """Greedy Generate calls in threads until stopped: (path, version, text) of each."""

    def __init__(self, clients: dict[str, Client], threads_per_client: int) -> None:
        self.stop = threading.Event()
        self.ok: list[tuple[str, str, str]] = []
        self.unavailable: list[str] = []
        self.failed: list[str] = []
        self.threads = [
            threading.Thread(target=self._run, args=(path, client), daemon=True)
            for path, client in clients.items()
            for _ in range(threads_per_client)
        ]

    def _run(self, path: str, client: Client) -> None:
        while not self.stop.is_set():
            try:
                r = client.generate(PROMPT, **GREEDY)
                self.ok.append((path, r.version, r.samples[0].text))
            except grpc.RpcError as e:
                line = f"{path}: {e.code().name}: {e.details()}"
                (
                    self.unavailable if e.code() == grpc.StatusCode.UNAVAILABLE else self.failed
                ).append(line)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def test_rolling_swaps_behind_haproxy_with_a_replica_killed_mid_swap(
    tiny_model, redis_server, tmp_path
):
    haproxy = shutil.which("haproxy")
    assert haproxy, "haproxy is not installed (apt-get install haproxy; .ci/run does)"
    started = time.monotonic()
    store = ModelStore(tmp_path / "store")
    key_file = tmp_path / "registry-key"
    key = load_registry_key(key_file)
    extra = ("--model-store", str(store.root), "--registry-key-file", str(key_file),
             "--admin-token", TOKEN, "--poll-interval-s", "1",
             "--swap-drain-grace-s", str(GRACE_S), "--swap-turn-ttl-s", str(TURN_TTL_S),
             "--swap-drain-timeout-s", "10")  # fmt: skip
    servers = [
        launch_server(tiny_model, redis_server.url, tmp_path / f"r{i}", PREFIX, *extra)
        for i in range(REPLICAS)
    ]
    proxy = None
    clients: list = []
    try:
        # The variants are built while the engines start.
        dirs = [full_variant(tiny_model, tmp_path / f"full{i}", seed=i) for i in range(1, 6)]
        for s in servers:
            # Three engines start at once: on a shared 2-core machine, slower than one.
            wait_serving(s.target, s.proc, s.log_path, 2 * SERVER_START_TIMEOUT_S)
        versions = publish_all(redis_server.url, store, key, dirs, str(tiny_model))
        start_s = time.monotonic() - started

        lb, stats = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        env = dict(os.environ, LISTEN=lb, STATS=stats)
        for i, s in enumerate(servers, 1):
            env[f"REPLICA{i}"] = s.target
            env[f"CHECK_PORT{i}"] = s.metrics_url.rsplit(":", 1)[1].split("/")[0]
        proxy_log = tmp_path / "haproxy.log"
        with open(proxy_log, "wb") as out:
            proxy = subprocess.Popen(
                [haproxy, "-db", "-f", str(HAPROXY_CFG)], stdout=out, stderr=subprocess.STDOUT,
                env=env, preexec_fn=die_with_parent,
            )  # fmt: skip
        stats_url = f"http://{stats}/stats;csv"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if all(r["status"] == "UP" for r in haproxy_stats(stats_url).values()):
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError(f"haproxy not up:\n{proxy_log.read_text()}")

        direct = {s.target: Client(s.target, timeout=30, max_attempts=1) for s in servers}
        via_lb = Client(lb, timeout=60)
        multi = Client("ipv4:" + ",".join(s.target for s in servers), timeout=60)
        admin = AdminClient(lb, token=TOKEN, actor="tester")
        clients = [*direct.values(), via_lb, multi, admin]
        fingerprint = {"v0": via_lb.generate(PROMPT, **GREEDY).samples[0].text}

        alive = list(servers)
        killed_at, victim = None, None
        with Load({"haproxy": via_lb, "sdk-round-robin": multi}, threads_per_client=3) as load:
            time.sleep(1.0)
            for k, version in enumerate(versions, 1):
                admin.promote(version, reason=f"rolling swap {k}")
                if k == KILL_AT:  # SIGKILL the replica that takes the turn, in its grace
                    deadline = time.monotonic() + 60
                    while killed_at is None and time.monotonic() < deadline:
                        for s in alive:
                            if f"swap to {version}: NOT_SERVING" in s.log_path.read_text():
                                kill_tree(s.proc.pid)
                                killed_at = time.time()
                                alive.remove(s)
                                victim = s
                                break
                        time.sleep(0.02)
                    assert killed_at is not None, "no replica began the swap"
                deadline = time.monotonic() + 90
                while time.monotonic() < deadline:
                    if all(direct[s.target].get_model().version == version for s in alive):
                        break
                    time.sleep(0.1)
                else:
                    states = [direct[s.target].get_model() for s in alive]
                    raise AssertionError(f"replicas did not converge on {version}: {states}")
                fingerprint[version] = (
                    direct[alive[0].target].generate(PROMPT, **GREEDY).samples[0].text
                )
            time.sleep(1.0)
        swaps_s = time.monotonic() - started - start_s

        # Nothing failed but retryable UNAVAILABLE; every text is its version's output.
        assert load.failed == [], f"{len(load.failed)} calls failed: {load.failed[:5]}"
        assert len(set(fingerprint.values())) == SWAPS + 1, f"outputs collide: {fingerprint}"
        wrong = [(p, v, t) for p, v, t in load.ok if fingerprint.get(v) != t]
        assert not wrong, f"{len(wrong)}/{len(load.ok)} responses name the wrong version"
        paths = {p for p, _, _ in load.ok}
        assert paths == {"haproxy", "sdk-round-robin"}, paths
        assert {v for _, v, _ in load.ok} >= {"v0", versions[-1]}

        # The survivors serve the newest version, after one swap each per version.
        assert all(direct[s.target].get_model().version == versions[-1] for s in alive)
        windows = []
        for s in servers:
            mine = not_serving_windows(s.log_path.read_text(), killed_at if s is victim else None)
            assert len(mine) == (KILL_AT if s is victim else SWAPS), (s.target, mine)
            windows += [(a, b, s.target) for a, b in mine]
        windows.sort()
        for (_, end, first), (start, _, second) in zip(windows, windows[1:], strict=False):
            assert start >= end, f"{first} and {second} were out of the balancer at once"
        # After the kill, the next replica waited out the dead one's turn (its TTL).
        after = min(a for a, _, _ in windows if a > killed_at)
        assert after - killed_at >= TURN_TTL_S - 0.5, "the turn was not held by the dead replica"

        # HAProxy took every survivor out for each of its swaps, and the dead one for good.
        per_server = haproxy_stats(stats_url)
        names = {f"r{i}": s for i, s in enumerate(servers, 1)}
        for name, row in per_server.items():
            if names[name] is victim:
                assert row["status"].startswith("DOWN"), row["status"]
            else:
                assert int(row["chkdown"]) >= SWAPS, (name, row["chkdown"])
        proxy_retries = sum(int(r["wretr"] or 0) for r in per_server.values())
        proxy_redispatches = sum(int(r["wredis"] or 0) for r in per_server.values())
        title = "rolling swaps: 3 replicas behind HAProxy, one SIGKILLed mid-swap"
        report_row(title, "requests ok", str(len(load.ok)))
        report_row(title, "UNAVAILABLE seen by the app (retried)", str(len(load.unavailable)))
        report_row(title, "failed otherwise", str(len(load.failed)))
        report_row(
            title, "HAProxy retries / redispatches", f"{proxy_retries} / {proxy_redispatches}"
        )
        report_row(title, "swaps (NOT_SERVING windows)", str(len(windows)))
        report_row(title, "replica start / 5 swaps (s)", f"{start_s:.0f} / {swaps_s:.0f}")
        report_row(
            title, "NOT_SERVING per swap (s)",
            " ".join(f"{b - a:.2f}" for a, b, _ in windows),
        )  # fmt: skip
    finally:
        for c in clients:
            c.close()
        if proxy is not None:
            proxy.terminate()
            proxy.wait(timeout=10)
        for s in servers:
            stop_server(s)

"""Shared fixtures: real parts only.

- `tiny_model`: a random-init policy built locally (no downloads), once per session.
- `redis_server`: a real redis-server on an ephemeral loopback port with AOF. A module
  that sets `pytestmark = pytest.mark.redis_kinds("single", "cluster")` runs its tests
  twice, the second time with `redis_server` a real 3-master Redis Cluster
  (`redis_cluster`, tests/redis_cluster.py; same `.url` and `.client()`).
- `server`: the real instructloop server as a subprocess (real vLLM engine on CPU) on
  `redis_server`: one on the single Redis, and one on the cluster for the tests that a
  redis_kinds mark runs there too (tests/test_feedback.py); each started once per session.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from instructloop.process import die_with_parent
from instructloop.redis_embedded import EmbeddedRedis, free_port

SERVER_START_TIMEOUT_S = 300
# The clients' default credential is $INSTRUCTLOOP_TOKEN, else DATA_DIR/user-token: a
# developer's own (from `instructloop up` in ./data) must not reach the test servers.
os.environ.pop("INSTRUCTLOOP_TOKEN", None)
os.environ["INSTRUCTLOOP_DATA_DIR"] = tempfile.mkdtemp(prefix="instructloop-tests-")
# Figures a test measured, printed as tables at the end of the run: {title: rows}.
REPORT_TABLES: dict[str, list[tuple[str, ...]]] = {}


def report_row(title: str, *cells: str) -> None:
    REPORT_TABLES.setdefault(title, []).append(cells)


def pytest_terminal_summary(terminalreporter):
    for title, rows in REPORT_TABLES.items():
        terminalreporter.write_sep("-", title)
        for row in rows:
            terminalreporter.write_line(" | ".join(row))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from instructloop.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Training tests opt in: on 2 shared cores one intra-op thread is several times
    faster than two under load."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def saved_dtypes(checkpoint: Path) -> tuple[set[str], str]:
    """The tensor dtypes in a checkpoint's model.safetensors (read from its header) and the
    dtype its config.json names: what the server will load."""
    from safetensors import safe_open

    with safe_open(checkpoint / "model.safetensors", framework="pt") as f:
        names = f.keys()  # safe_open has keys() but no __iter__
        tensors = {f.get_slice(k).get_dtype() for k in names}
    return tensors, json.loads((checkpoint / "config.json").read_text())["dtype"]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "redis_kinds(*kinds): run with redis_server as each kind (single, cluster)"
    )


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("redis_kinds")
    if marker is None or "redis_server" not in metafunc.fixturenames:
        return
    kinds = list(marker.args)
    if "queue_server" in metafunc.fixturenames:
        kinds = ["single"]  # its own vLLM server: not started once more per kind
    metafunc.parametrize("redis_server", kinds, indirect=True, scope="session")


@pytest.fixture(scope="session")
def single_redis(tmp_path_factory):
    r = EmbeddedRedis(tmp_path_factory.mktemp("redis"), port=free_port()).start()
    yield r
    r.stop()


@pytest.fixture(scope="session")
def redis_server(request):
    """The single Redis, or the cluster where a redis_kinds mark asks for it; each is
    started once per session whichever tests ask."""
    kind = getattr(request, "param", "single")
    return request.getfixturevalue("redis_cluster" if kind == "cluster" else "single_redis")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A real Redis Cluster of 3 masters (skipped without redis-server 7)."""
    from redis_cluster import RedisClusterNodes, redis7

    binary = redis7()
    if binary is None:
        pytest.skip("a Redis Cluster needs redis-server 7 (apt-get install redis-server)")
    cluster = RedisClusterNodes(tmp_path_factory.mktemp("cluster"), binary).start()
    yield cluster
    cluster.stop()


@dataclass
class ServerProcess:
    target: str
    metrics_url: str
    proc: subprocess.Popen
    log_path: Path
    prefix: str

    def metric(self, name: str) -> float:
        """Sum of a Prometheus sample over all its labels."""
        text = urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def wait_serving(target: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{log_path.read_text()[-5000:]}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"server not SERVING after {timeout}s:\n{log_path.read_text()[-5000:]}")


def launch_server(model: Path, redis_url: str, workdir: Path, prefix: str, *extra: str):
    """Start a server process; wait for it with wait_serving(server).

    Servers start in open mode (--open) and without rate limits unless `extra` says
    otherwise (--no-open; the last option wins): these tests drive serving and feedback
    with user ids of their choosing, in bursts; tests/test_auth.py runs the default,
    authenticated and rate-limited server."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, metrics_port = free_port(), free_port()
    log_path = workdir / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable, "-m", "instructloop.cli", "serve",
        "--model", str(model),
        "--redis-url", redis_url,
        "--redis-prefix", prefix,
        "--port", str(port),
        "--metrics-port", str(metrics_port),
        "--data-dir", str(workdir),
        "--log-format", "text",
        *([] if "--no-open" in extra else ["--open"]),
        "--rate-limit-samples", "", "--rate-limit-feedback", "",
        *extra,
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        # The server dies with the test process, even if pytest itself is killed.
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent
        )
    return ServerProcess(
        f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", proc, log_path, prefix
    )


def start_servers(model: Path, redis_url: str, workdirs: list[Path], prefix: str, *extra: str):
    """Start several replicas at once (their engines load in parallel)."""
    servers = [launch_server(model, redis_url, w, prefix, *extra) for w in workdirs]
    try:
        for s in servers:
            wait_serving(s.target, s.proc, s.log_path, SERVER_START_TIMEOUT_S)
    except BaseException:
        for s in servers:
            stop_server(s)
        raise
    return servers


def stop_server(server: ServerProcess) -> int:
    """SIGTERM, then SIGKILL after a minute. vLLM's engine processes go too: a server
    stopped while still starting (before its signal handlers) would leave them behind."""
    import psutil

    try:
        engine = psutil.Process(server.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        engine = []
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    for p in engine:  # psutil checks it is still the same process before it signals
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    return server.proc.returncode


def _session_server(tiny_model, redis, tmp_path_factory):
    (s,) = start_servers(tiny_model, redis.url, [tmp_path_factory.mktemp("server")], "itest")
    yield s
    code = stop_server(s)
    assert code == 0, f"server did not stop cleanly (exit {code}):\n{s.log_tail()}"


@pytest.fixture(scope="session")
def single_server(tiny_model, single_redis, tmp_path_factory):
    yield from _session_server(tiny_model, single_redis, tmp_path_factory)


@pytest.fixture(scope="session")
def cluster_server(tiny_model, redis_cluster, tmp_path_factory):
    yield from _session_server(tiny_model, redis_cluster, tmp_path_factory)


@pytest.fixture(scope="session")
def server(request, redis_server):
    """The server on redis_server: the single Redis's, or the cluster's where a
    redis_kinds mark runs a test on the cluster too (each server started once)."""
    from redis_cluster import RedisClusterNodes

    cluster = isinstance(redis_server, RedisClusterNodes)
    return request.getfixturevalue("cluster_server" if cluster else "single_server")


@pytest.fixture
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        yield ch

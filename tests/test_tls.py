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

"""The `instructloop` client commands, run as a user would, against the real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from instructloop.keys import DATA_FIELD, Keys
from instructloop.v1 import records_pb2


def run_cli(*args: str, target: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, INSTRUCTLOOP_TARGET=target, COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "instructloop.cli", *args],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip


def test_generate_then_rank_with_a_tie(server, redis_server):
    out = run_cli("generate", "--n", "4", "--max-tokens", "6", "--json", "reverse: cli",
                  target=server.target)  # fmt: skip
    assert out.returncode == 0, out.stderr
    response = json.loads(out.stdout)
    ids = [s["sample_id"] for s in response["samples"]]
    assert len(ids) == 4 and response["version"] == "v0"

    out = run_cli("feedback", "rank", response["prompt_id"], ids[2], f"{ids[0]}={ids[1]}", ids[3],
                  "--user", "cli-user", target=server.target)  # fmt: skip
    assert out.returncode == 0, out.stderr
    feedback_id = out.stdout.split("feedback_id")[1].split()[0]

    entries = redis_server.client().xrange(Keys(server.prefix).feedback_stream)
    stored = {
        r.feedback_id: r
        for r in (records_pb2.FeedbackRecord.FromString(f[DATA_FIELD]) for _, f in entries)
    }
    tiers = [list(t.sample_ids) for t in stored[feedback_id].feedback.ranking.tiers]
    assert tiers == [[ids[2]], [ids[0], ids[1]], [ids[3]]]
    assert stored[feedback_id].feedback.user_id == "cli-user"


def test_readable_output_names_prompt_and_samples(server):
    out = run_cli("generate", "--n", "2", "--max-tokens", "4", "sort: b a", target=server.target)
    assert out.returncode == 0, out.stderr
    assert "p-" in out.stdout and out.stdout.count("s-") >= 2 and "v0" in out.stdout

    out = run_cli("model", target=server.target)
    assert out.returncode == 0 and "v0" in out.stdout


def test_stream_prints_the_unary_text(server):
    """--stream asks for one message per engine step; the text is the unary call's."""
    common = ("generate", "--max-tokens", "8", "--seed", "5", "--temperature", "1")
    out = run_cli(*common, "--n", "2", "--json", "reverse: cli", target=server.target)
    assert out.returncode == 0, out.stderr
    unary = [s["text"] for s in json.loads(out.stdout)["samples"]]

    out = run_cli(*common, "--n", "2", "--json", "--stream", "reverse: cli", target=server.target)
    assert out.returncode == 0, out.stderr
    messages = [json.loads(line) for line in out.stdout.splitlines()]
    texts = ["", ""]
    for m in messages[:-1]:
        for d in m["step"]["deltas"]:
            texts[d.get("index", 0)] += d.get("text", "")
    assert texts == unary and "final" in messages[-1]

    out = run_cli(*common, "--n", "1", "--stream", "reverse: cli", target=server.target)
    assert out.returncode == 0, out.stderr
    out1 = run_cli(*common, "--n", "1", "--json", "reverse: cli", target=server.target)
    assert out.stdout.startswith(json.loads(out1.stdout)["samples"][0]["text"])


def test_errors_are_one_line_with_the_status_code(server):
    out = run_cli("feedback", "rank", "p-missing", "s-a", "s-b", "--user", "x",
                  target=server.target)  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.startswith("error: NOT_FOUND:") and "Traceback" not in out.stderr


def test_up_refuses_a_port_another_server_listens_on(tmp_path):
    """A server left running on the port answered up's health check before up's own
    server had failed to bind, and up then crashed reading a token its server never
    wrote. up checks its ports first and says which one is taken."""
    import time
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    other = grpc.server(futures.ThreadPoolExecutor(2), options=[("grpc.so_reuseport", 0)])
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, other)
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    try:
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "instructloop.cli", "up", "--data-dir", str(tmp_path / "d"),
             "--port", str(port), "--web-port", "0"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        other.stop(None)
    assert proc.returncode == 2, proc.stderr
    assert f"127.0.0.1:{port} (--port) is in use" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "d" / "redis").exists()  # nothing was started
    assert time.monotonic() - t0 < 60

"""One learner per deployment, against real learner processes and a real redis-server that
needs a password: the second learner waits, takes over when the first dies, and no log or
--help shows the password."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis as sync_redis

from instructloop.keys import Keys
from instructloop.process import die_with_parent
from instructloop.redact import redact_url
from instructloop.redis_embedded import EmbeddedRedis, free_port

PASSWORD = "s3cret-redis-pw"
PREFIX = "lease"
TTL_S = 3.0


@pytest.fixture
def locked_redis(tmp_path):
    r = EmbeddedRedis(tmp_path / "redis", port=free_port()).start()
    r.client().config_set("requirepass", PASSWORD)
    yield r, f"redis://:{PASSWORD}@127.0.0.1:{r.port}/0"
    r.stop()


def _learner(url: str, work: Path, name: str) -> tuple[subprocess.Popen, Path]:
    log = work / f"{name}.log"
    cmd = [
        sys.executable, "-m", "instructloop.cli", "learn",
        "--redis-url", url, "--redis-prefix", PREFIX,
        "--model-store", str(work / "store"), "--data-dir", str(work / name),
        "--lease-ttl-s", str(TTL_S), "--device", "cpu",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )  # fmt: skip
    return proc, log


def _wait_for(predicate, what: str, timeout: float = 120.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_second_learner_waits_and_takes_over_when_the_first_dies(locked_redis, tmp_path):
    redis, url = locked_redis
    client = sync_redis.Redis.from_url(url)
    key = Keys(PREFIX).learner_lease
    first, first_log = _learner(url, tmp_path, "first")
    second = None
    try:
        _wait_for(lambda: client.get(key) is not None, "the first learner's lease")
        holder = client.get(key).decode()
        second, second_log = _learner(url, tmp_path, "second")
        _wait_for(lambda: "another learner holds the lease" in second_log.read_text(),
                  "the second learner to wait")  # fmt: skip
        time.sleep(2 * TTL_S)  # more than a TTL: the first keeps renewing, the second waits
        assert client.get(key).decode() == holder
        assert second.poll() is None
        first.kill()  # no release: the lease must expire
        first.wait()
        took_over = _wait_for(lambda: "acquired" in second_log.read_text(), "the takeover")
        assert took_over <= TTL_S + 5
        assert client.get(key).decode() != holder
        # Consumers and the group exist once the second runs (it consumes the streams).
        _wait_for(lambda: client.exists(Keys(PREFIX).prompts_stream), "the consumer group")
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
    assert second.returncode == 0, second_log.read_text()[-3000:]
    logs = first_log.read_text() + second_log.read_text()
    assert PASSWORD not in logs
    assert redact_url(url) in logs


def test_no_help_shows_a_secret_from_the_environment():
    env = dict(
        os.environ,
        INSTRUCTLOOP_REDIS_URL=f"redis://:{PASSWORD}@redis.internal:6379/0",
        INSTRUCTLOOP_ADMIN_TOKEN="admin-s3cret-token",
    )
    for command in ("serve", "learn"):
        out = subprocess.run(
            [sys.executable, "-m", "instructloop.cli", command, "--help"],
            capture_output=True, text=True, env=env, timeout=120, check=True,
        ).stdout  # fmt: skip
        out = " ".join(out.split())  # argparse wraps the help text
        assert "--redis-url" in out
        assert PASSWORD not in out and "admin-s3cret-token" not in out
        assert "$INSTRUCTLOOP_REDIS_URL, set" in out


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://alice:pw@host:6380/1", "rediss://alice:***@host:6380/1"),
        ("redis://token@host", "redis://***@host"),
        ("redis://host:6379/0?password=pw&db=1", "redis://host:6379/0?password=***&db=1"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
        ("redis+cluster://:pw@a:7000,b:7001", "redis+cluster://:***@a:7000,b:7001"),
        (
            "redis+sentinel://:pw@s1:26379,s2:26379/main",
            "redis+sentinel://:***@s1:26379,s2:26379/main",
        ),
    ],
)
def test_redact_url_hides_every_password(url, shown):
    assert redact_url(url) == shown

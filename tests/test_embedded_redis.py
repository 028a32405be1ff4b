"""The embedded redis-server: the default when no Redis URL is configured."""

from __future__ import annotations

from instructloop.redis_embedded import EmbeddedRedis


def test_embedded_redis_persists_every_write_across_a_crash(tmp_path):
    r = EmbeddedRedis(tmp_path / "redis").start()
    assert r.url.startswith("unix://"), "the default listens on a socket in the data dir"
    client = r.client()
    assert client.config_get("appendfsync")["appendfsync"] == "always"
    client.xadd("s", {"data": b"acknowledged"})
    r.stop(kill=True)

    again = EmbeddedRedis(tmp_path / "redis").start()
    try:
        entries = again.client().xrange("s")
        assert [e[1][b"data"] for e in entries] == [b"acknowledged"]
        # A second start from the same directory reuses the live server.
        shared = EmbeddedRedis(tmp_path / "redis").start()
        assert shared.proc is None and shared.client().xlen("s") == 1
    finally:
        again.stop()

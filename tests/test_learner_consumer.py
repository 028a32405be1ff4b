"""The learner's dataset and stream consumer, against a real redis-server."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from instructloop.keys import DATA_FIELD, Keys
from instructloop.learner import synthetic
from instructloop.learner.consumer import ConsumerConfig, StreamConsumer
from instructloop.learner.dataset import (
    Dataset,
    DatasetConfig,
    dedup_prompts,
    dedup_prompts_by_scanning,
    user_split,
)
from instructloop.redis_embedded import EmbeddedRedis, free_port
from instructloop.secretfile import load_secret

SALT = b"a test split salt, not secret"  # the deployment's comes from its salt file


@pytest.fixture(params=["single", "cluster"])
def redis_server(request, tmp_path):
    """A fresh redis-server per test, or the session's Redis Cluster (conftest.py; every
    test uses its own prefix)."""
    if request.param == "cluster":
        yield request.getfixturevalue("redis_cluster")
        return
    server = EmbeddedRedis(tmp_path / "redis", port=free_port()).start()
    yield server
    server.stop()


def xadd(client, stream: str, rec) -> None:
    client.xadd(stream, {DATA_FIELD: rec.SerializeToString()})


# ---------------------------------------------------------------------------- dataset


def test_dataset_turns_every_judgement_kind_into_tiers(tmp_path):
    ds = Dataset(DatasetConfig(path=str(tmp_path / "d.sqlite3"), heldout_fraction=0.0))
    p = synthetic.prompt_record("p1", "q:", ["a", "b", "c", "d"], "u1")
    # Feedback that arrives before its prompt is kept and joins it later.
    early = synthetic.ranking_record("f-rank", p, [[2], [0, 3], [1]], "u1")
    assert ds.add_feedback(early)
    assert ds.comparisons() == []
    assert ds.add_prompt(p)
    assert not ds.add_prompt(p) and not ds.add_feedback(early)  # idempotent
    ds.add_feedback(synthetic.choice_record("f-choice", p, 1, 0, "u2"))
    ds.add_feedback(synthetic.rating_record("f-rate", p, [3.0, 1.0, 3.0, 2.0], "u3"))
    ds.add_feedback(synthetic.rating_record("f-tied", p, [2.0, 2.0, 2.0, 2.0], "u4"))
    ds.add_feedback(synthetic.demonstration_record("f-demo", p, "ideal", "u5"))

    by_id = {c.feedback_id: c for c in ds.comparisons()}
    assert set(by_id) == {"f-rank", "f-choice", "f-rate"}  # all-tied rating has no pair
    rank = by_id["f-rank"]
    assert list(zip(rank.answers, rank.tiers, strict=True)) == [
        ("c", 0),
        ("a", 1),
        ("d", 1),
        ("b", 2),
    ]
    assert (by_id["f-choice"].answers, by_id["f-choice"].tiers) == (["b", "a"], [0, 1])
    rate = by_id["f-rate"]
    assert sorted(zip(rate.tiers, rate.answers, strict=True)) == [
        (0, "a"),
        (0, "c"),
        (1, "d"),
        (2, "b"),
    ]
    [demo] = ds.demonstrations()
    assert (demo.prompt, demo.text) == ("q:", "ideal")
    assert ds.counts()["feedback"] == 5

    # A round trains on what arrived since the last one; re-deliveries are not "new".
    seen = ds.last_seq()
    ds.add_feedback(early)
    assert ds.last_seq() == seen and ds.comparisons(since_seq=seen) == []
    ds.add_feedback(synthetic.choice_record("f-new", p, 3, 1, "u6"))
    assert [c.feedback_id for c in ds.comparisons(since_seq=seen)] == ["f-new"]


def test_split_is_by_user_stable_and_dedup_drops_containing_prompts(tmp_path):
    ds = Dataset(
        DatasetConfig(path=str(tmp_path / "d.sqlite3"), heldout_fraction=0.3, split_salt=SALT)
    )
    data = synthetic.preference_data(60, k=2, n_users=40, seed=1)
    ds.add_batch([p for p, _ in data], [f for _, f in data])
    train, held = ds.comparisons("train"), ds.comparisons("heldout")
    assert len(train) + len(held) == 60 and held and train
    assert not {c.user_id for c in train} & {c.user_id for c in held}
    # Stable: a fresh process computes the same assignment from the hash alone.
    assert all(user_split(c.user_id, 0.3, ds.cfg.split_salt) == "heldout" for c in held)
    assert [user_split(f"u{i}", 0.0, SALT) for i in range(50)].count("heldout") == 0

    prompts = ["sort: b a", "please sort: b a now", "count: x y", "count: x y", "hello"]
    assert dedup_prompts(prompts) == ["sort: b a", "count: x y", "hello"]
    for i, text in enumerate(prompts):
        ds.add_prompt(synthetic.prompt_record(f"d{i}", text, ["x"], f"user{i}"))
    assert "please sort: b a now" not in ds.rl_prompts()
    assert {"sort: b a", "count: x y", "hello"} <= set(ds.rl_prompts())


def old_public_split(user_id: str, heldout_fraction: float) -> str:
    """The split before the secret: sha256 of a salt anyone could read in --help."""
    digest = hashlib.sha256(f"instructloop-split-v1\0{user_id}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction else "train"


def test_the_split_needs_the_secret_and_the_gate_samples_fresh_held_out_prompts(tmp_path):
    salt = load_secret(tmp_path / "split-salt", "split salt")  # as the learner reads it
    users = [f"user{i}" for i in range(200)]
    keyed = [user_split(u, 0.3, salt) for u in users]
    assert keyed != [old_public_split(u, 0.3) for u in users]
    assert 30 <= keyed.count("heldout") <= 90
    with pytest.raises(ValueError, match="split salt"):
        user_split("user1", 0.3, b"")
    unkeyed = Dataset(DatasetConfig(path=str(tmp_path / "u.sqlite3"), heldout_fraction=0.3))
    unkeyed.add_batch(*zip(*synthetic.preference_data(3, seed=0), strict=True))
    assert len(unkeyed.comparisons()) == 3  # without a split it works
    with pytest.raises(ValueError, match="split salt"):
        unkeyed.comparisons("heldout")

    ds = Dataset(
        DatasetConfig(path=str(tmp_path / "d.sqlite3"), heldout_fraction=0.3, split_salt=SALT)
    )
    data = synthetic.preference_data(80, k=2, n_users=40, seed=3)
    ds.add_batch([p for p, _ in data], [f for _, f in data])
    heldout = ds.rl_prompts("heldout")
    assert len(heldout) > 12
    first, second = ds.gate_prompts(6, round_no=1), ds.gate_prompts(6, round_no=2)
    assert len(first) == len(second) == 6 and set(first) | set(second) <= set(heldout)
    assert first != second  # a fresh sample each round, not the oldest six every time
    assert ds.gate_prompts(6, round_no=1) == first  # reproducible for the deployment
    other = Dataset(DatasetConfig(path=ds.cfg.path, heldout_fraction=0.3, split_salt=b"x" * 32))
    assert other.gate_prompts(6, round_no=1) != first  # another deployment, another sample
    assert ds.gate_prompts(len(heldout) + 5, round_no=1) == heldout  # fewer than asked: all

    # A user left out: none of its judgements or prompts, in either split.
    user = next(c.user_id for c in ds.comparisons("heldout"))
    mine = {p.prompt for p, _ in data if p.user_id == user}
    left = frozenset({user})
    assert all(c.user_id != user for c in ds.comparisons(exclude_users=left))
    assert not mine & set(ds.rl_prompts(exclude_users=left))
    assert not mine & set(ds.gate_prompts(100, round_no=1, exclude_users=left))
    assert mine & set(heldout)
    assert ds.feedback_counts()[user] == {"ranking": len(mine)}


# ---------------------------------------------------------------------------- consumer


def test_pending_entries_are_redelivered_after_a_crash_before_persist(tmp_path, redis_server):
    r, keys = redis_server.client(), Keys("t1")
    data = synthetic.preference_data(10, k=3, seed=2)
    for p, f in data:
        xadd(r, keys.prompts_stream, p)
        xadd(r, keys.feedback_stream, f)
    xadd(r, keys.feedback_stream, data[0][1])  # the same judgement logged twice
    r.xadd(keys.feedback_stream, {DATA_FIELD: b"\xff not a record"})

    cfg = ConsumerConfig(consumer="c1", block_ms=10)
    ds = Dataset(DatasetConfig(path=str(tmp_path / "d.sqlite3")))
    consumer = StreamConsumer(r, keys, ds, cfg)
    consumer.ensure_groups()
    # Crash right after delivery: entries are read but neither persisted nor acked.
    r.xreadgroup(cfg.group, "c1", {keys.prompts_stream: ">", keys.feedback_stream: ">"})
    assert r.xpending(keys.feedback_stream, cfg.group)["pending"] == 12
    assert ds.counts()["feedback"] == 0

    stats = StreamConsumer(r, keys, ds, cfg).drain()  # restart, same consumer name
    assert stats.new_prompts == 10 and stats.new_feedback == 10
    assert stats.duplicates == 1 and stats.dead_letters == 1
    assert sorted(ds.feedback_ids()) == sorted(f.feedback_id for _, f in data)
    assert len(ds.comparisons()) == 10
    for stream in keys.prompts_stream, keys.feedback_stream:
        assert r.xpending(stream, cfg.group)["pending"] == 0


KILLED_CONSUMER = textwrap.dedent(
    """
    import sys, time, pathlib
    from instructloop.keys import Keys
    from instructloop.redis_client import connect_sync
    from instructloop.learner.consumer import ConsumerConfig, StreamConsumer
    from instructloop.learner.dataset import Dataset, DatasetConfig

    url, prefix, db, marker = sys.argv[1:5]
    client = connect_sync(url, timeout_s=10)
    real_xack = client.xack

    def xack_then_hang(stream, group, *ids):
        # Persisted, not yet acknowledged: the worst moment to die.
        if stream.endswith("feedback"):
            pathlib.Path(marker).write_text(str(len(ids)))
            time.sleep(600)
        return real_xack(stream, group, *ids)

    client.xack = xack_then_hang
    cfg = ConsumerConfig(consumer="doomed", batch_size=8, block_ms=10)
    StreamConsumer(client, Keys(prefix), Dataset(DatasetConfig(path=db)), cfg).drain()
    """
)


def test_sigkill_between_persist_and_ack_loses_nothing_and_counts_nothing_twice(
    tmp_path, redis_server
):
    r, keys = redis_server.client(), Keys("t2")
    data = synthetic.preference_data(20, k=4, seed=3)
    for p, f in data:
        xadd(r, keys.prompts_stream, p)
        xadd(r, keys.feedback_stream, f)
    db, marker = tmp_path / "d.sqlite3", tmp_path / "persisted"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_CONSUMER, redis_server.url, "t2", str(db), str(marker)],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, "the consumer exited before reaching the ack"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    ds = Dataset(DatasetConfig(path=str(db)))
    persisted_before = ds.counts()["feedback"]
    assert persisted_before == int(marker.read_text()) == 8  # committed, never acked
    assert r.xpending(keys.feedback_stream, "learner")["pending"] == 8

    # A new learner (another name) takes the dead consumer's entries over with XAUTOCLAIM.
    cfg = ConsumerConfig(consumer="successor", claim_min_idle_ms=0, block_ms=10)
    stats = StreamConsumer(r, keys, ds, cfg).drain()
    assert stats.duplicates == 8  # re-delivered, stored once
    assert stats.new_feedback == 20 - persisted_before
    assert sorted(ds.feedback_ids()) == sorted(f.feedback_id for _, f in data)
    assert ds.counts()["feedback"] == 20 and ds.counts()["prompts"] == 20
    for stream in keys.prompts_stream, keys.feedback_stream:
        assert r.xpending(stream, "learner")["pending"] == 0


def test_run_loop_consumes_live_entries_and_stops_on_the_event(tmp_path, redis_server):
    r, keys = redis_server.client(), Keys("t3")
    ds = Dataset(DatasetConfig(path=str(tmp_path / "d.sqlite3")))
    consumer = StreamConsumer(r, keys, ds, ConsumerConfig(consumer="live", block_ms=50))
    reader = Dataset(ds.cfg)  # its own connection: the consumer thread writes through ds
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,))
    thread.start()
    try:
        for p, f in synthetic.preference_data(5, k=2, seed=4):
            xadd(r, keys.feedback_stream, f)  # the judgement can arrive first
            xadd(r, keys.prompts_stream, p)
        deadline = time.monotonic() + 30
        while reader.counts()["feedback"] < 5 or reader.counts()["prompts"] < 5:
            assert time.monotonic() < deadline, reader.counts()
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert len(reader.comparisons()) == 5
    assert r.xpending(keys.feedback_stream, "learner")["pending"] == 0


def test_trim_drops_only_acknowledged_entries_older_than_the_retention(tmp_path, redis_server):
    r, keys = redis_server.client(), Keys("t4")
    for p, f in synthetic.preference_data(10, k=2, seed=5):
        xadd(r, keys.prompts_stream, p)
        xadd(r, keys.feedback_stream, f)
    ds = Dataset(DatasetConfig(path=str(tmp_path / "d.sqlite3")))
    kept = ConsumerConfig(consumer="c", batch_size=4, block_ms=10)  # retention: one day
    consumer = StreamConsumer(r, keys, ds, kept)
    consumer.ensure_groups()
    consumer.poll(block_ms=0)  # 4 of each stored and acknowledged
    r.xreadgroup(kept.group, "crashed", {keys.feedback_stream: ">"}, count=4)  # 4 pending
    assert consumer.trim() == 0  # all of them are younger than a day

    cfg = ConsumerConfig(consumer="c", batch_size=4, block_ms=10, stream_retention_s=0,
                         claim_min_idle_ms=0)  # fmt: skip
    consumer = StreamConsumer(r, keys, ds, cfg)
    assert consumer.trim() == 4 + 4  # the acknowledged prompts and feedback
    assert r.xlen(keys.feedback_stream) == 6  # 4 pending + 2 never read stay
    assert r.xlen(keys.prompts_stream) == 6  # 6 never read stay
    consumer.drain()  # the pending ones are claimed and stored, the rest read
    assert ds.counts()["feedback"] == 10 and ds.counts()["prompts"] == 10
    assert consumer.trim() == 12
    assert r.xlen(keys.feedback_stream) == 0 and r.xlen(keys.prompts_stream) == 0


def test_dedup_matches_its_definition_on_prompts_full_of_containments():
    rng = random.Random(7)
    for _ in range(50):  # a 3-letter alphabet: short prompts are inside many long ones
        prompts = ["".join(rng.choice("ab ") for _ in range(rng.randint(1, 12)))
                   for _ in range(rng.randint(0, 60))]  # fmt: skip
        assert dedup_prompts(prompts) == dedup_prompts_by_scanning(prompts)

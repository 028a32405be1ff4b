"""The model store on real files: publish, verify, refuse corrupt or partial versions."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from instructloop import store as store_mod
from instructloop.registry import version_info
from instructloop.store import (
    Manifest,
    ModelStore,
    StoreFull,
    VersionCorrupt,
    VersionError,
    VersionMissing,
)

BIG = 2 * store_mod.CHUNK + 12345  # spans several hash chunks


def make_full(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (d / "model.safetensors").write_bytes(bytes(range(256)) * (BIG // 256 + 1))
    (d / "tok").mkdir()
    (d / "tok" / "tokenizer.json").write_text('{"version": "1.0"}')
    return d


def make_lora(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (d / "adapter_model.safetensors").write_bytes(b"\x00\x01lora-weights" * 100)
    return d


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "store")


@pytest.fixture
def v1(store, tmp_path) -> Manifest:
    return store.publish(
        make_full(tmp_path / "src-full"),
        "v1",
        parent="",
        kind="full",
        base_model="tiny-llama",
        metrics={"reward": 1},
        gate={"passed": True, "reason": "base"},
    )


def test_publish_full_and_lora(store, tmp_path, v1):
    src = tmp_path / "src-full"
    assert v1.id == "v1" and v1.kind == "full" and v1.parent == ""
    assert v1.base_model == "tiny-llama" and v1.metrics == {"reward": 1.0}
    assert v1.gate == {"passed": True, "reason": "base"}
    assert set(v1.files) == {"config.json", "model.safetensors", "tok/tokenizer.json"}
    # Per-file hashes are the real sha256 of the source bytes (multi-chunk file included).
    for rel, digest in v1.files.items():
        assert digest == hashlib.sha256((src / rel).read_bytes()).hexdigest()
    assert v1.checksum == store_mod.files_checksum(v1.files)
    assert (store.path("v1") / "tok" / "tokenizer.json").read_bytes() == (
        src / "tok" / "tokenizer.json"
    ).read_bytes()
    assert abs(v1.created - time.time()) < 60

    v2 = store.publish(
        make_lora(tmp_path / "src-lora"),
        "v2",
        parent="v1",
        kind="lora",
        base_model="v1",
        feedback_ids=["fb-1", "fb-2"],
    )
    assert v2.kind == "lora" and v2.parent == "v1" and v2.base_model == "v1"
    assert v2.feedback_ids == ["fb-1", "fb-2"] and v2.gate == {} and v2.metrics == {}
    assert set(v2.files) == {"adapter_config.json", "adapter_model.safetensors"}

    assert store.verify("v1") == v1
    assert store.verify("v2") == v2
    assert store.manifest("v2") == v2
    assert [m.id for m in store.list()] == ["v1", "v2"]
    assert json.loads((store.path("v2") / "manifest.json").read_text())["id"] == "v2"


def test_kind_must_match_contents(store, tmp_path):
    lora = make_lora(tmp_path / "src-lora")
    with pytest.raises(ValueError, match="config.json"):
        store.publish(lora, "v1", parent="", kind="full", base_model="x")
    with pytest.raises(ValueError, match="kind must be one of"):
        store.publish(lora, "v1", parent="", kind="qlora", base_model="x")
    with pytest.raises(ValueError, match="bad version id"):
        store.publish(lora, "../v1", parent="", kind="lora", base_model="x")
    assert store.list() == []
    assert not store.path("v1").exists()


def corrupt_truncate(d: Path) -> str:
    p = d / "model.safetensors"
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 2)
    return "model.safetensors"


def corrupt_flip_byte(d: Path) -> str:
    p = d / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[store_mod.CHUNK + 7] ^= 0xFF  # in the second chunk
    p.write_bytes(bytes(data))
    return "model.safetensors"


def corrupt_delete(d: Path) -> str:
    (d / "tok" / "tokenizer.json").unlink()
    return "tok/tokenizer.json"


def corrupt_extra(d: Path) -> str:
    (d / "stray.bin").write_bytes(b"not published")
    return "stray.bin"


@pytest.mark.parametrize(
    "corrupt", [corrupt_truncate, corrupt_flip_byte, corrupt_delete, corrupt_extra]
)
def test_verify_names_the_corrupt_file(store, v1, corrupt):
    store.verify("v1")
    name = corrupt(store.path("v1"))
    with pytest.raises(VersionCorrupt, match=name.replace(".", r"\.")):
        store.verify("v1")


def test_tampered_manifest_is_corrupt(store, v1):
    mpath = store.path("v1") / "manifest.json"
    data = json.loads(mpath.read_text())
    data["files"]["model.safetensors"] = "0" * 64  # edit a hash without the checksum
    mpath.write_text(json.dumps(data))
    with pytest.raises(VersionCorrupt, match="checksum"):
        store.verify("v1")
    mpath.write_text("{not json")
    with pytest.raises(VersionCorrupt, match="manifest.json"):
        store.verify("v1")


def test_missing_version(store, v1):
    with pytest.raises(VersionMissing):
        store.manifest("v9")
    with pytest.raises(VersionMissing):
        store.verify("v9")
    (store.path("v1") / "manifest.json").unlink()
    with pytest.raises(VersionMissing, match="manifest.json"):
        store.verify("v1")
    assert store.list() == []
    assert ModelStore(store.root / "nowhere").list() == []


def test_existing_version_is_refused_and_kept(store, tmp_path, v1):
    other = make_lora(tmp_path / "src-lora")
    with pytest.raises(VersionError, match="already exists"):
        store.publish(other, "v1", parent="", kind="lora", base_model="v0")
    assert store.verify("v1") == v1
    assert store.list() == [v1]
    assert [p.name for p in store.root.iterdir()] == ["v1"]  # no tmp left behind


def test_concurrent_publish_of_same_id_loses_cleanly(store, tmp_path, monkeypatch):
    """Another publisher wins the race between the existence check and the rename."""
    winner_src = make_lora(tmp_path / "winner")
    real_rename = os.rename
    winner: list[Manifest] = []

    def rename_after_winner(src, dst):
        monkeypatch.setattr(store_mod.os, "rename", real_rename)
        winner.append(store.publish(winner_src, "v1", parent="", kind="lora", base_model="v0"))
        return real_rename(src, dst)

    monkeypatch.setattr(store_mod.os, "rename", rename_after_winner)
    with pytest.raises(VersionError, match="already exists"):
        store.publish(make_full(tmp_path / "loser"), "v1", parent="", kind="full", base_model="b")
    assert store.verify("v1") == winner[0] and winner[0].kind == "lora"
    assert [p.name for p in store.root.iterdir()] == ["v1"]


def test_failed_rename_leaves_nothing(store, tmp_path, v1, monkeypatch):
    def boom(src, dst):
        raise OSError(5, "I/O error on rename")

    monkeypatch.setattr(store_mod.os, "rename", boom)
    with pytest.raises(OSError, match="I/O error"):
        store.publish(
            make_lora(tmp_path / "src-lora"), "v2", parent="v1", kind="lora", base_model="v1"
        )
    assert not store.path("v2").exists()
    assert store.list() == [v1]
    assert sorted(p.name for p in store.root.iterdir()) == ["v1"]


def test_source_file_vanishing_midway_leaves_nothing(store, tmp_path, v1):
    src = make_full(tmp_path / "src2")
    (src / "zz-weights.bin").symlink_to(tmp_path / "deleted-before-copy")  # dangling
    with pytest.raises(FileNotFoundError):
        store.publish(src, "v2", parent="v1", kind="full", base_model="tiny-llama")
    assert not store.path("v2").exists()
    assert store.list() == [v1]
    assert sorted(p.name for p in store.root.iterdir()) == ["v1"]


CRASH_SCRIPT = """
import os, signal, sys
from instructloop import store
def die(src, dst):
    os.kill(os.getpid(), signal.SIGKILL)
store.os.rename = die
store.ModelStore(sys.argv[1]).publish(
    store.Path(sys.argv[2]), "v2", parent="v1", kind="full", base_model="tiny-llama")
"""


def test_killed_publish_leaves_tmp_that_gc_removes(store, tmp_path, v1):
    """A publisher SIGKILLed just before its rename: no v2, list() unaffected, gc cleans."""
    src = make_full(tmp_path / "src2")
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(store.root), str(src)])
    assert proc.returncode == -signal.SIGKILL
    tmps = [p for p in store.root.iterdir() if p.name.startswith(".tmp-v2-")]
    assert len(tmps) == 1 and (tmps[0] / "manifest.json").exists()  # got as far as the rename
    assert not store.path("v2").exists()
    assert store.list() == [v1]

    assert store.gc_tmp(older_than_s=3600) == 0  # fresh: may be a publish in progress
    old = time.time() - 7200
    for p in [tmps[0], *tmps[0].rglob("*")]:
        os.utime(p, (old, old))
    assert store.gc_tmp(older_than_s=3600) == 1
    assert sorted(p.name for p in store.root.iterdir()) == ["v1"]
    # The id is free again: a retried publish succeeds.
    assert store.verify(store.publish(src, "v2", parent="v1", kind="full", base_model="t").id)


def test_manifest_json_round_trip(v1):
    text = v1.to_json()
    again = Manifest.from_json(text)
    assert again == v1
    assert again.to_json() == text
    data = json.loads(text)
    data["added_by_a_newer_writer"] = 1
    assert Manifest.from_json(json.dumps(data)) == v1
    del data["checksum"]
    with pytest.raises(ValueError, match="checksum"):
        Manifest.from_json(json.dumps(data))


def test_a_manifest_names_who_its_round_left_out_and_old_manifests_still_load(store, tmp_path, v1):
    m = store.publish(
        make_full(tmp_path / "src-2"), "v2", parent="v1", kind="full", base_model="tiny-llama",
        feedback_ids=["f1"], excluded_users=["mallory", "eve"], excluded_feedback=7,
    )  # fmt: skip
    assert (m.excluded_users, m.excluded_feedback) == (["eve", "mallory"], 7)
    assert store.verify("v2") == m
    info = version_info(m, store)  # the registry entry, as the learner registers it
    assert list(info.excluded_users) == ["eve", "mallory"] and info.excluded_feedback == 7
    # A manifest written before the fields existed reads as excluding nobody.
    data = json.loads(v1.to_json())
    del data["excluded_users"], data["excluded_feedback"]
    old = Manifest.from_json(json.dumps(data))
    assert (old.excluded_users, old.excluded_feedback) == ([], 0) and old == v1
    assert not version_info(old, store).excluded_users


def test_a_publish_over_the_bound_fails_clearly_and_leaves_nothing(tmp_path, v1, store):
    bounded = ModelStore(store.root, max_bytes=store.size_bytes() + BIG // 2)
    with pytest.raises(StoreFull, match="bound of"):
        bounded.publish(make_full(tmp_path / "src2"), "v2", parent="v1", kind="full",
                        base_model="tiny-llama")  # fmt: skip
    assert sorted(p.name for p in store.root.iterdir()) == ["v1"]
    assert store.verify("v1").checksum == v1.checksum


@pytest.mark.redis_kinds("single", "cluster")
def test_retention_keeps_the_newest_the_alias_targets_and_what_loras_need(tmp_path, redis_server):
    import asyncio

    from instructloop.keys import Keys
    from instructloop.redis_client import connect_async
    from instructloop.registry import Registry, RegistryError, prune_versions, publish_version

    store = ModelStore(tmp_path / "store")

    async def go():
        client = connect_async(redis_server.url, timeout_s=10)
        registry = Registry(client, Keys("retention"))
        try:
            ids = []
            for i in range(5):  # v1..v5, full
                src = make_full(tmp_path / f"full{i}")
                info = await publish_version(registry, store, str(src), kind="full",
                                             parent="", base_model="tiny")  # fmt: skip
                ids.append(info.id)
            lora = await publish_version(registry, store, str(make_lora(tmp_path / "lora")),
                                         kind="lora", parent=ids[1], base_model=ids[1])  # fmt: skip
            await registry.promote(ids[0], "op")
            await registry.promote(ids[3], "op")  # current v4, previous v1
            with pytest.raises(RegistryError, match="'current'"):
                await registry.forget(ids[3], "op", "test")
            removed = await prune_versions(registry, store, keep=2)
            left = sorted(i.id for i in await registry.list())
            prunes = [a.from_version for a in await registry.audit_log() if a.action == "prune"]
            return ids, lora.id, removed, left, prunes
        finally:
            await client.aclose()

    ids, lora, removed, left, prunes = asyncio.run(go())
    # Newest two: the LoRA and v5; v4 and v1 are alias targets; v2 is the LoRA's weights.
    assert removed == [ids[2]]
    assert left == sorted([ids[0], ids[1], ids[3], ids[4], lora])
    assert prunes == [ids[2]]
    assert not store.path(ids[2]).exists() and store.verify(ids[1])
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp-")]

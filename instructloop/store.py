"""The model store: immutable, checksummed policy versions on a shared directory.

This module owns the on-disk contract that the learner writes and the server reads. The
store is a directory (a shared volume in a cluster) holding one directory per version:

    ROOT/<version_id>/          an HF-format checkpoint (kind "full") or a peft LoRA
                                adapter (kind "lora"), plus manifest.json
    ROOT/.tmp-<id>-<random>/    a publish in progress, or left by one that crashed

A version appears under its id only once it is complete: publish writes everything into a
.tmp- directory, fsyncs it, then renames it into place (one atomic step on one
filesystem). Versions are never modified or replaced. Readers check a version with
verify() before loading it; a missing, partial or corrupt version raises a VersionError.

Stdlib only: both the server and the learner import it, so it must not pull in torch,
vllm or any training code. Registering versions and moving aliases (Redis) live elsewhere.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
CHUNK = 1 << 20  # 1 MiB: files are hashed and copied in chunks, never read whole
KINDS = {"full": "config.json", "lora": "adapter_config.json"}  # kind -> file it requires
_VERSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass
class Manifest:
    """What a version is, where it came from and how to check it. Stored as manifest.json."""

    id: str
    """The version id, e.g. "v3"; also the directory name."""
    parent: str
    """The version it was trained from ("" for the base)."""
    created: float
    """Unix time of the publish."""
    kind: str
    """"full" (HF checkpoint) or "lora" (peft adapter)."""
    base_model: str
    """lora: the version id of the full weights it applies to; full: the original base model."""
    feedback_ids: list[str] = field(default_factory=list)
    """The feedback that trained it."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Training and evaluation measures."""
    gate: dict = field(default_factory=dict)
    """The promotion gate's verdict: {"passed": bool, "reason": str, ...measures}."""
    checksum: str = ""
    """sha256 over the sorted (relative path, file sha256) pairs; see files_checksum()."""
    files: dict[str, str] = field(default_factory=dict)
    """Relative POSIX path -> sha256 of every file in the version except manifest.json."""
    excluded_users: list[str] = field(default_factory=list)
    """Users whose feedback the round that made it left out (suspended or flagged)."""
    excluded_feedback: int = 0
    """How many judgements of theirs that was (every kind, training and held-out)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse a manifest; ValueError if it is not an object with every field that
        existed from the start (the exclusion fields came later: an older manifest lacks
        them and reads as excluding nobody).

        Unknown keys are ignored so that an older reader accepts a newer manifest.
        """
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("manifest is not a JSON object")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data and n not in _ADDED_LATER]
        if missing:
            raise ValueError(f"manifest lacks field(s) {', '.join(missing)}")
        m = cls(**{n: data[n] for n in names if n in data})
        m.created = float(m.created)
        m.feedback_ids = [str(x) for x in m.feedback_ids]
        m.excluded_users = [str(x) for x in m.excluded_users]
        m.excluded_feedback = int(m.excluded_feedback)
        m.metrics = {str(k): float(v) for k, v in m.metrics.items()}
        m.files = {str(k): str(v) for k, v in m.files.items()}
        return m


_ADDED_LATER = ("excluded_users", "excluded_feedback")  # optional when reading a manifest


class VersionError(Exception):
    """A version cannot be published or used."""


class VersionMissing(VersionError):
    """No such version directory, or it has no manifest."""


class StoreFull(VersionError):
    """Publishing would overflow the store's size bound or its volume."""


class VersionCorrupt(VersionError):
    """Files missing or extra, or a checksum mismatch; the message names the file."""


def files_checksum(files: dict[str, str]) -> str:
    """sha256 over "path\\0sha256\\n" for every (path, sha256) pair, sorted by path."""
    h = hashlib.sha256()
    for rel, digest in sorted(files.items()):
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _walk_files(root: Path) -> Iterable[str]:
    """Relative POSIX paths of every file under root (symlinks followed), manifest excluded."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST:
                yield rel


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_hash_fsync(src: Path, dst: Path) -> str:
    """Copy src to dst in chunks, fsync dst, and return the sha256 of the bytes written."""
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while chunk := fin.read(CHUNK):
            h.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return h.hexdigest()


class ModelStore:
    """A directory of immutable versions. Safe to share between processes and machines."""

    def __init__(self, root: str | Path, max_bytes: int = 0):
        self.root = Path(root)
        self.max_bytes = max_bytes  # 0: bounded by the volume only

    def size_bytes(self) -> int:
        """Bytes of every file under the store (versions and leftovers)."""
        if not self.root.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def _check_room(self, src_dir: Path, version_id: str) -> None:
        need = sum((src_dir / rel).stat().st_size for rel in _walk_files(src_dir))
        free = shutil.disk_usage(self.root).free
        if need + (1 << 20) > free:
            raise StoreFull(
                f"cannot publish {version_id}: it needs {need / 2**20:.1f} MiB and the store's "
                f"volume has {free / 2**20:.1f} MiB free; free space or lower --keep-versions"
            )
        held = self.size_bytes() if self.max_bytes else 0
        if self.max_bytes and held + need > self.max_bytes:
            raise StoreFull(
                f"cannot publish {version_id}: the store would exceed its bound of "
                f"{self.max_bytes / 2**20:.1f} MiB (it holds {held / 2**20:.1f} "
                f"MiB, the version needs {need / 2**20:.1f} MiB); lower --keep-versions or "
                "raise the bound"
            )

    def delete(self, version_id: str) -> None:
        """Remove a version (retention): renamed aside first, so it disappears at once and a
        crash mid-delete leaves a .tmp- directory for gc_tmp, never a partial version."""
        src = self.path(version_id)
        if not src.exists():
            return
        aside = self.root / f"{TMP_PREFIX}deleted-{version_id}-{secrets.token_hex(6)}"
        os.rename(src, aside)
        _fsync_dir(self.root)
        shutil.rmtree(aside, ignore_errors=True)

    def path(self, version_id: str) -> Path:
        """The directory of a version (whether or not it exists)."""
        if not _VERSION_ID.fullmatch(version_id):
            raise ValueError(
                f"bad version id {version_id!r}: use letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        return self.root / version_id

    # ---- writing -------------------------------------------------------------------

    def publish(
        self,
        src_dir: Path,
        version_id: str,
        *,
        parent: str,
        kind: str,
        base_model: str,
        feedback_ids: Iterable[str] = (),
        metrics: dict[str, float] | None = None,
        gate: dict | None = None,
        excluded_users: Iterable[str] = (),
        excluded_feedback: int = 0,
    ) -> Manifest:
        """Copy src_dir into the store as version_id and return its manifest.

        Raises ValueError for a bad kind or source, VersionError if the version exists.
        The version appears all at once (rename of a fsynced .tmp- directory); if this
        fails or the process dies, ROOT/<version_id> does not exist.
        """
        src_dir = Path(src_dir)
        dst = self.path(version_id)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
        if not src_dir.is_dir():
            raise ValueError(f"source {src_dir} is not a directory")
        if not (src_dir / KINDS[kind]).is_file():
            raise ValueError(
                f"kind {kind!r} needs {KINDS[kind]} at the top of {src_dir}; it is missing"
            )
        if (src_dir / MANIFEST).exists():
            raise ValueError(f"{src_dir} already holds a {MANIFEST}; the store writes it")
        if os.path.lexists(dst):
            raise VersionError(f"version {version_id} already exists; versions are immutable")

        self.root.mkdir(parents=True, exist_ok=True)
        self._check_room(src_dir, version_id)
        tmp = self.root / f"{TMP_PREFIX}{version_id}-{secrets.token_hex(6)}"
        tmp.mkdir()
        try:
            files: dict[str, str] = {}
            for rel in _walk_files(src_dir):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                files[rel] = _copy_hash_fsync(src_dir / rel, tmp / rel)
            manifest = Manifest(
                id=version_id,
                parent=parent,
                created=time.time(),
                kind=kind,
                base_model=base_model,
                feedback_ids=[str(x) for x in feedback_ids],
                metrics={k: float(v) for k, v in (metrics or {}).items()},
                gate=dict(gate or {}),
                checksum=files_checksum(files),
                files=files,
                excluded_users=sorted(str(u) for u in excluded_users),
                excluded_feedback=int(excluded_feedback),
            )
            with open(tmp / MANIFEST, "x", encoding="utf-8") as f:
                f.write(manifest.to_json())
                f.flush()
                os.fsync(f.fileno())
            for dirpath, _, _ in os.walk(tmp, topdown=False):
                _fsync_dir(Path(dirpath))  # deepest first; tmp itself last
            try:
                # Fails with ENOTEMPTY/EEXIST if a concurrent publish of the same id won.
                os.rename(tmp, dst)
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise VersionError(
                        f"version {version_id} already exists; versions are immutable"
                    ) from e
                raise
            _fsync_dir(self.root)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno == errno.ENOSPC:
                raise StoreFull(f"cannot publish {version_id}: the store's volume is full") from e
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("published %s (%s, %d files) from %s", version_id, kind, len(files), src_dir)
        return manifest

    def gc_tmp(self, older_than_s: float = 3600) -> int:
        """Remove .tmp- directories untouched for older_than_s seconds; return how many.

        "Untouched" is the newest mtime in the directory tree, so a publish still
        copying a large file is not removed from under itself.
        """
        if not self.root.is_dir():
            return 0
        removed = 0
        now = time.time()
        for entry in self.root.iterdir():
            if not entry.name.startswith(TMP_PREFIX) or not entry.is_dir():
                continue
            try:
                newest = max(
                    [entry.stat().st_mtime]
                    + [p.stat().st_mtime for p in entry.rglob("*") if not p.is_symlink()]
                )
            except FileNotFoundError:
                continue  # renamed into place or removed meanwhile
            if now - newest >= older_than_s:
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
                log.info("removed leftover %s", entry.name)
        return removed

    # ---- reading -------------------------------------------------------------------

    def manifest(self, version_id: str) -> Manifest:
        """Read a version's manifest without hashing its files."""
        d = self.path(version_id)
        try:
            text = (d / MANIFEST).read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):
            what = "no such version" if not d.is_dir() else f"no {MANIFEST}"
            raise VersionMissing(f"version {version_id}: {what} in {self.root}") from None
        try:
            m = Manifest.from_json(text)
        except (ValueError, TypeError, AttributeError) as e:
            raise VersionCorrupt(f"version {version_id}: unreadable {MANIFEST}: {e}") from e
        if m.id != version_id:
            raise VersionCorrupt(f"version {version_id}: {MANIFEST} names version {m.id!r}")
        return m

    def verify(self, version_id: str) -> Manifest:
        """Re-hash every file against the manifest; return it, or raise VersionError."""
        m = self.manifest(version_id)
        d = self.path(version_id)
        if files_checksum(m.files) != m.checksum:
            raise VersionCorrupt(
                f"version {version_id}: {MANIFEST} checksum does not match its file list"
            )
        if KINDS.get(m.kind) not in m.files:
            raise VersionCorrupt(f"version {version_id}: kind {m.kind!r} lacks its config file")
        on_disk = set(_walk_files(d))
        if missing := sorted(set(m.files) - on_disk):
            raise VersionCorrupt(f"version {version_id}: file(s) missing: {', '.join(missing)}")
        if extra := sorted(on_disk - set(m.files)):
            raise VersionCorrupt(
                f"version {version_id}: file(s) not in the manifest: {', '.join(extra)}"
            )
        for rel, want in sorted(m.files.items()):
            got = sha256_file(d / rel)
            if got != want:
                raise VersionCorrupt(
                    f"version {version_id}: file {rel} sha256 mismatch "
                    f"(manifest {want[:12]}…, on disk {got[:12]}…)"
                )
        return m

    def list(self) -> list[Manifest]:
        """Manifests of every complete version, oldest first (files are not re-hashed)."""
        if not self.root.is_dir():
            return []
        out = []
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or not _VERSION_ID.fullmatch(entry.name):
                continue
            try:
                out.append(self.manifest(entry.name))
            except VersionError as e:
                log.warning("skipping %s: %s", entry.name, e)
        return sorted(out, key=lambda m: (m.created, m.id))

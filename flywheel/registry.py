"""A registry of trained model versions, generic over what is versioned (``kind``: "reward_model",
"policy"); ``open_registry`` opens the one of a kind in its folder of the data directory.

Disk is the source of truth, Redis the fast index (the layout and key names are contracts:
``flywheel.contracts.artifacts`` and ``flywheel.contracts.keys``):

- ``{root_dir}/v{N}/`` holds a version's artifacts (safetensors only) and ``manifest.json``. A version
  is written into a temporary folder in ``root_dir`` and renamed into place (``os.replace``), so a
  writer killed midway leaves no ``v{N}`` folder, only a ``.tmp-*`` one that is ignored and swept.
  Every status change rewrites the manifest (temp file + rename) before Redis is updated.
- Redis: ``flywheel:registry:{kind}:versions`` (hash N → manifest JSON), ``...:current`` (the
  current version number; absent = none), ``...:next`` (version allocator), ``...:audit`` (a stream
  of every change: action, who, when, from, to, why). Each change is PUBLISHed on
  ``flywheel:registry:{kind}`` so followers (servers, for the policy) can react without polling.
- ``rebuild_from_disk()`` recreates the Redis side from the manifests.
- ``manifest["files"]`` lists every artifact file with its SHA-256 (``write_version`` fills it in);
  ``flywheel.contracts.artifacts.verify_version()`` checks them before anything loads a version, so a truncated or corrupt
  artifact is refused with a clear error instead of being served or trained on.

Statuses: ``candidate`` (written, not yet decided), ``current``, ``superseded`` (was current until a
newer version was promoted), ``rejected`` (failed its gate; kept with its figures), ``rolled_back``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import redis as redis_lib

from flywheel.contracts.artifacts import MANIFEST, VERSION_FOLDER, registry_folder, sha256_file, version_folder
from flywheel.contracts.keys import (registry_audit_key, registry_channel, registry_current_key, registry_next_key,
                                     registry_versions_key)
from flywheel.contracts.redis_text import text

log = logging.getLogger(__name__)

CANDIDATE, CURRENT, SUPERSEDED, REJECTED, ROLLED_BACK = "candidate", "current", "superseded", "rejected", "rolled_back"
STATUSES = (CANDIDATE, CURRENT, SUPERSEDED, REJECTED, ROLLED_BACK)


@dataclass
class VersionRecord:
    version: int
    kind: str
    status: str
    parent: int | None
    created_at: float
    figures: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, manifest: dict) -> "VersionRecord":
        return cls(version=int(manifest["version"]), kind=manifest["kind"], status=manifest["status"],
                   parent=manifest.get("parent"), created_at=float(manifest.get("created_at", 0.0)),
                   figures=dict(manifest.get("figures", {})), manifest=manifest)


def _write_json_atomically(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VersionRegistry:
    """Versions of one ``kind`` of model, their statuses, and the ``current`` pointer."""

    def __init__(self, client: redis_lib.Redis, kind: str, root_dir: Path) -> None:
        self.client = client
        self.kind = kind
        self.root_dir = Path(root_dir)
        self.channel = registry_channel(kind)
        self.versions_key = registry_versions_key(kind)
        self.current_key = registry_current_key(kind)
        self.next_key = registry_next_key(kind)
        self.audit_key = registry_audit_key(kind)

    # ---- reading ----
    def path(self, version: int) -> Path:
        return version_folder(self.root_dir, version)

    def get(self, version: int) -> VersionRecord | None:
        raw = self.client.hget(self.versions_key, str(version))
        return VersionRecord.from_manifest(json.loads(raw)) if raw else None

    def versions(self) -> list[VersionRecord]:
        records = [VersionRecord.from_manifest(json.loads(v)) for v in self.client.hgetall(self.versions_key).values()]
        return sorted(records, key=lambda r: r.version)

    def current_version(self) -> int:
        """The current version number, 0 when there is none."""
        raw = self.client.get(self.current_key)
        return int(raw) if raw else 0

    def current(self) -> VersionRecord | None:
        version = self.current_version()
        return self.get(version) if version else None

    def audit(self, count: int = 100) -> list[dict]:
        entries = self.client.xrevrange(self.audit_key, count=count)
        return [{text(k): text(v) for k, v in fields.items()} | {"id": text(i)} for i, fields in entries]

    # ---- writing a version ----
    def allocate_version(self) -> int:
        """A fresh version number (never reused, also not after a rebuild: at least max on disk + 1)."""
        on_disk = max(self._disk_versions(), default=0)
        while True:
            version = int(self.client.incr(self.next_key))
            if version > on_disk:
                return version
            self.client.set(self.next_key, on_disk)

    def write_version(self, write_artifacts: Callable[[Path], None], manifest: dict,
                      version: int | None = None) -> VersionRecord:
        """Write a version atomically and register it as a ``candidate``.

        ``write_artifacts(folder)`` writes the artifacts into a temporary folder; the manifest (with the
        SHA-256 of every artifact) is added and the folder renamed to ``v{N}``. Only then does Redis
        learn of the version.
        """
        version = version or self.allocate_version()
        self.root_dir.mkdir(parents=True, exist_ok=True)
        target = self.path(version)
        if target.exists():
            raise FileExistsError(f"{target} already exists")
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-v{version}-", dir=self.root_dir))
        try:
            write_artifacts(tmp)
            for child in tmp.iterdir():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
                os.chmod(child, 0o644)
            files = {child.name: sha256_file(child) for child in sorted(tmp.iterdir()) if child.is_file()}
            manifest = dict(manifest) | {"version": version, "kind": self.kind, "status": CANDIDATE,
                                         "created_at": manifest.get("created_at", time.time()), "files": files}
            manifest.setdefault("figures", {})
            manifest.setdefault("parent", None)
            _write_json_atomically(tmp / MANIFEST, manifest)
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; replicas under other users read artifacts
            os.replace(tmp, target)
            _fsync_dir(self.root_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.client.hset(self.versions_key, str(version), json.dumps(manifest, sort_keys=True))
        self._record("created", version, manifest.get("created_by", ""), "", f"candidate v{version}")
        return VersionRecord.from_manifest(manifest)

    # ---- status changes ----
    def set_status(self, version: int, status: str, who: str, why: str, figures: dict | None = None) -> VersionRecord:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")
        manifest_path = self.path(version) / MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            # a damaged manifest must not block moving away from its version (a rollback): take
            # the copy Redis kept when the version was written
            indexed = self.get(version)
            if indexed is None:
                raise ValueError(f"{self.kind} v{version} has no readable manifest") from exc
            log.warning("%s v%d: manifest on disk unreadable (%s); using the registry's copy", self.kind, version, exc)
            manifest = dict(indexed.manifest)
        manifest["status"] = status
        if figures:
            manifest["figures"] = dict(manifest.get("figures", {})) | figures
        manifest.setdefault("history", []).append({"status": status, "who": who, "why": why, "at": time.time()})
        _write_json_atomically(manifest_path, manifest)
        self.client.hset(self.versions_key, str(version), json.dumps(manifest, sort_keys=True))
        return VersionRecord.from_manifest(manifest)

    def promote(self, version: int, who: str, why: str) -> VersionRecord:
        """Make ``version`` current; the previous current becomes ``superseded``."""
        previous = self.current_version()
        if previous and previous != version:
            self.set_status(previous, SUPERSEDED, who, f"superseded by v{version}")
        record = self.set_status(version, CURRENT, who, why)
        self.client.set(self.current_key, version)
        self._record("promote", version, who, why, previous)
        return record

    def reject(self, version: int, who: str, why: str, figures: dict | None = None) -> VersionRecord:
        record = self.set_status(version, REJECTED, who, why, figures)
        self._record("reject", version, who, why, self.current_version())
        return record

    def rollback(self, to_version: int, who: str, why: str) -> VersionRecord | None:
        """Point ``current`` back at an earlier version; the one left is marked ``rolled_back``.
        ``to_version`` 0 means no version (for the policy: the base model); it returns None."""
        if to_version and self.get(to_version) is None:
            raise ValueError(f"{self.kind} v{to_version} does not exist")
        previous = self.current_version()
        if previous and previous != to_version:
            self.set_status(previous, ROLLED_BACK, who, why)
        record = self.set_status(to_version, CURRENT, who, f"rollback: {why}") if to_version else None
        if to_version:
            self.client.set(self.current_key, to_version)
        else:
            self.client.delete(self.current_key)
        self._record("rollback", to_version, who, why, previous)
        return record

    def _record(self, action: str, version: int, who: str, why: str, previous: int | str | None) -> None:
        event = {"kind": self.kind, "action": action, "from": str(previous or ""), "to": str(version),
                 "who": who or "", "why": why or "", "when": f"{time.time():.3f}"}
        self.client.xadd(self.audit_key, event, maxlen=10000, approximate=True)
        self.client.publish(self.channel, json.dumps(event))

    # ---- disk ----
    def _disk_versions(self) -> list[int]:
        if not self.root_dir.exists():
            return []
        return [int(m.group(1)) for p in self.root_dir.iterdir() if (m := VERSION_FOLDER.match(p.name))]

    def rebuild_from_disk(self, who: str = "rebuild") -> int:
        """Recreate the Redis index from the manifests on disk; sweep temporary folders of killed
        writers. The current version is the newest one whose manifest says ``current``."""
        for leftover in self.root_dir.glob(".tmp-v*"):
            shutil.rmtree(leftover, ignore_errors=True)
        manifests = {}
        for version in sorted(self._disk_versions()):
            path = self.path(version) / MANIFEST
            try:
                manifest = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(manifest, dict):
                    raise ValueError("not a JSON object")
                manifests[version] = manifest
            except (OSError, ValueError) as exc:
                log.warning("skipping %s: %s", path, exc)
        pipe = self.client.pipeline()
        pipe.delete(self.versions_key)
        for version, manifest in manifests.items():
            pipe.hset(self.versions_key, str(version), json.dumps(manifest, sort_keys=True))
        currents = [v for v, m in manifests.items() if m.get("status") == CURRENT]
        if currents:
            pipe.set(self.current_key, max(currents))
        else:
            pipe.delete(self.current_key)
        pipe.set(self.next_key, max(manifests, default=0))
        pipe.execute()
        self._record("rebuild", max(currents, default=0), who, f"{len(manifests)} versions from {self.root_dir}", "")
        return len(manifests)


def open_registry(client: redis_lib.Redis, data_dir: Path | str, kind: str) -> VersionRegistry:
    """The registry of ``kind`` (``POLICY_KIND``, ``REWARD_MODEL_KIND``) in its folder of ``data_dir``."""
    return VersionRegistry(client, kind, registry_folder(data_dir, kind))

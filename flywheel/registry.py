"""A registry of trained model versions, generic over what is versioned (``kind``: "reward_model",
"policy"); ``open_registry`` opens the one of a kind in its folder of the data directory.

Disk is the source of truth, Redis the fast index (the layout and key names are contracts:
``flywheel.contracts.artifacts`` and ``flywheel.contracts.keys``):

- ``{root_dir}/v{N}/`` holds a version's artifacts (safetensors only) and ``manifest.json``. A version
  is written into a temporary folder in ``root_dir`` and renamed into place (``os.replace``), so a
  writer killed midway leaves no ``v{N}`` folder, only a ``.tmp-*`` one that is ignored and swept.
  Every status change rewrites the manifest (temp file + rename) before Redis is updated.
- Redis: ``flywheel:registry:{kind}:versions`` (hash N → manifest JSON), ``...:current`` (the
  current version number, ``0`` = none: for the policy, the base model; stored explicitly, so an
  absent key means the pointer was *lost* — a Redis reset or failover — never "serve v0"),
  ``...:next`` (version allocator), ``...:audit`` (a stream of every change: action, who, when,
  from, to, why), ``...:frozen`` (set by a rollback: automatic promotion is paused until an
  operator resumes it). Each change is PUBLISHed on ``flywheel:registry:{kind}`` so followers
  (servers, for the policy) can react without polling.
- Every change of the pointer, the statuses and the audit is one Lua script (``_CHANGE_SCRIPT``):
  a compare-and-set on the pointer the change was computed from, so two concurrent promotions
  cannot leave two versions ``current`` or an audit that misses a change. A training run's
  promotion also names the version it started from, must find promotion unfrozen, and must still
  hold its run lock's fencing token (``flywheel.run_lock``): a run whose lease lapsed cannot promote.
- The audit keeps every entry of the last ``AUDIT_RETENTION_DAYS`` days (an XADD MINID trim by
  time, never by count).
- ``{root_dir}/current.json`` mirrors the pointer and the freeze on disk (written after each change,
  ordered by the audit id), so ``rebuild_from_disk()`` restores both after Redis lost them.
- ``manifest["files"]`` lists every artifact file with its SHA-256 (``write_version`` fills it in);
  ``flywheel.contracts.artifacts.verify_version()`` checks them before anything loads a version, so a truncated or corrupt
  artifact is refused with a clear error instead of being served or trained on.

Statuses: ``candidate`` (written, not yet decided), ``current``, ``superseded`` (was current until a
newer version was promoted), ``rejected`` (failed its gate, or its run's promotion was refused; kept
with its figures), ``rolled_back``.
"""

from __future__ import annotations

import contextlib
import fcntl
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
from flywheel.contracts.keys import (registry_audit_key, registry_channel, registry_current_key,
                                     registry_frozen_key, registry_next_key, registry_versions_key)
from flywheel.contracts.redis_text import text

log = logging.getLogger(__name__)

CANDIDATE, CURRENT, SUPERSEDED, REJECTED, ROLLED_BACK = "candidate", "current", "superseded", "rejected", "rolled_back"
STATUSES = (CANDIDATE, CURRENT, SUPERSEDED, REJECTED, ROLLED_BACK)
AUDIT_RETENTION_DAYS = 400  # every audit entry younger than this is kept (more than a year of changes)
POINTER_FILE = "current.json"  # the pointer and the freeze, mirrored on disk for rebuild_from_disk
POINTER_LOCK_FILE = ".current.lock"  # flock: writers of POINTER_FILE take turns
CONTROL_FILES = (POINTER_FILE, POINTER_LOCK_FILE)
CHANGE_RETRIES = 5  # an operator's change recomputed on a concurrent one before it gives up


class RegistryConflict(ValueError):
    """A change was refused because the registry moved under it (or it may not happen now)."""


class PointerMoved(RegistryConflict):
    """The pointer is no longer at the version the change was computed from (compare-and-set)."""


class PromotionFrozen(RegistryConflict):
    """A rollback froze automatic promotion; an operator lifts it with ``resume``."""


class LeaseLost(RegistryConflict):
    """The run's lock is held by someone else now (its fencing token is stale)."""


class PointerMissing(RegistryConflict):
    """The pointer key is gone (a Redis reset): nothing automatic moves it until it is restored."""


@dataclass(frozen=True)
class Fence:
    """A run lock's key and the fencing token its holder got: a change passes only while it holds."""

    lock_key: str
    token: str


# KEYS: versions hash, current pointer, audit stream, frozen key, lock key (or the pointer again)
# ARGV: expected pointer ('*' any, '-' absent, else the value), new pointer ('' = unchanged),
#       refuse_when_frozen '1'/'0', freeze action ('set', 'clear', ''), freeze JSON, fence token
#       ('' = none), audit MINID, channel, event JSON, then version/manifest-JSON pairs
_CHANGE_SCRIPT = """
local pointer = redis.call('GET', KEYS[2])
if ARGV[1] == '-' then
  if pointer then return {'moved', pointer} end
elseif ARGV[1] ~= '*' and pointer ~= ARGV[1] then
  return {'moved', pointer or ''}
end
if ARGV[3] == '1' then
  local frozen = redis.call('GET', KEYS[4])
  if frozen then return {'frozen', frozen} end
end
if ARGV[6] ~= '' then
  local holder = redis.call('GET', KEYS[5])
  if holder ~= ARGV[6] then return {'fenced', holder or ''} end
end
for i = 10, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], ARGV[2]) end
if ARGV[4] == 'set' then redis.call('SET', KEYS[4], ARGV[5]) elseif ARGV[4] == 'clear' then redis.call('DEL', KEYS[4]) end
local event = cjson.decode(ARGV[9])
local fields = {}
for k, v in pairs(event) do fields[#fields + 1] = k; fields[#fields + 1] = v end
local id = redis.call('XADD', KEYS[3], 'MINID', '~', ARGV[7], '*', unpack(fields))
event['id'] = id
redis.call('PUBLISH', ARGV[8], cjson.encode(event))
return {'ok', id}
"""


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
        self.frozen_key = registry_frozen_key(kind)
        self._change = client.register_script(_CHANGE_SCRIPT)

    # ---- reading ----
    def path(self, version: int) -> Path:
        return version_folder(self.root_dir, version)

    def get(self, version: int) -> VersionRecord | None:
        raw = self.client.hget(self.versions_key, str(version))
        return VersionRecord.from_manifest(json.loads(raw)) if raw else None

    def versions(self) -> list[VersionRecord]:
        records = [VersionRecord.from_manifest(json.loads(v)) for v in self.client.hgetall(self.versions_key).values()]
        return sorted(records, key=lambda r: r.version)

    def pointer(self) -> int | None:
        """The current version number (0 = none, the base model), or None when the pointer is lost."""
        raw = self.client.get(self.current_key)
        return None if raw is None else int(raw)

    def current_version(self) -> int:
        """The current version number, 0 when there is none (or the pointer is lost: see ``pointer``)."""
        return self.pointer() or 0

    def current(self) -> VersionRecord | None:
        version = self.current_version()
        return self.get(version) if version else None

    def frozen(self) -> dict | None:
        """Why automatic promotion is paused (who, why, when, the version rolled back to), or None."""
        raw = self.client.get(self.frozen_key)
        return json.loads(raw) if raw else None

    def audit(self, count: int = 100) -> list[dict]:
        entries = self.client.xrevrange(self.audit_key, count=count)
        return [{text(k): text(v) for k, v in fields.items()} | {"id": text(i)} for i, fields in entries]

    # ---- a fresh registry ----
    def initialize_if_fresh(self) -> bool:
        """Store ``current = 0`` on a registry that never had a version (no version folder, no pointer
        file): the one case where an absent pointer means "none yet" rather than "lost"."""
        if self.client.exists(self.current_key) or self._disk_versions() or (self.root_dir / POINTER_FILE).exists():
            return False
        if not self.client.set(self.current_key, 0, nx=True):
            return False
        with self._disk_lock():
            self._write_pointer_file(0, None, "0-0")
        return True

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
        self.initialize_if_fresh()  # before the first folder exists: afterwards an absent pointer is a loss
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
        self._apply("created", version, manifest.get("created_by", ""), f"candidate v{version}",
                    expected="*", manifests={version: manifest})
        return VersionRecord.from_manifest(manifest)

    # ---- status changes ----
    def _with_status(self, version: int, status: str, who: str, why: str, figures: dict | None = None) -> dict:
        """``version``'s manifest with ``status`` (and ``figures``) added; nothing is written yet."""
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
        return manifest

    def set_status(self, version: int, status: str, who: str, why: str, figures: dict | None = None) -> VersionRecord:
        """Change one version's status (not the pointer), audited."""
        manifest = self._with_status(version, status, who, why, figures)
        self._apply("status", version, who, f"{status}: {why}", expected="*", manifests={version: manifest})
        return VersionRecord.from_manifest(manifest)

    def promote(self, version: int, who: str, why: str, *, expected_current: int | None = None,
                automatic: bool = False, fence: Fence | None = None) -> VersionRecord | None:
        """Make ``version`` current (0: none, the base model; returns None); the previous current
        becomes ``superseded``.

        An operator's promotion (``expected_current`` None) applies over whatever is current (recomputed
        if another change lands meanwhile). A training run's passes the version it started from
        (``PointerMoved`` if the pointer moved since), ``automatic`` (``PromotionFrozen`` after a rollback
        until ``resume``) and its lock's ``fence`` (``LeaseLost`` once another run holds the lock)."""
        if automatic and expected_current is None:
            raise ValueError("an automatic promotion names the version it started from")
        for _attempt in range(CHANGE_RETRIES):
            previous = self.pointer()
            if automatic and previous is None:
                raise PointerMissing(f"{self.kind}: the current pointer is missing; not promoting v{version} "
                                     f"automatically (restore it: `flywheel policies --rebuild`)")
            if expected_current is not None and previous != expected_current:
                raise PointerMoved(f"{self.kind}: current moved from v{expected_current} to v{previous} during the "
                                   f"run; v{version} is not promoted")
            manifests = {}
            if previous and previous != version:
                manifests[previous] = self._with_status(previous, SUPERSEDED, who, f"superseded by v{version}")
            if version:
                manifests[version] = self._with_status(version, CURRENT, who, why)
            try:
                self._apply("promote", version, who, why, expected=previous, manifests=manifests, new_pointer=version,
                            refuse_when_frozen=automatic, fence=fence)
            except PointerMoved:
                if expected_current is not None:
                    raise
                continue  # an operator's change: recompute the statuses on the pointer as it is now
            return VersionRecord.from_manifest(manifests[version]) if version else None
        raise PointerMoved(f"{self.kind}: the pointer kept moving; v{version} was not promoted, try again")

    def reject(self, version: int, who: str, why: str, figures: dict | None = None) -> VersionRecord:
        manifest = self._with_status(version, REJECTED, who, why, figures)
        self._apply("reject", version, who, why, expected="*", manifests={version: manifest})
        return VersionRecord.from_manifest(manifest)

    def rollback(self, to_version: int, who: str, why: str) -> VersionRecord | None:
        """Point ``current`` back at an earlier version; the one left is marked ``rolled_back``, and
        automatic promotion is frozen until ``resume`` (a run that started from the version an operator
        rejected must not promote its child). ``to_version`` 0 means no version (for the policy: the base
        model); it returns None."""
        if to_version and self.get(to_version) is None:
            raise ValueError(f"{self.kind} v{to_version} does not exist")
        freeze = {"who": who or "", "why": why or "", "at": time.time(), "version": to_version}
        for _attempt in range(CHANGE_RETRIES):
            previous = self.pointer()
            manifests = {}
            if previous and previous != to_version:
                manifests[previous] = self._with_status(previous, ROLLED_BACK, who, why)
            if to_version:
                manifests[to_version] = self._with_status(to_version, CURRENT, who, f"rollback: {why}")
            try:
                self._apply("rollback", to_version, who, why, expected=previous, manifests=manifests,
                            new_pointer=to_version, freeze=freeze)
            except PointerMoved:
                continue
            return VersionRecord.from_manifest(manifests[to_version]) if to_version else None
        raise PointerMoved(f"{self.kind}: the pointer kept moving; the rollback did not happen, try again")

    def resume(self, who: str, why: str) -> bool:
        """Lift a rollback's freeze: training runs promote again. False when nothing was frozen."""
        if self.frozen() is None:
            return False
        self._apply("resume", self.current_version(), who, why or "automatic promotion resumed", expected="*",
                    manifests={}, freeze=None, clear_freeze=True)
        return True

    def _apply(self, action: str, version: int, who: str, why: str, *, expected: int | str | None,
               manifests: dict[int, dict], new_pointer: int | None = None, refuse_when_frozen: bool = False,
               fence: Fence | None = None, freeze: dict | None = None, clear_freeze: bool = False) -> str:
        """One atomic change in Redis (``_CHANGE_SCRIPT``), then its mirror on disk; the audit id."""
        previous = expected if isinstance(expected, int) else None
        event = {"kind": self.kind, "action": action, "from": "" if previous is None else str(previous),
                 "to": str(version), "who": who or "", "why": why or "", "when": f"{time.time():.3f}"}
        retention_ms = int((time.time() - AUDIT_RETENTION_DAYS * 86400) * 1000)
        args = ["*" if expected == "*" else "-" if expected is None else str(expected),
                "" if new_pointer is None else str(new_pointer), "1" if refuse_when_frozen else "0",
                "set" if freeze is not None else "clear" if clear_freeze else "", json.dumps(freeze or {}),
                fence.token if fence else "", f"{retention_ms}-0", self.channel, json.dumps(event)]
        for number, manifest in manifests.items():
            args += [str(number), json.dumps(manifest, sort_keys=True)]
        script_keys = [self.versions_key, self.current_key, self.audit_key, self.frozen_key,
                       fence.lock_key if fence else self.current_key]
        outcome, detail = (text(v) for v in self._change(keys=script_keys, args=args))
        if outcome == "moved":
            raise PointerMoved(f"{self.kind}: current is v{detail or '? (missing)'}, not v{expected}")
        if outcome == "frozen":
            info = json.loads(detail)
            raise PromotionFrozen(f"{self.kind}: automatic promotion is frozen since {info.get('who')} rolled back "
                                  f"to v{info.get('version')} ({info.get('why')}); `flywheel promote --resume` lifts it")
        if outcome == "fenced":
            raise LeaseLost(f"{self.kind}: the run lock {fence.lock_key} is held by token {detail or '(none)'}, "
                            f"not this run's {fence.token}: its lease lapsed")
        with self._disk_lock():  # the disk mirror, in audit order: manifests, then the pointer file
            for manifest in manifests.values():
                path = self.path(int(manifest["version"])) / MANIFEST
                try:
                    on_disk = json.loads(path.read_text(encoding="utf-8")).get("audit_id", "0-0")
                except (OSError, ValueError, AttributeError):
                    on_disk = "0-0"
                if _audit_order(on_disk) <= _audit_order(detail):  # a later change wrote it already: keep that
                    _write_json_atomically(path, manifest | {"audit_id": detail})
            if new_pointer is not None or freeze is not None or clear_freeze:
                self._write_pointer_file(self.current_version() if new_pointer is None else new_pointer,
                                         freeze if not clear_freeze else None, detail,
                                         keep_freeze=freeze is None and not clear_freeze)
        return detail

    @contextlib.contextmanager
    def _disk_lock(self):
        """Writers of the disk mirror take turns (flock), so a late writer cannot undo a newer change."""
        self.root_dir.mkdir(parents=True, exist_ok=True)
        with open(self.root_dir / POINTER_LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _write_pointer_file(self, version: int, freeze: dict | None, audit_id: str, keep_freeze: bool = False) -> None:
        """``current.json``: the pointer and the freeze as of audit entry ``audit_id``; a writer that
        comes late (an older audit id) leaves a newer file alone. Called under ``_disk_lock``."""
        path = self.root_dir / POINTER_FILE
        existing = _read_pointer_file(path)
        if existing and _audit_order(existing.get("audit_id", "0-0")) > _audit_order(audit_id):
            return
        if keep_freeze and existing:
            freeze = existing.get("frozen")
        _write_json_atomically(path, {"version": int(version), "frozen": freeze, "audit_id": audit_id})

    # ---- disk ----
    def _disk_versions(self) -> list[int]:
        if not self.root_dir.exists():
            return []
        return [int(m.group(1)) for p in self.root_dir.iterdir() if (m := VERSION_FOLDER.match(p.name))]

    def rebuild_from_disk(self, who: str = "rebuild") -> int:
        """Recreate the Redis index from the manifests on disk; sweep temporary folders of killed
        writers. The pointer and the freeze come from ``current.json`` (the newest version whose
        manifest says ``current`` where a registry predates it, else 0); a manifest left ``current``
        by a change that died midway is indexed as ``superseded``."""
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
        saved = _read_pointer_file(self.root_dir / POINTER_FILE)
        if saved is not None and (int(saved["version"]) in manifests or int(saved["version"]) == 0):
            current, frozen = int(saved["version"]), saved.get("frozen")
        else:
            current = max((v for v, m in manifests.items() if m.get("status") == CURRENT), default=0)
            frozen = saved.get("frozen") if saved else None
        for version, manifest in manifests.items():
            if version == current:
                manifest["status"] = CURRENT
            elif manifest.get("status") == CURRENT:
                manifest["status"] = SUPERSEDED
        event = {"kind": self.kind, "action": "rebuild", "from": "", "to": str(current), "who": who,
                 "why": f"{len(manifests)} versions from {self.root_dir}", "when": f"{time.time():.3f}"}
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.versions_key)
        for version, manifest in manifests.items():
            pipe.hset(self.versions_key, str(version), json.dumps(manifest, sort_keys=True))
        pipe.set(self.current_key, current)
        if frozen:
            pipe.set(self.frozen_key, json.dumps(frozen))
        else:
            pipe.delete(self.frozen_key)
        pipe.set(self.next_key, max(manifests, default=0))
        pipe.xadd(self.audit_key, event)
        pipe.publish(self.channel, json.dumps(event))
        pipe.execute()
        with self._disk_lock():
            self._write_pointer_file(current, frozen, f"{int(time.time() * 1000)}-0")
        return len(manifests)


def _read_pointer_file(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) and "version" in data else None
    except (OSError, ValueError):
        return None


def _audit_order(audit_id: str) -> tuple[int, int]:
    ms, _, seq = str(audit_id).partition("-")
    return int(ms or 0), int(seq or 0)


def open_registry(client: redis_lib.Redis, data_dir: Path | str, kind: str) -> VersionRegistry:
    """The registry of ``kind`` (``POLICY_KIND``, ``REWARD_MODEL_KIND``) in its folder of ``data_dir``."""
    return VersionRegistry(client, kind, registry_folder(data_dir, kind))

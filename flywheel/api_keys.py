"""API keys: who may call the gRPC server, and in which role.

A key is a random secret (``fwk_`` + 256 random bits). The server keeps only its SHA-256: the
keys are random, not chosen by people, so a slow password hash (scrypt) would add latency to every
RPC without making a stolen hash any easier to reverse. A presented key is hashed and compared with
every stored hash by ``hmac.compare_digest`` (constant time, no early exit on a match).

Keys come from two places, used together:

* ``FLYWHEEL_API_KEYS``: ``name:role:KEY`` or ``name:role:sha256:HEX`` entries, comma-separated
  (a plaintext KEY is hashed on load and never kept);
* a JSON file (``FLYWHEEL_API_KEYS_FILE``, default ``DATA_DIR/secrets/api_keys.json``) of
  ``{"name", "role", "sha256", "created_at"}`` entries that ``flywheel keys create|list|revoke``
  edit. The server re-reads it when it changes, so a revoked key stops working at once.

With neither configured, the first server creates the default file with one client and one admin
key and writes those two keys (mode 0600) to ``DATA_DIR/secrets/client.key`` and ``admin.key``,
like a notebook server's token: the CLI clients on the same machine read them from there, so a
local set-up needs no configuration and is still not open to anyone who can reach the port.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from flywheel.config import FlywheelConfig

log = logging.getLogger(__name__)

ROLE_CLIENT = "client"  # Inference and Feedback
ROLE_ADMIN = "admin"  # everything, Admin included
ROLES = (ROLE_CLIENT, ROLE_ADMIN)
KEY_PREFIX = "fwk_"
SECRETS_DIR = "secrets"
KEYS_FILE_NAME = "api_keys.json"
LOCAL_KEY_NAMES = {ROLE_CLIENT: "local-client", ROLE_ADMIN: "local-admin"}


@dataclass(frozen=True)
class Caller:
    """The authenticated caller of the RPC being handled (the key's name and role)."""

    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == ROLE_ADMIN


# set by the server's auth interceptor around each handler; None when auth is off
_current_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("flywheel_caller", default=None)


def current_caller() -> Caller | None:
    """Who is calling, inside a gRPC handler; None when the server runs without auth."""
    return _current_caller.get()


def caller_context(caller: Caller) -> contextvars.Context:
    """A context in which ``current_caller()`` is ``caller`` (run the handler inside it)."""
    context = contextvars.copy_context()
    context.run(_current_caller.set, caller)
    return context


@dataclass(frozen=True)
class StoredKey:
    name: str
    role: str
    sha256: str
    created_at: float = 0.0


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}; got {role!r}")
    return role


def parse_keys_spec(spec: str) -> list[StoredKey]:
    """``name:role:KEY`` / ``name:role:sha256:HEX`` entries, comma-separated (FLYWHEEL_API_KEYS)."""
    keys = []
    for number, entry in enumerate((e.strip() for e in spec.split(",")), start=1):
        if not entry:
            continue
        parts = entry.split(":", 2)
        if len(parts) != 3 or not parts[0] or not parts[2]:
            # the entry holds a secret: never repeat it in the message
            raise ValueError(f"FLYWHEEL_API_KEYS entry {number}: expected name:role:KEY or name:role:sha256:HEX")
        name, role, secret = parts
        check_role(role)
        if secret.startswith("sha256:"):
            digest = secret.removeprefix("sha256:").lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"FLYWHEEL_API_KEYS entry {number} ({name}): sha256 must be 64 hex digits")
        else:
            digest = hash_key(secret)
        keys.append(StoredKey(name, role, digest))
    return keys


def default_keys_file(data_dir: Path | str) -> Path:
    return Path(data_dir) / SECRETS_DIR / KEYS_FILE_NAME


def local_key_file(data_dir: Path | str, role: str) -> Path:
    """Where the generated local key of ``role`` is kept for the CLI clients of this machine."""
    return Path(data_dir) / SECRETS_DIR / f"{check_role(role)}.key"


class KeyFile:
    """The JSON file of hashed keys. Writes go to a temporary file renamed over it (mode 0600)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def read(self) -> list[StoredKey]:
        try:
            data = json.loads(self.path.read_text())
            return [StoredKey(e["name"], check_role(e["role"]), e["sha256"], float(e.get("created_at", 0)))
                    for e in data["keys"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{self.path}: not a Flywheel API keys file ({exc})") from exc

    def write(self, keys: Iterable[StoredKey]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        text = json.dumps({"version": 1, "keys": [asdict(k) for k in keys]}, indent=2) + "\n"
        fd, temp = tempfile.mkstemp(dir=self.path.parent, prefix=".api_keys.")  # created 0600
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(temp, self.path)

    def create(self, name: str, role: str) -> str:
        """Add a key; returns the key itself, which is stored nowhere (show it once)."""
        check_role(role)
        if not name or ":" in name or "," in name:
            raise ValueError(f"key name must be non-empty without ':' or ','; got {name!r}")
        keys = self.read() if self.path.exists() else []
        if any(k.name == name for k in keys):
            raise ValueError(f"a key named {name!r} exists already in {self.path}")
        key = generate_key()
        self.write([*keys, StoredKey(name, role, hash_key(key), time.time())])
        return key

    def revoke(self, name: str) -> None:
        keys = self.read() if self.path.exists() else []
        if not any(k.name == name for k in keys):
            raise ValueError(f"no key named {name!r} in {self.path}")
        self.write([k for k in keys if k.name != name])


def create_local_keys(data_dir: Path | str) -> Path | None:
    """First start without configured keys: the default keys file with a client and an admin key,
    whose plaintext goes to 0600 files beside it. Returns the folder, or None when another process
    created the file first (servers sharing a data directory race here; exactly one wins)."""
    keys_path = default_keys_file(data_dir)
    folder = keys_path.parent
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    plain = {role: generate_key() for role in ROLES}
    staged = KeyFile(folder / f".api_keys.{os.getpid()}.{secrets.token_hex(4)}.json")
    staged.write(StoredKey(LOCAL_KEY_NAMES[role], role, hash_key(key), time.time()) for role, key in plain.items())
    try:
        os.link(staged.path, keys_path)  # atomic and refuses to replace: the first server wins
    except FileExistsError:
        return None
    finally:
        staged.path.unlink()
    for role, key in plain.items():
        fd = os.open(local_key_file(data_dir, role), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key + "\n")
    return folder


class KeyStore:
    """The keys a server accepts: the configured ones plus the keys file, re-read when it changes."""

    def __init__(self, fixed: Iterable[StoredKey] = (), path: Path | str | None = None) -> None:
        self.fixed = list(fixed)
        self.file = KeyFile(path) if path is not None else None
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._keys: list[StoredKey] = list(self.fixed)
        self._refresh()
        if not self._keys:
            raise ValueError("auth is on but no API key is configured (FLYWHEEL_API_KEYS or FLYWHEEL_API_KEYS_FILE)")

    @classmethod
    def from_settings(cls, settings: "FlywheelConfig") -> "KeyStore":
        """Keys of ``settings``; with none configured, the data directory's (created on first use)."""
        fixed = parse_keys_spec(settings.security.api_keys)
        if settings.security.api_keys_file:
            path = Path(settings.security.api_keys_file)
            if not path.exists():
                raise FileNotFoundError(f"api_keys_file {path} does not exist (create keys with `flywheel keys create`)")
            return cls(fixed, path)
        # the default file counts too (`flywheel keys create` writes there), even if it appears later
        path = default_keys_file(settings.data_dir)
        if fixed:
            return cls(fixed, path)
        if not path.exists() and create_local_keys(settings.data_dir) is not None:
            log.warning("auth: created API keys for this machine; clients read them from %s and %s "
                        "(FLYWHEEL_API_KEY overrides)", local_key_file(settings.data_dir, ROLE_CLIENT),
                        local_key_file(settings.data_dir, ROLE_ADMIN))
        return cls(fixed, path)

    def _refresh(self) -> None:
        if self.file is None:
            return
        try:
            st = os.stat(self.file.path)
        except FileNotFoundError:
            stamp = None
        else:
            stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
        if stamp == self._stamp:
            return
        try:
            from_file = self.file.read() if stamp is not None else []
        except (OSError, ValueError) as exc:  # a half-edited file: keep the keys we had
            log.error("auth: cannot read %s (%s); keeping the previous keys", self.file.path, exc)
            return
        self._keys = self.fixed + from_file
        self._stamp = stamp

    def authenticate(self, presented: str) -> Caller | None:
        """The caller a key belongs to, or None. Every stored hash is compared (constant time)."""
        with self._lock:
            self._refresh()
            keys = self._keys
        digest = hash_key(presented).encode()
        found: StoredKey | None = None
        for key in keys:
            if hmac.compare_digest(digest, key.sha256.encode()) and found is None:
                found = key
        return None if found is None else Caller(found.name, found.role)


@dataclass(frozen=True)
class ClientKey:
    """The key a CLI client sends, where it came from, and every place that was looked in (for
    an error that tells the user what to fix)."""

    key: str | None
    source: str  # "FLYWHEEL_API_KEY", a key file's path, or "" when no key was found
    looked_in: tuple[str, ...]


def find_client_key(settings: "FlywheelConfig", role: str = ROLE_CLIENT) -> ClientKey:
    """``FLYWHEEL_API_KEY``, else this machine's generated key of ``role`` in the data directory
    (an admin key also serves a client command)."""
    looked_in = ["FLYWHEEL_API_KEY"]
    if settings.client.api_key:
        return ClientKey(settings.client.api_key, "FLYWHEEL_API_KEY", tuple(looked_in))
    candidates = [role] if role == ROLE_ADMIN else [role, ROLE_ADMIN]
    for candidate in candidates:
        path = local_key_file(settings.data_dir, candidate)
        looked_in.append(str(path.resolve()))
        try:
            key = path.read_text().strip()
        except FileNotFoundError:
            continue
        except PermissionError as exc:
            raise PermissionError(f"cannot read the API key in {path}: {exc.strerror}; set FLYWHEEL_API_KEY") from exc
        if key:
            return ClientKey(key, str(path.resolve()), tuple(looked_in))
    return ClientKey(None, "", tuple(looked_in))


def client_key(settings: "FlywheelConfig", role: str = ROLE_CLIENT) -> str | None:
    """The key a CLI client sends (``find_client_key``), or None."""
    return find_client_key(settings, role).key

"""``flywheel keys create|list|revoke``: manage the API keys file (hashes only).

``create`` prints the new key once and stores only its SHA-256; a lost key cannot be recovered,
only revoked and replaced. Running servers re-read the file, so changes apply without a restart.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from flywheel.api_keys import ROLES, KeyFile, default_keys_file
from flywheel.config import FlywheelConfig, SecurityConfig, add_config_flags, config_from_args
from flywheel.app.tables import format_table, plain_text


def register(subparsers) -> None:
    keys = subparsers.add_parser("keys", help="create, list and revoke API keys", description=plain_text(__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = keys.add_subparsers(dest="keys_command", metavar="COMMAND")
    create = commands.add_parser("create", help="add a key and print it (once)",
                                 description="Add a key to the keys file and print it; only its SHA-256 is stored.")
    create.add_argument("--name", required=True, help="who holds the key (also the annotator name of a client key)")
    create.add_argument("--role", required=True, choices=ROLES, help="client: Inference and Feedback; admin: all")
    add_config_flags(create, FlywheelConfig, SecurityConfig)
    create.set_defaults(handler=run_create)
    listing = commands.add_parser("list", help="the keys' names, roles and creation times (never the keys)",
                                  description="List the keys file: names, roles, creation times, hash prefixes.")
    add_config_flags(listing, FlywheelConfig, SecurityConfig)
    listing.set_defaults(handler=run_list)
    revoke = commands.add_parser("revoke", help="remove a key; servers refuse it from their next request",
                                 description="Remove a key from the keys file; running servers refuse it from "
                                             "their next request, with no restart.")
    revoke.add_argument("name", help="the key's name (flywheel keys list shows them)")
    add_config_flags(revoke, FlywheelConfig, SecurityConfig)
    revoke.set_defaults(handler=run_revoke)


def keys_file(args: argparse.Namespace) -> KeyFile:
    settings = config_from_args(args)
    keys_file = settings.security.api_keys_file
    return KeyFile(Path(keys_file) if keys_file else default_keys_file(settings.data_dir))


def run_create(args: argparse.Namespace) -> int:
    store = keys_file(args)
    key = store.create(args.name, args.role)
    print(f"created {args.role} key {args.name!r} in {store.path}; it is shown only this once:", file=sys.stderr)
    print(key)
    return 0


def run_list(args: argparse.Namespace) -> int:
    store = keys_file(args)
    keys = store.read() if store.path.exists() else []
    rows = [(k.name, k.role, time.strftime("%Y-%m-%d %H:%M", time.localtime(k.created_at)) if k.created_at else "-",
             k.sha256[:12]) for k in keys]
    print(format_table(["name", "role", "created", "sha256"], rows) if rows else f"no keys in {store.path}")
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    store = keys_file(args)
    store.revoke(args.name)
    print(f"revoked {args.name!r} in {store.path}")
    return 0

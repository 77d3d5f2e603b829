"""The ``flywheel`` command. Each part of the system contributes its own subcommands through a
``register(subparsers)`` function in its ``cli`` module, so this file stays a thin index."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# modules that add subcommands; each has register(subparsers) -> None
COMMAND_MODULES = ["serving.cli", "feedback.cli", "training.cli", "flywheel.status_cli", "flywheel.up",
                   "flywheel.keys_cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flywheel",
        description="Serve a policy over gRPC, collect preference rankings, retrain it, hot-swap it.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as exc:
        print(f"flywheel: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

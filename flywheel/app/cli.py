"""The ``flywheel`` command (``python -m flywheel.app.cli``). Each command module of the application
adds its subcommands through a ``register(subparsers)`` function, so this file stays a thin index."""

from __future__ import annotations

import argparse
import logging
import sys
from types import ModuleType


def command_modules() -> tuple[ModuleType, ...]:
    """The modules that add subcommands, in the order ``--help`` lists them; each has
    ``register(subparsers) -> None``. Imported here rather than at the top: importing this
    module (``python -m flywheel.app.cli``) should not first import every command's dependencies."""
    from flywheel.app import feedback_commands, keys_commands, serve, status, training_commands, up, worker_alive

    return (serve, feedback_commands, training_commands, status, up, keys_commands, worker_alive)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flywheel",
        description="Serve a policy over gRPC, collect preference rankings, retrain it, hot-swap it.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in command_modules():
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
    from flywheel.app.state import StateNotFound

    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, StateNotFound) as exc:
        print(f"flywheel: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

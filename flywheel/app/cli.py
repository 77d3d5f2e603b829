"""The ``flywheel`` command (``python -m flywheel.app.cli``). Each command module of the application
adds its subcommands through a ``register(subparsers)`` function, so this file stays a thin index."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from types import ModuleType

from flywheel.settings import ENV_PREFIX, Settings


def add_settings_flags(parser: argparse.ArgumentParser, names: list[str]) -> None:
    """Add ``--x`` flags for the named settings; their help names the environment variable."""
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    for name in names:
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, default=None,
            help=f"{f.metadata.get('help', '')} (env {ENV_PREFIX}{name.upper()}, default {default})")


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings.load({name: getattr(args, name, None) for name in Settings.field_names()})


def command_modules() -> tuple[ModuleType, ...]:
    """The modules that add subcommands, in the order ``--help`` lists them; each has
    ``register(subparsers) -> None``. Imported here rather than at the top because they import
    this module's flag helpers."""
    from flywheel.app import feedback_commands, keys_commands, serve, status, training_commands, up

    return (serve, feedback_commands, training_commands, status, up, keys_commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flywheel",
        description="Serve a policy over gRPC, collect preference rankings, retrain it, hot-swap it.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as exc:
        print(f"flywheel: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

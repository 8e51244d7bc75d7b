"""The ``multiface`` command.

Subcommands are contributed by the packages through the ``multiface.commands`` entry-point
group (see ``pyproject.toml``): each entry names a ``register(subparsers)`` function that adds
one subparser and sets ``func``. This keeps ``shards`` free of service and trainer imports.

Run ``multiface --help`` for the list.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multiface",
        description="Multiface Stream: synthesise, ingest, verify, serve and train on Multiface shards.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for entry in sorted(entry_points(group="multiface.commands"), key=lambda e: e.name):
        try:
            register = entry.load()
        except ImportError as error:
            # A command whose extra is not installed (e.g. `serve` without `[data]`) still shows
            # up, and running it says what to install instead of failing at import time.
            _register_unavailable(subparsers, entry.name, error)
            continue
        register(subparsers)
    return parser


def _register_unavailable(subparsers: argparse._SubParsersAction, name: str, error: ImportError) -> None:
    message = f"'multiface {name}' is unavailable: {error}. Install the matching extra, e.g. pip install '.[data,train]'"
    parser = subparsers.add_parser(name, help=f"(unavailable: {error.name or error})")

    def fail(_args: argparse.Namespace) -> int:
        print(message, file=sys.stderr)
        return 2

    parser.set_defaults(func=fail)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

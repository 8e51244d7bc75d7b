"""The ``multiface`` command.

Subcommands are contributed by the packages through the ``multiface.commands`` entry-point
group (see ``pyproject.toml``): each entry names a ``register(subparsers)`` function that adds
one subparser and sets ``func``. This keeps ``shards`` free of service and trainer imports.

Only the chosen subcommand's module is imported: the trainer's modules import torch, which the
data service never needs (``multiface serve`` would otherwise hold hundreds of MiB it never
uses). The one-line help of the others, for ``multiface --help`` and for a wrong command name,
is read from the source of their ``register`` function (the ``help=`` of its ``add_parser``
call) without running it.

Run ``multiface --help`` for the list.
"""

from __future__ import annotations

import argparse
import ast
import sys
from importlib.machinery import ModuleSpec
from importlib.metadata import EntryPoint, entry_points

DESCRIPTION = "Multiface Stream: synthesise, ingest, verify, serve and train on Multiface shards."


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``multiface`` parser, with ``command`` (if any) registered in full.

    Args:
        command: the subcommand about to run: its module is imported and its ``register``
            adds its flags. Every other subcommand is listed with its one-line help only.
    """
    parser = argparse.ArgumentParser(prog="multiface", description=DESCRIPTION)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for entry in sorted(entry_points(group="multiface.commands"), key=lambda e: e.name):
        if entry.name != command:
            subparsers.add_parser(entry.name, help=command_help(entry), add_help=False)
            continue
        try:
            register = entry.load()
        except ImportError as error:
            # A command whose extra is not installed (e.g. `serve` without `[data]`) still shows
            # up, and running it says what to install instead of failing at import time.
            _register_unavailable(subparsers, entry.name, error)
            continue
        register(subparsers)
    return parser


def command_help(entry: EntryPoint) -> str | None:
    """The ``help=`` text its ``register`` function gives ``add_parser``, read from the source.

    Falls back to the first line of the function's docstring, then to None (argparse then shows
    the name alone), so a command whose module cannot be found or read is still listed.
    """
    source = _module_source(entry.module)
    if source is None:
        return None
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    function = next(
        (
            node
            for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == entry.attr
        ),
        None,
    )
    if function is None:
        return None
    for node in ast.walk(function):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "add_parser"
        ):
            for keyword in node.keywords:
                if keyword.arg == "help" and isinstance(keyword.value, ast.Constant):
                    return str(keyword.value.value)
    docstring = ast.get_docstring(function)
    return docstring.splitlines()[0] if docstring else None


def _module_source(module: str) -> str | None:
    """A module's source, found the way ``import`` would find it but without running any package."""
    path = None
    spec: ModuleSpec | None = None
    parts = module.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        spec = _find_spec(name, path)
        if spec is None:
            return None
        path = spec.submodule_search_locations
    if spec is None or spec.loader is None or not hasattr(spec.loader, "get_source"):
        return None
    try:
        return spec.loader.get_source(module)
    except (ImportError, OSError):
        return None


def _find_spec(name: str, path) -> ModuleSpec | None:
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        try:
            spec = find(name, path)
        except (ImportError, ValueError):
            continue
        if spec is not None:
            return spec
    return None


def _register_unavailable(subparsers: argparse._SubParsersAction, name: str, error: ImportError) -> None:
    message = f"'multiface {name}' is unavailable: {error}. Install the matching extra, e.g. pip install '.[data,train]'"
    parser = subparsers.add_parser(name, help=f"(unavailable: {error.name or error})")

    def fail(_args: argparse.Namespace) -> int:
        print(message, file=sys.stderr)
        return 2

    parser.set_defaults(func=fail)


def _chosen_command(argv: list[str]) -> str | None:
    """The subcommand named on the command line: the first argument that is not an option."""
    return next((argument for argument in argv if not argument.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_chosen_command(argv)).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""The ``ranker`` command: one subcommand per job, contributed by the packages that do the jobs.

``ranker/`` is the shared core and imports neither the trainer nor the service. Each side
registers its own subcommands instead: ``training/cli.py`` and ``service/cli.py`` expose
``register(subparsers)``, found through the ``ranker.commands`` entry-point group that
pyproject.toml declares. An installation whose metadata predates that group (an editable
install not rerun since) finds no entry point there; this project's own modules
(:data:`BUILTIN_COMMANDS`) are then imported by name, so the command works either way, and
another installed package can add subcommands through the same group.

Heavy imports happen inside each job so ``ranker --help`` is instant and the service does not
import the trainer.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from ranker.errors import RankerError

ENTRY_POINT_GROUP = "ranker.commands"
# Modules with a ``register(subparsers)``, used when no entry point of the group is installed.
# Names only: nothing here is imported unless the command line is built.
BUILTIN_COMMANDS = ("training.cli", "service.cli")

# ``register(subparsers)``: adds a package's subcommands, each with ``set_defaults(func=job)``.
Register = Callable[[Any], None]


def add_overrides(p: argparse.ArgumentParser) -> None:
    """The ``--set KEY=VALUE`` option of the commands that read a training config."""
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set training.epochs=1 (TOML value syntax)",
    )


def parse_value(raw: str) -> Any:
    """A ``--set`` value in TOML syntax (``1``, ``true``, ``[16, 8]``); a bare word as a string."""
    import tomllib

    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def command_registrars() -> list[Register]:
    """The ``register`` functions of every package that contributes subcommands: this
    project's own (:data:`BUILTIN_COMMANDS`, through their entry points when installed, by
    module name when the installed metadata predates the group), then any other installed
    entry point of :data:`ENTRY_POINT_GROUP`, each module once."""
    installed = {ep.module: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    modules = [*BUILTIN_COMMANDS, *sorted(set(installed) - set(BUILTIN_COMMANDS))]
    return [
        installed[m].load() if m in installed else importlib.import_module(m).register
        for m in modules
    ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ranker", description="Multi-objective video ranking.")
    sub = p.add_subparsers(dest="command", required=True)
    for register in command_registrars():
        register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except RankerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

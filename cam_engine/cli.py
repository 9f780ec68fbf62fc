"""The ``cam-engine`` command line.

Each subcommand lives in ``cam_engine/commands/<name>.py`` and provides ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. A command module imports nothing heavy at its
top, and its arguments come from :mod:`cam_engine.arguments`, which needs no torch: ``cam-engine
--help``, ``--version`` and every ``cam-engine COMMAND --help`` load neither torch nor any
command's dependencies, and a run builds the arguments of its own command only.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from . import __version__

COMMANDS = ("demo", "explain", "detect", "export", "bench", "profile")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless it has none or the help states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action)


def _available() -> dict[str, ModuleType]:
    found = {}
    for name in COMMANDS:
        try:
            found[name] = importlib.import_module(f"cam_engine.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"cam_engine.commands.{name}":
                raise
    return found


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, with the options of ``command`` only (``None``: of all).

    The other commands are there by name and help line only.
    """
    parser = argparse.ArgumentParser(
        prog="cam-engine",
        description="Class-activation heatmaps at the speed of plain inference.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in _available().items():
        parsed = sub.add_parser(
            name, help=module.HELP, description=module.HELP, formatter_class=HelpFormatter
        )
        if command in (None, name):
            module.add_arguments(parsed)
            parsed.set_defaults(run=module.run)
    return parser


def _command(argv: Sequence[str]) -> str:
    """The command that ``argv`` names: its first word that is not an option ("" for none)."""
    return next((a for a in argv if not a.startswith("-")), "")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command(argv)
    module = _available().get(command)
    if module is not None and hasattr(module, "normalize_argv"):
        argv = module.normalize_argv(argv)
    args = build_parser(command).parse_args(argv)
    # the errors a user causes (a bad argument, a file that cannot be read or written) are one
    # line; anything else is a bug and keeps its traceback
    try:
        return int(args.run(args) or 0)
    except (ValueError, OSError) as exc:
        print(f"cam-engine {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

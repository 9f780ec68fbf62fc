"""The ``cam-engine`` command line.

Each subcommand lives in ``cam_engine/commands/<name>.py`` and provides ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS = ("demo", "explain", "export", "bench", "profile")


def _available() -> dict[str, object]:
    found = {}
    for name in COMMANDS:
        try:
            found[name] = importlib.import_module(f"cam_engine.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"cam_engine.commands.{name}":
                raise
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cam-engine",
        description="Class-activation heatmaps at the speed of plain inference.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in _available().items():
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the errors a user causes (a bad argument, a file that cannot be read or written) are one
    # line; anything else is a bug and keeps its traceback
    try:
        return int(args.run(args) or 0)
    except (ValueError, OSError) as exc:
        print(f"cam-engine {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

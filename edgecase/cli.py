"""The one `edgecase` command: a thin dispatcher over subcommand modules.

Each subcommand lives in `edgecase/commands/<name>.py` with a `register(subparsers)` function and
imports torch, training or service *inside* its handler, so `edgecase serve` works without torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from edgecase import __version__

# Order here is the order in `edgecase --help`.
COMMANDS = [
    "demo",
    "synth",
    "train",
    "ensemble",
    "evaluate",
    "export",
    "calibrate",
    "serve",
    "score",
    "report",
    "flagged",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgecase",
        description="Find rare frames (edge cases) in driving data with generative models.",
        epilog="Example: edgecase demo   # synth -> train -> export -> serve -> score -> flagged",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edgecase {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"edgecase.commands.{name}").register(sub)
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
    except CliError as exc:
        print(f"edgecase {args.command}: error: {exc}", file=sys.stderr)
        return 2


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2, no traceback."""


if __name__ == "__main__":
    # Re-import so `python -m edgecase.cli` raises and catches the same CliError class as handlers.
    from edgecase.cli import main as package_main

    sys.exit(package_main())

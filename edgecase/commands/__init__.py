"""Subcommands of `edgecase`; each module exposes `register(subparsers)` and sets `handler`."""

import argparse


def add_command(
    sub: argparse._SubParsersAction, name: str, help: str, example: str
) -> argparse.ArgumentParser:
    """Add a subcommand whose --help ends with a worked example."""
    return sub.add_parser(
        name,
        help=help,
        description=help,
        epilog=f"Example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

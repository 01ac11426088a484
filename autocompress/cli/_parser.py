"""The argument parser: one subcommand group per module, help and choices read from the
registries when the parser is built (at call time), not when the package is imported."""

from __future__ import annotations

import argparse
from typing import NoReturn

from autocompress.cli import _deploy, _model, _search, _serve
from autocompress.cli._common import EXIT_BAD_INPUT, catalog

GROUPS = (_model, _search, _deploy, _serve)  # in the order ``--help`` lists their commands


class Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line, like every other bad input (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"autocompress: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``autocompress`` parser, listing what the registries hold now."""
    parser = Parser(
        prog="autocompress",
        description="Find the best way to compress a trained PyTorch model for a target device.",
        epilog=catalog(),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parsers(sub)
    return parser

"""What the console scripts share: a bad flag is one error line.

argparse's own ``error`` prints the whole usage block before its message; a user who mistyped
one flag of a long command gets that message alone (exit 2, as argparse), with a pointer to
``--help`` for the rest.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Sequence


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")


def check_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Parse ``argv`` with a parser built elsewhere (hydra's) only to report a bad flag in one
    line, before that parser sees it and prints its usage block."""
    parser.error = types.MethodType(ArgumentParser.error, parser)  # type: ignore[method-assign]
    parser.parse_args(argv)

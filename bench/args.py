"""Argument parsing for the bench commands: bad input gets one line and exit 2, never a traceback."""
from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: `<prog>: error: <what>` (exit 2).

    argparse's own errors print the whole usage first; `--help` still does.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def name_list(valid: dict[str, str], what: str):
    """A type for comma-separated names: each must be a key or a value of `valid`."""
    known = set(valid) | set(valid.values())
    expected = ", ".join(f"{k} ({v})" if v != k else k for k, v in valid.items())

    def parse(text: str) -> set[str]:
        names = {part.strip() for part in text.split(",") if part.strip()}
        if not names:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}s, got {text!r}")
        unknown = sorted(names - known)
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, unknown))}; expected some of: {expected}")
        return names

    return parse


def fail(prog: str, message: str, status: int = 1) -> int:
    """Print `<prog>: error: <message>` on one line to stderr; return `status` for main() to exit with."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return status

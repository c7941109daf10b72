"""Argument parsing for the bench commands: bad input gets one line and exit 2, never a traceback.

The exit status of every bench command (docs/ARCHITECTURE.md, "Command-line conventions"): 2 for
a bad argument, found before any work; 1 for a failure while working (a measurement that raised,
a file that cannot be read or written); 130 when interrupted; 0 otherwise.
"""
from __future__ import annotations

import argparse
import functools
import os
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


def existing_folder(text: str) -> str:
    """An argparse type: a folder that exists."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder")
    return text


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


def with_exit_codes(prog: str, work):
    """``work(...)`` under the exit-code convention: Ctrl-C is one line and exit 130, an OSError (a folder
    that cannot be written, a disk that is full) one line and exit 1, never a traceback."""
    @functools.wraps(work)
    def run(*args, **kwargs) -> int:
        try:
            return work(*args, **kwargs)
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except OSError as e:
            return fail(prog, str(e))

    return run

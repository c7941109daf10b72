"""What the model commands share: argument types that validate, and one error convention.

Every ``python -m models`` command parses with :class:`Parser` and runs under :func:`command`: exit 2
for a bad argument found before any work (argparse ``type=`` functions below, :class:`UsageError`),
1 for a failure while working, 130 when interrupted, each with one line; a traceback only with
``--debug`` (docs/ARCHITECTURE.md, "Command-line conventions"). The two type= functions that open a
file live beside the code that reads it, so that this module imports nothing of the project but ``errors``.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from pathlib import Path

from .errors import UsageError, one_line


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error, no abbreviated options (a typo never means --overwrite), and --debug."""

    def __init__(self, prog: str, **kw):
        super().__init__(prog=prog, allow_abbrev=False, **kw)
        self.add_argument("--debug", action="store_true", help="show the traceback of a failure")

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


# Failures a command expects and explains in its message; anything else is reported
# with its type (and is a bug to fix).
EXPECTED = (ValueError, OSError, RuntimeError, LookupError)


def command(name: str, prog: str | None = None):
    """Decorate ``main(argv) -> int``: the exit-code convention above, one line on stderr
    (which begins with ``prog``, by default ``python -m models <name>``)."""
    prog = prog or f"python -m models {name}"

    def wrap(main_fn):
        @functools.wraps(main_fn)
        def wrapper(argv=None) -> int:
            argv = list(sys.argv[1:] if argv is None else argv)
            debug = "--debug" in argv
            try:
                return int(main_fn(argv) or 0)
            except SystemExit as e:  # --help; a torch.distributed launcher's exit
                return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130
            except UsageError as e:
                if debug:
                    raise
                print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
                return 2
            except Exception as e:  # noqa: BLE001 -- the point: one line, never a traceback
                if debug:
                    raise
                text = one_line(e) or type(e).__name__
                if not isinstance(e, EXPECTED):
                    text = f"{type(e).__name__}: {text} (a bug: {prog} --debug shows where)"
                print(f"{prog}: error: {text}", file=sys.stderr)
                return 1

        return wrapper

    return wrap


# argparse type= functions

def _range_text(lo, hi, lo_open=False, hi_open=False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return ""


def _bounded(what: str, convert, lo, hi, lo_open=False, hi_open=False):
    """A type= function: `convert(text)`, finite, in the range (open or closed at each end)."""
    expect = f"{what} {_range_text(lo, hi, lo_open, hi_open)}".strip()

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = math.nan
        inside = (lo is None or (value > lo if lo_open else value >= lo)) and (
            hi is None or (value < hi if hi_open else value <= hi))
        if not (inside and (isinstance(value, int) or math.isfinite(value))):
            raise argparse.ArgumentTypeError(f"expected {expect}, got {text!r}")
        return value

    parse.__name__ = what.split()[-1]
    return parse


def integer(lo: int | None = None, hi: int | None = None):
    """An int in [lo, hi] (either bound may be None)."""
    return _bounded("an integer", lambda text: int(text, 10), lo, hi)


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    """A finite float in the range (open or closed at each end); never nan or inf."""
    return _bounded("a finite number", float, lo, hi, lo_open, hi_open)


SEED = integer(0, 2**32 - 1)
THREADS = integer(1, 4096)


def add_threads_flag(group) -> None:
    """--threads: torch's CPU threads (models.runtime.configure_threads)."""
    group.add_argument("--threads", type=THREADS, default=None,
                       help="torch CPU threads (default: all cores, or 1 when other processes keep them busy)")


def check_value(name: str, value, parse) -> None:
    """ValueError naming ``name`` unless ``value`` (a number from Python code) passes ``parse`` (a type= function).

    The same ranges for the command line and for the Python API (TrainArgs, build_database).
    """
    import numbers

    try:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}")
        parse(repr(float(value)) if isinstance(value, float) else str(value))
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"{name}: {e}") from None


def device(text: str) -> str:
    """auto, cpu, cuda or cuda:N, where the GPU exists on this machine."""
    expect = "auto, cpu, cuda or cuda:N"
    name = text.strip()
    if name in ("auto", "cpu"):
        return name
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = 0 if name == "cuda" else int(name[5:])
        if index >= count:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not available: this machine has {count} CUDA GPU(s) (expected {expect})")
        return name
    raise argparse.ArgumentTypeError(f"expected {expect}, got {text!r}")


def existing_path(text: str) -> str:
    if not text or not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text!r} does not exist")
    return text


def database(text: str) -> str:
    """A folder holding a retrieval database (its manifest is checked when it is opened)."""
    path = Path(text)
    if not (path / "manifest.json").is_file():
        why = "does not exist" if not path.exists() else "has no manifest.json"
        raise argparse.ArgumentTypeError(
            f"no retrieval database at {text!r} ({why}); build one with `python -m models build-db --out {text}`")
    return text


def folder(text: str) -> str:
    """A folder to write into: an existing folder, or one that can be created (not a file)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a folder path, got ''")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, expected a folder")
    ancestor = path.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} cannot be created: {str(ancestor)!r} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r} is not writable ({str(ancestor)!r} is not writable)")
    return text


def output_file(text: str) -> str:
    """A file to write: in an existing, writable folder, and not a folder itself."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file path, got ''")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, expected a file")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written: the folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written: {str(parent)!r} is not writable")
    return text


def text(what: str):
    """A non-empty string (after stripping)."""
    def parse(value: str) -> str:
        if not value.strip():
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        return value

    parse.__name__ = "text"
    return parse

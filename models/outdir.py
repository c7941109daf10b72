"""Output folders: which command made a folder (a marker), which run uses it now (a lock).

A command deletes or replaces only what it can prove it made itself (docs/ARCHITECTURE.md, "What a
command may delete or replace"): it writes into a folder only if it is new or empty or holds its own
marker ``.retro_kernels.json``; inside, it deletes only files it names and its own temporaries; while
it runs it holds ``.retro_kernels.lock`` (``fcntl.flock``), which the kernel drops when the process dies.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
import shlex
import socket
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from .atomic import write_json_atomic
from .errors import UsageError

MARKER = ".retro_kernels.json"
LOCK = ".retro_kernels.lock"
MARKER_VERSION = 1
BOOKKEEPING = (MARKER, LOCK)  # never a user's content: a folder holding only these is empty

KINDS = {"retrieval-db": "build-db", "train-run": "train", "retrofit": "retrofit", "demo": "demo"}


class OutputFolderError(UsageError):
    """An output folder that the command may not write into (exit 2: choose another)."""


class FolderInUse(RuntimeError):
    """Another run holds the folder's lock."""


def _json_object(path) -> Optional[dict]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def read_marker(folder: Path) -> Optional[dict]:
    """The folder's marker ({"kind", "version", ...}), or None if it has none or it is not ours."""
    data = _json_object(Path(folder) / MARKER)
    return data if data and data.get("kind") in KINDS and isinstance(data.get("version"), int) else None


def user_entries(folder: Path) -> list[str]:
    """Names in the folder other than our bookkeeping files."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name not in BOOKKEEPING)


def check_folder(folder, kind: str, option: str = "--out") -> str:
    """Whether a command of ``kind`` may write into ``folder``: "new", "empty" or "ours".

    Raises OutputFolderError (naming ``option``) for a file, a folder another
    command made, or a non-empty folder that no command of ours made. Changes nothing.
    """
    path = Path(folder)
    command = KINDS[kind]
    if not path.exists():
        return "new"
    if not path.is_dir():
        raise OutputFolderError(f"{option} {str(path)!r} is a file, expected a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputFolderError(f"{option} {str(path)!r} is not writable")
    marker = read_marker(path)
    if marker is not None:
        if marker["kind"] != kind:
            raise OutputFolderError(
                f"{option} {str(path)!r} holds the output of `{KINDS[marker['kind']]}` ({marker['kind']}), "
                f"not of `{command}`; choose another folder")
        if marker["version"] > MARKER_VERSION:
            raise OutputFolderError(f"{option} {str(path)!r} was made by a newer version of `{command}` "
                                    f"(marker version {marker['version']}); choose another folder")
        return "ours"
    entries = user_entries(path)
    if not entries:
        return "empty"
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    raise OutputFolderError(
        f"{option} {str(path)!r} is not empty ({shown}) and was not made by `{command}`; it deletes nothing "
        f"it did not make: choose a new or empty folder")


def write_marker(folder: Path, kind: str) -> None:
    path = Path(folder)
    if read_marker(path) is None:
        write_json_atomic(path / MARKER, {"kind": kind, "version": MARKER_VERSION, "made_by": command_line(),
                                          "created": _now()})


def command_line() -> str:
    """This process's command, as typed: `python -m models train ...` (for a lock's holder, a marker's maker)."""
    argv = list(sys.argv) or ["python"]
    first = Path(argv[0])
    head = ["python", "-m", first.parent.name] if first.name == "__main__.py" else [first.name]
    return shlex.join(head + argv[1:])


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@contextlib.contextmanager
def locked(folder, option: str = "--out") -> Iterator[None]:
    """Hold ``folder/.retro_kernels.lock`` (flock, released when the file closes) or raise FolderInUse."""
    folder = Path(folder)
    with open(folder / LOCK, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise FolderInUse(f"{option} {str(folder)!r} is in use by another run ({describe_holder(f.read())}); "
                              f"wait for it to finish or choose another folder") from None
        f.seek(0)
        f.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "command": command_line(), "since": _now()}, f)
        f.flush()
        yield


def describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}, since {h['since']}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


@contextlib.contextmanager
def claimed(folder, kind: str, option: str = "--out", temporaries: Iterable[re.Pattern] = (), inside: Iterable = (),
            check: Optional[Callable[[], str]] = None) -> Iterator[str]:
    """Check, create, lock and mark ``folder`` for a run of ``kind``; yields its state ("new"/"empty"/"ours").

    ``check()``: the command's refusals (default: ``check_folder``; a command's own adds, say, a finished
    run without --overwrite), before the folder is made and again under the lock. Under the lock, the
    leftovers of killed runs (names matching ``temporaries``; folders among them only if they hold
    nothing but ``inside``) are removed.
    """
    path = Path(folder)
    check = check or (lambda: check_folder(path, kind, option))
    state = check()
    path.mkdir(parents=True, exist_ok=True)
    with locked(path, option):
        check()  # again, under the lock: another run may have won
        write_marker(path, kind)
        remove_temporaries(path, temporaries, inside)
        yield state


def remove_temporaries(folder: Path, patterns: Iterable[re.Pattern], inside: Iterable = ()) -> list[str]:
    """Delete the entries of ``folder`` whose whole name matches one of ``patterns``.

    A matching folder is removed only if every entry in it is a file whose name
    is in ``inside`` (names or patterns); otherwise it is left alone, whole.
    Returns the names removed.
    """
    patterns = list(patterns)
    inside = [re.compile(re.escape(p)) if isinstance(p, str) else p for p in inside]
    removed = []
    for entry in sorted(Path(folder).iterdir()):
        if not any(p.fullmatch(entry.name) for p in patterns):
            continue
        if entry.is_dir() and not entry.is_symlink():
            content = list(entry.iterdir())
            if all(c.is_file() and not c.is_symlink() and any(p.fullmatch(c.name) for p in inside) for c in content):
                for c in content:
                    c.unlink()
                entry.rmdir()
                removed.append(entry.name)
        elif entry.is_file() or entry.is_symlink():
            entry.unlink()
            removed.append(entry.name)
    return removed


REPORT_KINDS = {"eval-report": "eval", "demo-results": "demo"}


def report_kind(kind: str) -> str:
    return f"retro_kernels/{kind}"


def read_report(path) -> Optional[dict]:
    """A JSON report we wrote (it carries our "kind"), or None."""
    data = _json_object(path)
    return data if data and isinstance(data.get("kind"), str) else None


def check_own_file(path, kind: str, option: str = "--out", named_by: Optional[Path] = None) -> None:
    """Refuse to replace ``path`` unless it does not exist, or is a ``kind`` report of ours, or is
    the file that our report ``named_by`` names (its plot). Changes nothing."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir():
        raise OutputFolderError(f"{option} {str(path)!r} is a folder, expected a file")
    report = read_report(named_by if named_by is not None else path)
    if report is not None and report.get("kind") == report_kind(kind):
        if named_by is None or report.get("plot") == str(path.resolve()):
            return
    command = REPORT_KINDS[kind]
    raise OutputFolderError(f"{option} {str(path)!r} exists and was not written by `{command}`; it replaces only "
                            f"its own files: choose another path or move that file away")

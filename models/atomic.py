"""Files written whole or not at all: a temporary beside the file, made durable, renamed over it.

A reader never sees half a file, and a run killed at any instant leaves the
old file intact and at worst a temporary named ``<name>.tmp`` + 8 random
characters (``temporaries``), which the command that owns the folder removes
on its next run (models.outdir). Every writer of the project (checkpoints,
manifests, reports, the database's files) goes through ``atomic_file``.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

TEMP_SUFFIX = r"\.tmp[a-z0-9_]{8}"  # what atomic_file appends to a file's name: .tmp + mkstemp's 8 characters


def temporaries(*names: str) -> tuple[re.Pattern, ...]:
    """The names atomic_file's temporaries of the files ``names`` have."""
    return tuple(re.compile(re.escape(name) + TEMP_SUFFIX) for name in names)


def umask_mode() -> int:
    """The mode a plain open() would give a new file (mkstemp's temporaries are 0600: chmod them to this)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_file(final) -> Iterator[Path]:
    """Yield a temporary path beside ``final`` (``<name>.tmpXXXXXXXX``, the folder made if need be) to write;
    when the block ends, give it the umask's mode, fsync it and rename it over ``final``.

    On an exception the temporary is removed and ``final`` is untouched. The mode is set after the
    block: a writer that makes the file anew (safetensors) would leave mkstemp's 0600.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=final.name + ".tmp", suffix="")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, umask_mode())
        with open(tmp, "rb+") as f:  # the bytes are on disk before the name is
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path, obj) -> None:
    """``obj`` as indented, key-sorted JSON in ``path``, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def fsync_dir(path) -> None:
    """Make a rename inside folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

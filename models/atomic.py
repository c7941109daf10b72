"""Files written whole or not at all: a temporary beside the file, made durable, renamed over it.

A reader never sees half a file, and a run killed at any instant leaves the
old file intact and at worst a temporary whose whole name follows the
writer's pattern (`prefix` + 8 random characters + `suffix`), which the
command that owns the folder removes on its next run (models.outdir).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional


def umask_mode() -> int:
    """The mode a plain open() would give a new file (mkstemp's temporaries are 0600: chmod them to this)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_file(final, prefix: Optional[str] = None, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``final`` (default name ``.<final name>.XXXXXXXX.tmp``) to write;
    when the block ends, give it the umask's mode, fsync it and rename it over ``final``.

    On an exception the temporary is removed and ``final`` is untouched. The mode is set after the
    block: a writer that makes the file anew (safetensors) would leave mkstemp's 0600.
    """
    final = Path(final)
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}." if prefix is None else prefix,
                                suffix=suffix)
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
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))


def fsync_dir(path) -> None:
    """Make a rename inside folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""The kinds of error a command reports, and the one line it reports them in.

The bottom of models/: it imports nothing of the project, so that every
module (checkpoints, output folders, the command-line helpers) can raise and
word its errors the same way. `models.cli_common.command` turns them into exit
codes (docs/ARCHITECTURE.md, "Command-line conventions").
"""
from __future__ import annotations


class UsageError(ValueError):
    """A bad argument (or combination of arguments), found before any work: exit status 2."""


def one_line(message: str) -> str:
    """A message on one line: its lines joined (after a colon by a space, else by '; ')."""
    parts = [p.strip() for p in str(message).splitlines() if p.strip()]
    out = parts[0] if parts else ""
    for prev, part in zip(parts, parts[1:]):
        out += (" " if prev.endswith(":") else "; ") + part
    return out

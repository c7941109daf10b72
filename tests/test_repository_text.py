"""The repository speaks of the project alone and points at nothing outside itself.

The specification is docs/spec.md; no tracked file may send a reader to a design
file beside the checkout, or to a numbered issue of a tracker a clone does not carry.
"""
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Built from parts so that this file does not match itself.
FORBIDDEN = re.compile("|".join([re.escape("DESI" + "GN.md"), re.escape(".." + "/shared"),
                                 r"\b[Ii]ssues? ?#?[0-9]+\b"]))


def tracked_text_files():
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    for name in listed.stdout.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file() or re.fullmatch(r"bench/results/.*\.jsonl", name):
            continue
        data = path.read_bytes()
        if b"\0" not in data:  # binary files hold no prose
            yield name, data.decode("utf-8", errors="replace")


def test_no_tracked_file_points_outside_the_repository_or_at_issue_numbers():
    found = [f"{name}:{n}: {line.strip()}"
             for name, text in tracked_text_files()
             for n, line in enumerate(text.splitlines(), 1) if FORBIDDEN.search(line)]
    assert not found, "point at docs/spec.md instead, and say what, not which issue:\n" + "\n".join(found)

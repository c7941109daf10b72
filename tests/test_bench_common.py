"""The benchmark suite's bookkeeping: cost models, rates, targets, rows, results files, hooks.

No timing is asserted here (speed is measured in bench/, never in tests).
"""
import json
import sys
import types

import pytest
import torch

from bench import cli, common, ops


def test_cca_cost_model_matches_design_at_paper_shape():
    bench = ops.CCABench()
    s = dict(B=16, N=2048, m=64, K=2, R=128, Hq=16, Hkv=16, D=128, mask=False)
    case = ops.Case("paper", 128, s, "fp16")
    flops, nbytes = bench.cost(case, "fwd")
    used, rows = 2048 // 64, 2048 - 63
    assert flops == 4 * 16 * 16 * rows * 256 * 128
    assert nbytes == 2 * (2 * 16 * 2048 * 16 * 128 + 2 * 16 * used * 2 * 128 * 16 * 128)
    bwd_flops, bwd_bytes = bench.cost(case, "bwd")
    assert bwd_flops == 2.5 * flops
    # read q, out, dout, k, v and the fp32 statistics; write dq, dk, dv
    assert bwd_bytes == 2 * nbytes + 4 * 16 * 16 * 2048
    both = bench.cost(case, "fwd+bwd")
    assert both == (flops + bwd_flops, nbytes + bwd_bytes)
    # about 51 FLOP per byte at these shapes in 16-bit types, as docs/spec.md#cost-model says
    per_chunk_head_flops = 4 * 64 * 256 * 128
    per_chunk_head_bytes = 2 * (64 * 128 + 2 * 256 * 128 + 64 * 128)
    assert 45 < per_chunk_head_flops / per_chunk_head_bytes < 55


def test_neighbour_cost_models():
    s = dict(B=2, L=3, K=2, R=8, M=4, Hq=4, Hkv=2, D=16, mask=True)
    nsa_flops, nsa_bytes = ops.NSABench().cost(ops.Case("base", None, s, "fp32"), "fwd")
    assert nsa_flops == 4 * 12 * 4 * 8 * 8 * 16
    assert nsa_bytes == 4 * (2 * 12 * 8 * 4 * 16 + 2 * 12 * 8 * 2 * 16)
    nca_flops, nca_bytes = ops.NCABench().cost(ops.Case("base", None, s, "fp32"), "fwd")
    assert nca_flops == 4 * 6 * 4 * 16 * 4 * 16
    assert nca_bytes == 4 * (2 * 6 * 16 * 4 * 16 + 2 * 6 * 4 * 2 * 16)


def test_rates_and_targets_are_filled_from_time_flops_bytes():
    ctx = common.RunContext(torch.device("cpu"), quick=True)
    ctx.peak_gbps, ctx.peak_tflops = 100.0, {"fp32": 2.0}
    row = common.make_row("ops", "chunked_cross_attention", "retro_kernels:cpu", "ok", role="ours",
                          dtype="fp32", time_ms=2.0, flops=2e9, bytes=1e8,
                          speedup={"sdpa": 1.5, "reference": 0.9},
                          targets={"roofline_pct_min": 85, "speedup_min": {"sdpa": 1.25, "reference": 1.0}})
    full = ctx.finalize_row(row)
    assert full["tflops"] == pytest.approx(1.0)
    assert full["gbps"] == pytest.approx(50.0)
    assert full["roofline_pct"] == pytest.approx(50.0)
    assert full["matmul_pct"] == pytest.approx(50.0)
    assert full["targets_met"] == {"roofline_pct_min": False, "speedup_vs_sdpa": True,
                                   "speedup_vs_reference": False}
    for key in ("run_id", "date", "commit", "versions", "device_name", "device_slug", "peak_gbps"):
        assert key in full
    assert full["device_slug"].startswith("cpu-")


def test_rows_are_checked():
    ctx = common.RunContext(torch.device("cpu"), quick=True)
    with pytest.raises(ValueError, match="needs suite, name, impl"):
        ctx.finalize_row({"suite": "model", "impl": "x", "status": "ok"})
    with pytest.raises(ValueError, match="status"):
        ctx.finalize_row({"suite": "model", "name": "n", "impl": "x", "status": "great"})
    # unknown keyword fields land in metrics
    row = common.make_row("model", "train_step", "fused", tokens_per_s=123.0)
    assert row["metrics"] == {"tokens_per_s": 123.0}


def test_speedups_are_peer_time_over_ours_per_problem_and_mode():
    rows = [
        common.make_row("ops", "op", "retro_kernels:triton", role="ours", mode="fwd", time_ms=1.0),
        common.make_row("ops", "op", "sdpa", mode="fwd", time_ms=3.0),
        common.make_row("ops", "op", "sdpa", mode="bwd", time_ms=8.0),
        common.make_row("ops", "op", "retro_kernels:triton", role="ours", mode="bwd", time_ms=2.0),
        common.make_row("ops", "op", "sdpa", mode="fwd", time_ms=9.0, shape={"B": 2}),
    ]
    gains = common.speedups(rows)
    assert gains == {id(rows[0]): {"sdpa": 3.0}, id(rows[3]): {"sdpa": 4.0}}


def test_jsonl_is_appended_and_read_back(tmp_path):
    rows = [common.make_row("ops", "op", "sdpa", time_ms=1.0, shape={"B": 1})]
    path = common.append_jsonl(rows, str(tmp_path), "cpu-test")
    common.append_jsonl(rows, str(tmp_path), "cpu-test")
    with open(path, "a") as f:
        f.write('{"truncated": ')  # an interrupted write
    back, bad = common.read_jsonl(path)
    assert len(back) == 2 and bad == 1 and back[0]["shape"] == {"B": 1}
    json.dumps(back)


def test_a_failing_suite_is_a_row_and_a_foreign_row_is_kept_whole(monkeypatch):
    broken = types.ModuleType("bench._broken_suite")

    def run(quick, device):
        raise RuntimeError("boom")

    broken.run = run
    monkeypatch.setitem(sys.modules, "bench._broken_suite", broken)
    monkeypatch.setitem(cli.SUITES, "broken", "bench._broken_suite")
    rows = cli.suite_rows("broken", dict(quick=True, device=torch.device("cpu")))
    assert rows[0]["status"] == "failed" and "boom" in rows[0]["reason"]

    own = types.ModuleType("bench._own_format")
    own.run = lambda quick: [{"suite": "own", "case": "embed", "chunks_per_s": 5.0}]
    monkeypatch.setitem(sys.modules, "bench._own_format", own)
    monkeypatch.setitem(cli.SUITES, "own", "bench._own_format")
    rows = cli.suite_rows("own", dict(quick=True, device=torch.device("cpu")))
    assert rows[0]["status"] == "ok" and rows[0]["name"] == "embed" and rows[0]["metrics"] == {"chunks_per_s": 5.0}


def test_padding_masks_never_hide_a_whole_row():
    g = torch.Generator().manual_seed(0)
    mask = ops._padding_mask((4, 8, 2), 16, g, "cpu")
    assert mask.shape == (4, 8, 2, 16)
    assert mask.any(-1).all()
    assert (~mask).any()


def test_every_op_has_cases_in_every_setting():
    for bench in ops.OP_BENCHES:
        for quick in (True, False):
            cases = bench.cases(torch.device("cpu"), quick, ["fp32"])
            assert cases and all(c.dtype == "fp32" for c in cases)
        gpu_cases = bench.cases(torch.device("cuda"), False, ["fp16", "bf16"])
        assert {c.dtype for c in gpu_cases} == {"fp16", "bf16"}
    paper = [c for c in ops.CCABench().cases(torch.device("cuda"), False, ["fp16"]) if c.sweep == "paper"]
    for c in paper:
        s = c.shape
        assert (s["N"], s["m"], s["K"], s["R"], s["Hq"]) == (2048, 64, 2, 128, 16)
        assert 16384 <= s["B"] * s["N"] <= 65536


def test_report_draws_history_and_sweeps(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.report import make_report

    ctx = common.RunContext(torch.device("cpu"), quick=False)
    ctx.peak_gbps, ctx.peak_tflops = 10.0, {"fp32": 0.1}
    base = dict(B=1, N=64, m=16, K=2, R=8, Hq=2, Hkv=2, D=8, mask=False)
    rows = []
    for impl, role in (("retro_kernels:cpu", "ours"), ("sdpa", "peer")):
        rows.append(common.make_row("ops", "chunked_cross_attention", impl, role=role, mode="fwd",
                                    sweep="base", shape=base, dtype="fp32", time_ms=1.0, bytes=1e6))
        for K in (1, 4):
            rows.append(common.make_row("ops", "chunked_cross_attention", impl, role=role, mode="fwd",
                                        sweep="K", sweep_value=K, shape={**base, "K": K}, dtype="fp32",
                                        time_ms=float(K), bytes=1e6))
    common.append_jsonl([ctx.finalize_row(r) for r in rows], str(tmp_path), "cpu-test")
    assert make_report(str(tmp_path)) == 0
    plots = tmp_path / "plots" / "cpu-test"
    assert (plots / "history-chunked-cross-attention.png").stat().st_size > 0
    assert (plots / "sweep-chunked-cross-attention-k-fwd.png").stat().st_size > 0


def test_sweeps_and_ops_can_be_selected():
    cpu = torch.device("cpu")
    assert ops.run(True, cpu, ["fp32"], log=lambda *a: None, sweeps={"no-such-sweep"}) == []
    assert ops.run(True, cpu, ["fp32"], log=lambda *a: None, ops={"no-such-op"}) == []

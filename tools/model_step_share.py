"""How much of `python -m bench model`'s CPU training step the fused kernels are, and the
most the step could gain from them (Amdahl's bound): docs/native.md quotes it.

    python tools/model_step_share.py [--threads N] [--steps N]

Times the fused (`auto`) and reference models' steps interleaved (median of --steps each),
then profiles one fused step: the self CPU time of every retro_kernels_cpu:: op against the
whole step. The bound is reference / (fused x (1 - that share)): the ratio if the kernels
took no time at all.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.model import SHAPES, _ours  # noqa: E402


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=positive, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--steps", type=positive, default=7, help="timed steps per model (default 7)")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    steps = {k: _ours(SHAPES["cpu"], torch.device("cpu"), k)[0] for k in ("auto", "reference")}
    for step in steps.values():  # warm-up: the GEMM choice, allocations
        step()
        step()
    times = {k: [] for k in steps}
    for _ in range(a.steps):
        for k, step in steps.items():
            t = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t)
    fused, reference = (statistics.median(times[k]) * 1e3 for k in ("auto", "reference"))
    with torch.profiler.profile() as prof:
        steps["auto"]()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    ours = sum(e.self_cpu_time_total for e in events if e.key.startswith("retro_kernels_cpu::")) / 1e3
    mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm")) / 1e3
    print(f"{a.threads} threads, {SHAPES['cpu']}: fused {fused:.1f} ms, reference {reference:.1f} ms "
          f"(median of {a.steps}), {reference / fused:.2f}x")
    print(f"one fused step profiled: {total:.1f} ms self CPU; retro_kernels_cpu ops {ours:.1f} ms "
          f"({ours / total:.0%}), aten mm {mm:.1f} ms ({mm / total:.0%})")
    print(f"bound if the fused kernels took no time: {reference / (fused * (1 - ours / total)):.2f}x")


if __name__ == "__main__":
    main()

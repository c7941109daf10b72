"""One test harness for every op, parametrised by the op's spec (retro_kernels/ops/spec.py).

An op's test file (tests/test_<op>.py) subclasses `OpTests`: the op's `Op`, its
table of cases, its own mask kinds and whatever else is particular to it. Every
test here then runs for that op on every fused backend, in every dtype it
declares (backends.declared: the one way the tests find backends; what cannot
run here is skipped, saying why), against the reference, forward and backward,
under the tolerances of docs/spec.md#tolerances (tolerances.py):

- the case table, which must hold the awkward cases (`AWKWARD`: head dims that
  are not powers of two, grouped-query and multi-query heads, no mask, and the
  op's own: N % m != 0, N < m, ...); paper-sized cases run on a GPU only;
- a custom scale, a mask that hides everything, strided inputs, random shapes;
- a bitwise-deterministic backward, opcheck of both custom ops,
  torch.compile(fullgraph=True);
- the backend choice and its reasons; bad input, refused with a one-line error
  naming the argument before any backend is chosen.

Parametrisation, by argument name: `backend` and `dtype` (every backend with
kernels for the op, in every dtype it declares; a pair that cannot run here is
skipped with dispatch's reasons), with `case` (every case of the table that
backend takes); `backend` alone (each backend, in its first dtype);
`exact_backend` ("reference" and the backends that run fp32); `bad` (the
bad-input table).
"""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import retro_kernels as rk
from retro_kernels import BackendNotSupported, dispatch
from retro_kernels.ops.spec import SCALE, dims_of

from backends import DEVICE, DTYPE_IDS, declared, device_of, probe_inputs, runnable, why_not
from tolerances import assert_close_to_reference

GRADS = ("dq", "dk", "dv")


@dataclasses.dataclass(frozen=True)
class Case:
    """Inputs of one test: a size for every dim the spec names, a mask kind, the op's scalars."""
    dims: dict
    mask: str | None = None  # None, a kind of OpTests.MASKS, or "random", "all", "first"
    scalars: dict = dataclasses.field(default_factory=dict)  # the scale defaults to D ** -0.5
    backends: tuple[str, ...] | None = None  # only these (cases chosen for one kernel's tiles)
    gpu: bool = False  # paper-sized: on a GPU only

    def __getitem__(self, dim: str) -> int:
        return self.dims[dim]


# Mask kinds every op has (an op adds its own in OpTests.MASKS): fn(shape, device) -> bool tensor.
def random_mask(shape, device):
    return torch.rand(shape, device=device) > 0.3


def hide_first(shape, device):
    """Random, and every token of the first chunk (or the first chunk's neighbours) hidden."""
    mask = random_mask(shape, device)
    mask[:, 0] = False
    return mask


GENERIC_MASKS = {
    "random": random_mask,
    "first": hide_first,
    "all": lambda shape, device: torch.zeros(shape, dtype=torch.bool, device=device),
}


def _power_of_two(n: int) -> bool:
    return n & (n - 1) == 0


# The awkward cases every op's table must hold, for every backend (cases with backends=None).
AWKWARD = {
    "a head dim that is not a power of two": lambda c: not _power_of_two(c["D"]),
    "grouped-query heads (Hq > Hkv > 1)": lambda c: c["Hq"] > c["Hkv"] > 1,
    "multi-query heads (Hkv == 1 < Hq)": lambda c: c["Hkv"] == 1 < c["Hq"],
    "no mask": lambda c: c.mask is None,
    "a mask": lambda c: c.mask is not None,
}


class OpTests:
    """The tests every op gets; a subclass in tests/test_<op>.py says what is particular to the op.

    OP: the op's `Op` (retro_kernels.ops.<op>.OP).
    CASES: {id: Case}; GPU cases (gpu=True) run where a backend runs on a GPU.
    MASKS: the op's own mask kinds, {kind: fn(shape, device)}.
    AWKWARD: the op's own awkward cases the table must hold, {what: predicate(case)}.
    SMALL: a small case with a mask (opcheck, compile, strided inputs, bad input, ...).
    DETERMINISM: cases with several tiles of rows and keys (and, for the native kernels,
        many tasks over threads), for the determinism test.
    RANDOM_EXAMPLES, random_cases(): hypothesis's budget and a strategy of random Cases.
    """
    OP = None
    CASES: dict = {}
    MASKS: dict = {}
    AWKWARD: dict = {}
    SMALL: Case = None
    DETERMINISM: tuple[Case, ...] = ()
    RANDOM_EXAMPLES = 12

    # -- parametrisation ------------------------------------------------------------------

    def pytest_generate_tests(self, metafunc):
        names, op = metafunc.fixturenames, self.spec.name
        backends = sorted({b for b, _ in declared(op)}, key=dispatch.FUSED_BACKENDS.index)
        if "case" in names:
            params = [pytest.param(b, d, c, id=f"{b}-{DTYPE_IDS[d]}-{c}",
                                   marks=[pytest.mark.gpu] if self.CASES[c].gpu else [])
                      for b, d in declared(op) for c in self.CASES if self._takes(b, self.CASES[c])]
            metafunc.parametrize("backend, dtype, case", params)
        elif "dtype" in names:
            metafunc.parametrize("backend, dtype", [pytest.param(b, d, id=f"{b}-{DTYPE_IDS[d]}")
                                                    for b, d in declared(op) if d in (torch.float32, torch.bfloat16)])
        elif "backend" in names:
            metafunc.parametrize("backend", backends)
        elif "exact_backend" in names:
            metafunc.parametrize("exact_backend", ["reference"] + [b for b, d in declared(op) if d == torch.float32])
        elif "bad" in names:
            metafunc.parametrize("bad", list(self.bad_inputs()))

    @pytest.fixture(autouse=True)
    def _skip_what_cannot_run_here(self, request):
        """A backend and dtype that cannot run here are skipped, with dispatch's reasons."""
        params = getattr(request.node, "callspec", None)
        params = params.params if params else {}
        backend = params.get("backend", params.get("exact_backend", "reference"))
        if backend != "reference":
            reasons = why_not(self.spec.name, backend, params.get("dtype", self.dtype_of(backend)))
            if reasons:
                pytest.skip(f"{backend}: " + "; ".join(reasons))

    def _takes(self, backend: str, case: Case) -> bool:
        """Whether `backend` is tested on `case`: its own cases, and GPU cases where it runs on GPUs."""
        return ((case.backends is None or backend in case.backends)
                and (not case.gpu or "cuda" in dispatch.DECLARED[backend].devices))

    # -- the op, its inputs and the comparison with the reference ---------------------------

    @property
    def spec(self):
        return self.OP.spec

    def dtype_of(self, backend: str) -> torch.dtype:
        """The first dtype `backend` declares (fp32, or fp16 for the CUDA kernels)."""
        return torch.float32 if backend == "reference" else next(d for b, d in declared(self.spec.name) if b == backend)

    def device(self, backend: str) -> torch.device:
        return DEVICE if backend in ("reference", "auto") else device_of(backend)

    def call(self, q, k, v, mask, scalars: dict, backend: str):
        """The public op (rk.<name>), with the mask and scalars by name."""
        return getattr(rk, self.spec.name)(q, k, v, **{self.spec.mask: mask}, **scalars, backend=backend)

    def make_mask(self, kind, shape, device):
        return None if kind is None else {**GENERIC_MASKS, **self.MASKS}[kind](shape, device)

    def inputs(self, case: Case, dtype=torch.float32, device=DEVICE):
        """Random q, k, v and mask of `case`."""
        shape = lambda layout: [case[d] for d in dims_of(layout)]  # noqa: E731
        q, k, v = (torch.randn(shape(layout), device=device).to(dtype) for layout in (self.spec.q,) + (self.spec.kv,) * 2)
        return q, k, v, self.make_mask(case.mask, shape(self.spec.mask_layout), device)

    def run(self, backend, q, k, v, mask, scalars, dout):
        """Output and (dq, dk, dv), with q, k, v themselves as the leaves (views keep their strides)."""
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = self.call(*leaves, mask, scalars, backend)
        return (out.detach(),) + torch.autograd.grad(out, leaves, dout)

    def check_against_reference(self, backend, q, k, v, mask, scalars=None, dout=None):
        """Output and gradients of `backend` against the fp32 (and the eager low-precision) reference."""
        scalars = scalars or {}
        dout = torch.randn(q.shape, device=q.device).to(q.dtype) if dout is None else dout
        got = self.run(backend, q, k, v, mask, scalars, dout)
        want32 = self.run("reference", q.float(), k.float(), v.float(), mask, scalars, dout.float())
        want_lp = (None,) * 4 if q.dtype == torch.float32 else self.run("reference", q, k, v, mask, scalars, dout)
        for name, g, w32, wlp in zip(("out",) + GRADS, got, want32, want_lp):
            assert g.dtype == q.dtype, f"{backend} {name}: {g.dtype}"
            if backend in dispatch.FUSED_BACKENDS:
                assert g.is_contiguous(), f"{backend} {name} is not contiguous"
            assert_close_to_reference(f"{backend} {name}", g, w32, wlp, factor=2.0 if name == "out" else 3.0)
        self.check_particulars(mask, got[0], got[1])
        return got

    def check_particulars(self, mask, out, dq) -> None:
        """What the op promises beyond matching the reference (e.g. zero padding rows)."""

    def check_case(self, backend: str, case: Case, dtype, device=None):
        """Check `backend` on `case`; a backend that refuses it says why, and "auto" still runs it."""
        device = device or self.device(backend)
        q, k, v, mask = self.inputs(case, dtype, device)
        reasons = dispatch.not_supported_reasons(backend, self.spec.name, q=q, k=k, v=v, **{self.spec.mask: mask})
        if reasons:  # e.g. the CUDA kernels' tiles stop at head dim 128
            with pytest.raises(BackendNotSupported, match=re.escape(reasons[0])):
                self.call(q, k, v, mask, case.scalars, backend)
            backend = "auto"
        return self.check_against_reference(backend, q, k, v, mask, case.scalars)

    # -- every backend against the reference -----------------------------------------------

    def test_case_table_holds_the_awkward_cases(self):
        shared = [c for c in self.CASES.values() if c.backends is None and not c.gpu]
        for what, holds in {**AWKWARD, **self.AWKWARD}.items():
            assert any(holds(c) for c in shared), f"{self.spec.name}'s cases lack {what}"

    def test_matches_reference(self, backend, dtype, case):
        self.check_case(backend, self.CASES[case], dtype)

    def test_custom_scale(self, backend):
        case = dataclasses.replace(self.SMALL, scalars={**self.SMALL.scalars, SCALE.name: 0.37})
        self.check_case(backend, case, self.dtype_of(backend))

    def test_everything_masked_gives_zeros(self, backend):
        """Every key hidden: zeros out and zero gradients, never NaN."""
        q, k, v, mask = self.inputs(dataclasses.replace(self.SMALL, mask="all"), self.dtype_of(backend),
                                    self.device(backend))
        out, *grads = self.run(backend, q, k, v, mask, self.SMALL.scalars, torch.randn_like(q))
        for name, t in zip(("out",) + GRADS, [out] + grads):
            assert torch.equal(t, torch.zeros_like(t)), name

    def strided(self, layout, case, dtype, device, how):
        """A random view laid out as `layout` that is not contiguous.

        how: "permuted" (every dim but the head dim in reverse memory order: head-major q,
        K and R that do not flatten), "every_other" (every other token of the dim before
        the heads; the head dim at stride 2), "sliced" (a slice of a wider head dim).
        """
        shape = [case[d] for d in dims_of(layout)]
        if how == "permuted":
            n = len(shape)
            order = list(reversed(range(n - 1))) + [n - 1]
            return torch.randn([shape[i] for i in order], device=device).to(dtype).permute(
                [order.index(i) for i in range(n)])
        if how == "every_other":
            wide = shape[:-3] + [2 * shape[-3]] + shape[-2:-1] + [2 * shape[-1]]
            return torch.randn(wide, device=device).to(dtype)[..., ::2, :, ::2]
        return torch.randn(shape[:-1] + [2 * shape[-1] + 8], device=device).to(dtype)[..., :shape[-1]]

    STRIDED = {  # how q, k and v are laid out (see `strided`)
        "permuted": ("permuted", "permuted", "every_other"),
        "sliced": ("sliced", "sliced", "sliced"),  # views of fused projections
    }

    def test_strided_inputs(self, backend, dtype):
        """Views read in place: head-major q, K and R that do not flatten, head dims at stride 2, slices
        of fused projections, a strided mask, and a dout of stride 0 (the gradient of a mean over tokens)."""
        case, device = self.SMALL, self.device(backend)
        mask_shape = [case[d] for d in dims_of(self.spec.mask_layout)]
        for layouts in self.STRIDED.values():
            q, k, v = (self.strided(layout, case, dtype, device, how)
                       for layout, how in zip((self.spec.q, self.spec.kv, self.spec.kv), layouts))
            mask = random_mask(mask_shape[:-1] + [2 * mask_shape[-1]], device)[..., ::2]
            dout = torch.randn(q.shape[-1], device=device).to(dtype).expand(q.shape)
            assert not any(t.is_contiguous() for t in (q, k, v, mask, dout))
            self.check_against_reference(backend, q, k, v, mask, case.scalars, dout)

    def random_cases(self):
        """A hypothesis strategy of small random Cases (the op's test file gives it)."""
        raise NotImplementedError

    def test_random_shapes(self, backend):
        @settings(max_examples=self.RANDOM_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(case=self.random_cases(), seed=st.integers(0, 2**16))
        def check(case, seed):
            torch.manual_seed(seed)
            self.check_case(backend, case, self.dtype_of(backend))

        check()

    def test_backward_is_bitwise_deterministic(self, backend, dtype):
        for case in self.DETERMINISM:
            if not self._takes(backend, case):
                continue
            q, k, v, mask = self.inputs(case, dtype, self.device(backend))
            dout = torch.randn_like(q)
            first = self.run(backend, q, k, v, mask, case.scalars, dout)
            second = self.run(backend, q, k, v, mask, case.scalars, dout)
            for name, a, b in zip(("out",) + GRADS, first, second):
                assert torch.equal(a, b), name

    # -- the custom ops ---------------------------------------------------------------------

    def _custom_op_args(self, backend):
        q, k, v, mask = self.inputs(self.SMALL, self.dtype_of(backend), self.device(backend))
        scalars = {**self.SMALL.scalars, SCALE.name: 0.25}
        return q, k, v, mask, [scalars[s.name] for s in self.spec.scalars]

    def test_opcheck(self, backend):
        q, k, v, mask, scalars = self._custom_op_args(backend)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        for m in (mask, None):
            torch.library.opcheck(self.OP.forward_op, (q, k, v, m, *scalars, backend))
        # the backward op has no derivative of its own (no double backward): plain tensors
        q, k, v = (t.detach() for t in (q, k, v))
        out, lse = self.OP.forward_op(q, k, v, mask, *scalars, backend)
        assert lse.shape == self.spec.lse_shape(q.shape) and lse.dtype == torch.float32
        torch.library.opcheck(self.OP.backward_op, (torch.randn_like(out), q, k, v, mask, out, lse, *scalars, backend))

    def test_torch_compile_fullgraph(self, backend):
        torch._dynamo.reset()
        q, k, v, mask, _ = self._custom_op_args(backend)
        tests, scalars = self, self.SMALL.scalars

        class Block(torch.nn.Module):
            def forward(self, q, k, v, mask):
                return tests.call(q * 1.5, k, v, mask, scalars, backend).float().square().sum()

        block = Block()
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        loss = torch.compile(block, fullgraph=True)(*leaves, mask)
        grads = torch.autograd.grad(loss, leaves)
        eager_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        eager = block(*eager_leaves, mask)
        torch.testing.assert_close(loss, eager)
        for g, e in zip(grads, torch.autograd.grad(eager, eager_leaves)):
            torch.testing.assert_close(g, e)
        torch._dynamo.reset()

    # -- the backend choice -------------------------------------------------------------------

    def test_auto_backend_and_explain(self):
        q, k, v, mask = self.inputs(self.SMALL, device="cpu")
        inputs = {"q": q, "k": k, "v": v, self.spec.mask: mask}
        reasons = rk.explain(self.spec.name, **inputs)
        assert set(reasons) == {"reference", *dispatch.FUSED_BACKENDS} and reasons["reference"] == []
        auto = dispatch.select_backend("auto", self.spec.name, q.device, **inputs)
        assert auto == ("cpu" if ("cpu", torch.float32) in runnable(self.spec.name) else "reference")
        torch.testing.assert_close(self.call(q, k, v, mask, self.SMALL.scalars, "auto"),
                                   self.call(q, k, v, mask, self.SMALL.scalars, "reference"))
        assert any("CUDA" in r for r in reasons["cuda"])  # CPU tensors
        with pytest.raises(BackendNotSupported, match="backend='cuda'"):
            self.call(q, k, v, mask, self.SMALL.scalars, "cuda")

    def test_triton_explains_it_needs_cuda_or_the_interpreter(self, monkeypatch):
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        reasons = dispatch.not_supported_reasons("triton", self.spec.name,
                                                 **probe_inputs(self.spec.name, "cpu", torch.float32))
        assert any("TRITON_INTERPRET=1" in r for r in reasons)

    # -- bad input ---------------------------------------------------------------------------

    def bad_inputs(self) -> dict:
        """{id: (change(args), error, pattern)}: from the spec, and the op's own (`BAD`)."""
        spec, m = self.spec, self.spec.mask
        n_q, n_kv = len(dims_of(spec.q)), len(dims_of(spec.kv))
        bad = {
            "q_not_tensor": (lambda a: a.update(q=[1.0]), TypeError, "^q must be a torch.Tensor"),
            "q_rank": (lambda a: a.update(q=a["q"][0]), ValueError, f"^q must have {n_q} dimensions"),
            "q_int": (lambda a: a.update(q=a["q"].long()), TypeError, "^q must be float32"),
            "k_rank": (lambda a: a.update(k=a["k"][0]), ValueError, f"^k must have {n_kv} dimensions"),
            "k_float64": (lambda a: a.update(k=a["k"].double()), TypeError, "^k must be float32"),
            "dtype_mismatch": (lambda a: a.update(k=a["k"].half()), TypeError, "^k has dtype"),
            "v_shape": (lambda a: a.update(v=a["v"][:, :, :1]), ValueError, "^v must have the same shape as k"),
            "head_dim_mismatch": (lambda a: a.update(k=a["k"][..., :8], v=a["v"][..., :8]),
                                  ValueError, "^k must have head dim"),
            "heads_not_divisible": (lambda a: a.update(q=a["q"][..., :3, :]), ValueError,
                                    r"number of query heads \(q: 3\) must be a multiple of the number of key/value"),
            "mask_not_tensor": (lambda a: a.update({m: [True]}), TypeError, f"^{m} must be a bool torch.Tensor"),
            "mask_dtype": (lambda a: a.update({m: a[m].float()}), TypeError, f"^{m} must have dtype torch.bool"),
            "mask_shape": (lambda a: a.update({m: a[m][..., :1]}), ValueError, f"^{m} must have shape"),
            "scale_str": (lambda a: a.update(scale="0.5"), TypeError, "^scale must be a float"),
            "scale_bool": (lambda a: a.update(scale=True), TypeError, "^scale must be a float"),
            "scale_nan": (lambda a: a.update(scale=float("nan")), ValueError, "^scale must be finite"),
            "scale_inf": (lambda a: a.update(scale=float("inf")), ValueError, "^scale must be finite"),
            "backend_name": (lambda a: a.update(backend="fast"), ValueError, "^backend must be one of"),
            "backend_type": (lambda a: a.update(backend=3), TypeError, "^backend must be a str"),
        }
        k_dims = dims_of(spec.kv)
        shared = [d for d in k_dims if d in dims_of(spec.q) and d != "D"]
        said = "batch size" if shared == ["B"] else re.escape(f"({', '.join(shared)}) = ")
        for d in shared:  # a dim k shares with q, of another size in k and v
            i = k_dims.index(d)
            bad[f"k_{d}_mismatch"] = (lambda a, i=i: a.update(k=a["k"].narrow(i, 0, 1), v=a["v"].narrow(i, 0, 1)),
                                      ValueError, f"^k must have {said}")
        for s in spec.scalars:
            if s is not SCALE:
                bad[f"{s.name}_below_minimum"] = (lambda a, s=s: a.update({s.name: s.minimum - 1}), ValueError,
                                                  f"^{s.name} must be >= {s.minimum}")
                bad[f"{s.name}_float"] = (lambda a, s=s: a.update({s.name: float(a[s.name])}), TypeError,
                                          f"^{s.name} must be an int")
        return {**bad, **getattr(self, "BAD", {})}

    def _good_args(self) -> dict:
        """SMALL's arguments, on the CPU, with every dim at least 2 and Hq = 4, Hkv = 2 (nothing runs)."""
        dims = {**{d: max(n, 2) for d, n in self.SMALL.dims.items()}, "Hq": 4, "Hkv": 2}
        q, k, v, mask = self.inputs(dataclasses.replace(self.SMALL, dims=dims, mask="random"), device="cpu")
        return {"q": q, "k": k, "v": v, self.spec.mask: mask, **self.SMALL.scalars}

    def _refuse(self, bad, **overrides):
        change, error, pattern = self.bad_inputs()[bad]
        args = {**self._good_args(), **overrides}
        change(args)
        with pytest.raises(error, match=pattern):
            getattr(rk, self.spec.name)(args.pop("q"), args.pop("k"), args.pop("v"), **args)

    def test_bad_input(self, bad):
        self._refuse(bad)

    def test_bad_input_is_refused_before_any_backend_runs(self, backend):
        for bad in self.bad_inputs():
            if not bad.startswith("backend"):
                self._refuse(bad, backend=backend)

    def test_devices_must_agree(self):
        args = self._good_args()  # on the CPU
        other = "cuda" if torch.cuda.is_available() else "meta"
        k_elsewhere = torch.empty(args["k"].shape, device=other)
        with pytest.raises(ValueError, match=f"^k is on {other}"):
            self.call(args["q"], k_elsewhere, k_elsewhere, None, self.SMALL.scalars, "auto")
        if torch.cuda.is_available():
            q, k, v = (args[n].to(other) for n in "qkv")
            with pytest.raises(ValueError, match=f"^{self.spec.mask} is on cpu"):
                self.call(q, k, v, args[self.spec.mask], self.SMALL.scalars, "auto")

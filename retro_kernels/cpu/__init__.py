"""Python side of the C++ CPU kernels in csrc/cpu (built into retro_kernels._C_cpu)."""
from __future__ import annotations

from .. import _native

# Loaded once, at import, so that choosing a backend is plain Python (torch.compile traces it).
OPS = _native.load("cpu")
MISSING = _native.missing_reason("cpu")


def device_reasons(q) -> list[str]:
    """Why the C++ CPU kernels cannot run on tensors like `q` (same for every op)."""
    reasons = [MISSING] if MISSING else []
    if q.device.type != "cpu":
        reasons.append(f"the cpu backend needs CPU tensors, got {q.device.type}")
    return reasons

"""How the C++ CPU kernels are compiled, ahead of time (setup.py) or on first use (_native).

Standard library only: setup.py reads this file by path, where torch may not
be importable and the package must not be imported.
"""
from __future__ import annotations

import os
from pathlib import Path

# No -march: the library runs on any x86-64; csrc/cpu picks AVX2 code at load time.
# -fno-trapping-math -fno-math-errno (as PyTorch builds) let GCC vectorise the softmax loops.
CPU_CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
CPU_LINK_FLAGS = ["-fopenmp"]

# Where a wheel carries csrc/cpu, inside the package, for the build on first use.
SHIPPED_CPU_SOURCES = "_csrc/cpu"


def cpu_source_files(folder: str | os.PathLike) -> list[Path]:
    """The C++ sources and headers of the CPU kernels in `folder`, sorted."""
    folder = Path(folder)
    return sorted(p for p in folder.glob("*") if p.suffix in (".cpp", ".h") and p.is_file())

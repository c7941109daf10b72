"""Where a build's heavy work runs: in this process (``local``) or as Ray tasks (``ray``), the same functions
on the same units, so both make the same files; every unit reports its process's peak resident memory.
Joining or starting a cluster, and why it cannot be kept to loopback: docs/retrieval.md, "At scale"."""
from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

ENGINES = ("local", "ray")


def peak_rss_mb() -> float:
    """The largest resident memory this process has had (ru_maxrss), in MiB."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {ENGINES}, got {engine!r}")
    if engine == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ValueError("engine: 'ray' needs Ray (pip install 'retro_kernels[ray]')") from None


def connect(address: str | None = None) -> None:
    """Join the Ray cluster at ``address`` (else ``RAY_ADDRESS``), or start a local one."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    else:
        # its workers import this package from where this process does (a checkout, or site-packages)
        path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")]))
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 runtime_env={"env_vars": {"PYTHONPATH": path}})


def cluster(resource: str) -> int:
    """The cluster's CPUs or GPUs."""
    import ray

    return int(ray.cluster_resources().get(resource, 0))


def default_workers(engine: str, workers: int | None) -> int:
    """``workers``, or every CPU of the cluster (ray) / one (local)."""
    return int(workers) if workers else max(1, cluster("CPU")) if engine == "ray" else 1


def run_units(engine: str, fn, units, *, what: str, workers: int | None = None, progress=None) -> list:
    """``fn(*args)`` for every ``(label, args)`` of ``units``, the results in order (see `map_units`)."""
    return list(map_units(engine, fn, units, what=what, workers=workers, progress=progress))


def map_units(engine: str, fn, units, *, what: str, workers: int | None = None, progress=None):
    """Yield ``fn(*args)`` for every ``(label, args)`` of the iterable ``units``, in order (``progress(1)``
    after each): one after the other in this process (local), or as Ray tasks, at most ``workers`` at a
    time (a task whose worker dies is retried). A unit that fails raises RuntimeError("<what> <label>: <why>")."""
    if engine == "local":
        results = (_labelled(what, label, fn, args) for label, args in units)
    else:
        results = _on_ray(fn, units, what, default_workers(engine, workers))
    for result in results:
        if progress:
            progress(1)
        yield result


def _on_ray(fn, units, what: str, limit: int):
    import ray

    task, pending = ray.remote(fn).options(max_retries=3), []  # (ref, label) in submission order
    for label, args in units:
        pending.append((task.remote(*args), label))
        while len(pending) >= limit:
            yield _ray_result(pending, what)
    while pending:
        yield _ray_result(pending, what)


def _ray_result(pending: list, what: str):
    import ray

    ref, label = pending.pop(0)
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        for other, _ in pending:  # the stage has failed: its other units stop
            ray.cancel(other)
        raise RuntimeError(f"{what} {label}: {_one_line(e.cause if e.cause is not None else e)}") from None


def _labelled(what, label, fn, args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 -- the point: say which unit failed, in one line
        raise RuntimeError(f"{what} {label}: {_one_line(e)}") from e


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"

"""Shared benchmark plumbing: run each configuration in its own process, print tables."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
from typing import Any, Callable, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULT_PREFIX = "BENCHMARK_RESULT "


def run_isolated(script: str, args: Sequence[str], timeout: int = 3600,
                 env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python script --worker args...`` (with ``env`` added to the environment) and return
    the JSON result it prints.

    A fresh process per configuration keeps each peak-memory figure its own.
    """
    completed = subprocess.run([sys.executable, script, "--worker", *args], capture_output=True, text=True,
                               timeout=timeout, env={**os.environ, **(env or {})})
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"{script} {' '.join(args)} failed:\n{completed.stderr[-3000:]}")


def report(result: dict[str, Any]) -> None:
    """Print a worker's result for the parent process."""
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def median_seconds(step: Callable[[], None], steps: int, warmup: int = 1) -> float:
    """The median wall time of ``step``, each timed from an idle device to an idle device (a GPU's
    queued kernels finished), after ``warmup`` untimed calls."""
    import time

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        synchronize()
        started = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def synchronize() -> None:
    """Wait for the work queued on a GPU (CUDA or Apple MPS), so a timer sees it done; nothing on a CPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.synchronize()


def bench_device() -> str:
    """The device a benchmark measures on: CUDA, then MPS, then the CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)

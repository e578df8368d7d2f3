"""Shared by the benchmark scripts: repeatable timing, the machine's name, results on disk."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from convsep.files import write_atomically  # the checkpoints' writer: results are never half-written

RESULTS = Path(__file__).parent / "results"


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_name() -> str:
    """The CPU model (platform.processor() is often just the architecture on Linux)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> dict:
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


def machine_line() -> str:
    m = machine()
    return f"{m['cpu']}, {m['cores']} CPU cores ({m['torch_threads']} torch threads), torch {m['torch']}, Python {m['python']}"


def save_json(name: str, payload: dict, path: Path | str | None = None) -> Path:
    """Write results, with the machine they were measured on, to `path` (default benchmarks/results/NAME.json)."""
    text = json.dumps({"machine": machine(), **payload}, indent=2) + "\n"
    path = Path(path or RESULTS / f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, lambda tmp: Path(tmp).write_text(text))

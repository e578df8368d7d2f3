"""Shared by the benchmark scripts: repeatable timing, the machine's name, results on disk."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Callable

import torch

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


def write_atomically(path: Path | str, write: Callable[[IO[bytes]], object]) -> Path:
    """write(file) into a temporary file beside `path`, then move it into place: never a half-written result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        try:
            write(tmp)
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp.name, 0o666 & ~umask)  # temporary files are private; results are not
    os.replace(tmp.name, path)
    return path


def save_json(name: str, payload: dict, path: Path | str | None = None) -> Path:
    """Write results, with the machine they were measured on, to `path` (default benchmarks/results/NAME.json)."""
    text = json.dumps({"machine": machine(), **payload}, indent=2) + "\n"
    return write_atomically(path or RESULTS / f"{name}.json", lambda f: f.write(text.encode()))

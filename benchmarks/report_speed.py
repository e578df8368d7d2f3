"""What the before-and-after report costs, next to what it counts.

For each built-in architecture at its default width (224x224 RGB, batch 1, random weights,
converted at rank 1): the median wall time of one plain forward pass of the original and of
the converted model, of FlopCounterMode over one pass of each, and of
`convsep.report(before, after, x)` (which runs one counted pass of each model). The
measurements of one repeat run back to back, so load on the machine hits them alike.

    python benchmarks/report_speed.py [--repeats 3] [--threads 2] [--models resnet18 vgg16]

Prints a table and writes benchmarks/results/report_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's convsep, not an installed one

import convsep  # noqa: E402
from convsep.models import ZOO  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "report_speed.json"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg()[0],
    }


def _threads(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, repeats: int) -> dict:
    torch.manual_seed(0)
    before = ZOO[name]().eval()
    after = convsep.convert(before, rank=1)
    x = torch.randn(1, 3, 224, 224)

    def plain(model):
        with torch.inference_mode():
            model(x)

    def counted(model):
        with torch.inference_mode(), FlopCounterMode(display=False):
            model(x)

    jobs = {
        "forward_before": lambda: plain(before),
        "forward_after": lambda: plain(after),
        "flopcounter_before": lambda: counted(before),
        "flopcounter_after": lambda: counted(after),
        "report": lambda: convsep.report(before, after, x),
    }
    for job in jobs.values():  # warm-up: allocations, kernel selection, first-use imports
        job()
    times = {key: [] for key in jobs}
    for _ in range(repeats):
        for key, job in jobs.items():
            times[key].append(seconds(job))
    result = {key: statistics.median(t) for key, t in times.items()}
    report = convsep.report(before, after, x)
    result["report_over_two_forwards"] = result["report"] / (result["forward_before"] + result["forward_after"])
    result["report_over_two_flopcounters"] = result["report"] / (result["flopcounter_before"] + result["flopcounter_after"])
    result["macs_before"] = report.totals["macs_before"]
    result["macs_after"] = report.totals["macs_after"]
    result["all_times"] = times
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--models", nargs="+", default=[n for n in ZOO if n != "small_cnn"], choices=sorted(ZOO))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    info = machine()
    results = {name: measure(name, args.repeats) for name in args.models}
    info["load_average_at_end"] = os.getloadavg()[0]

    ms = lambda s: f"{s * 1e3:.0f}"  # noqa: E731
    rows = [
        [name, ms(r["forward_before"]), ms(r["forward_after"]), ms(r["flopcounter_before"]), ms(r["flopcounter_after"]),
         ms(r["report"]), f"{r['report_over_two_forwards']:.2f}", f"{r['report_over_two_flopcounters']:.2f}"]
        for name, r in results.items()
    ]  # fmt: skip
    headers = ["model (224x224, batch 1)", "forward before ms", "forward after ms", "FlopCounterMode before ms",
               "FlopCounterMode after ms", "report ms", "report / 2 forwards", "report / 2 FlopCounterModes"]  # fmt: skip
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({_threads(info['torch_threads'])}), "
        f"load average {info['load_average_at_start']:.1f} -> {info['load_average_at_end']:.1f}; "
        f"median of {args.repeats} after a warm-up; converted at rank 1"
    )
    print(tabulate(rows, headers, disable_numparse=True))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "repeats": args.repeats, "input": [1, 3, 224, 224], "rank": 1, "results": results}
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, RESULTS)  # atomic: a reader never sees half a file
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

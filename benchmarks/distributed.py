"""Calibration and one fine-tuning epoch with 1 and 2 processes (torchrun, gloo, CPU): time and agreement.

    python benchmarks/distributed.py            # the README figures (a few minutes on 2 cores)
    python benchmarks/distributed.py --quick    # a smoke run

For each model, three runs of the same work, each launched with torchrun: 1 process with 1 torch
thread, 1 process with 2 threads (what one process makes of this machine), and 2 processes with 1
thread each (batch i goes to rank i mod 2). Calibration: the same batches, sharded. Fine-tuning: the
2-process run trains on half-batches per process, the 1-process runs on the two halves concatenated,
so every step sees the same global batch and the runs should end with the same weights (the
"agreement" columns: relative difference of all weights against 1 process, 1 thread; fine-tuning
runs twice, training everything, then only the pairs with the norm layers frozen). Times are
measured inside the processes (rank 0, from a barrier to the end of the call, process start-up
excluded); for calibration, rank 0 also records the time spent in the collectives (summing the
statistics, broadcasting the solution) and in the solves. Writes benchmarks/results/distributed.json.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]

import convsep  # noqa: E402
from common import machine_line, save_json  # noqa: E402
from convsep import distributed  # noqa: E402
from convsep.models import resnet18, small_cnn  # noqa: E402

RUNS = [("1 process, 1 thread", 1, 1), ("1 process, 2 threads", 1, 2), ("2 processes, 1 thread each", 2, 1)]


# --- the work, in each process -------------------------------------------------------------------


def workload(name: str, quick: bool):
    """(model, calibration batches, training half-batches): the same in every process (seeded)."""
    torch.manual_seed(0)
    if name == "small_cnn":  # Fashion-MNIST images when the Debian package is there, else random ones
        model = small_cnn(width=32).eval()
        images, labels = _fashion_mnist(4096 if quick else 16384)
        calibration = list(images[: (8 if quick else 32) * 128].split(128))
        halves = list(zip(images.split(64), labels.split(64)))
    else:
        model = resnet18(num_classes=10).eval()
        images = torch.randn(256 if quick else 1024, 3, 64, 64)
        labels = torch.randint(0, 10, (len(images),))
        calibration = list(images[: (4 if quick else 16) * 16].split(16))
        halves = list(zip(images.split(8), labels.split(8)))
    return model, calibration, halves


def _fashion_mnist(count: int):
    import fashion_mnist

    if fashion_mnist.available():
        images, labels = fashion_mnist.load("train", limit=count)
        return images, labels
    return torch.randn(count, 1, 28, 28), torch.randint(0, 10, (count,))


def _timed(function, box: dict, key: str):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            box[key] = box.get(key, 0.0) + time.perf_counter() - start

    return wrapper


def worker(args: argparse.Namespace) -> None:
    started = distributed.init_from_environment()
    model, calibration, halves = workload(args.model, args.quick)
    world = distributed.world_size()
    parts: dict[str, float] = {}
    distributed.all_sum = _timed(distributed.all_sum, parts, "sum statistics")
    distributed.broadcast_module = _timed(distributed.broadcast_module, parts, "broadcast solution")
    calibrate_module = importlib.import_module("convsep.calibrate")  # the module: convsep.calibrate is the function
    calibrate_module.fit = _timed(calibrate_module.fit, parts, "solve")  # the name calibrate calls

    converted = convsep.convert(model, rank=2)
    _barrier()
    start = time.perf_counter()
    convsep.calibrate(converted, model, distributed.shard(calibration))
    calibrate_seconds = time.perf_counter() - start
    calibrated = {k: v.clone() for k, v in converted.state_dict().items()}

    if world == 1:  # the global batch of each step: both halves
        train = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(halves[0::2], halves[1::2])]
    else:
        train = distributed.shard(halves)
    result = {
        "calibrate_seconds": calibrate_seconds,
        "calibrate_parts": parts,
        "steps": len(train) if world == 1 else len(halves) // world,
        "calibrated": calibrated,
    }
    # Training everything, batch norm normalises with each process's own half-batch: not the same
    # computation as one process on the whole batch. Training only the pairs (norms frozen) is.
    for trainable in ("all", "separable"):
        student = copy.deepcopy(converted)
        _barrier()
        start = time.perf_counter()
        convsep.finetune(student, train, teacher=model, lr=1e-3, trainable=trainable, verbose=False)
        result[f"finetune_{trainable}_seconds"] = time.perf_counter() - start
        result[f"finetuned_{trainable}"] = student.state_dict()
    if distributed.is_main():
        torch.save(result, args.out)
    if started:
        distributed.shutdown()


def _barrier() -> None:
    if distributed.active():
        torch.distributed.barrier()


# --- the driver ----------------------------------------------------------------------------------


def relative_difference(a: dict, b: dict) -> float:
    keys = [k for k in a if a[k].is_floating_point()]
    diff = sum(float((a[k].double() - b[k].double()).square().sum()) for k in keys)
    norm = sum(float(b[k].double().square().sum()) for k in keys)
    return (diff / norm) ** 0.5


def launch(model: str, processes: int, threads: int, quick: bool, folder: Path) -> tuple[dict, float]:
    out = folder / f"{model}-{processes}x{threads}.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               __file__, "--worker", "--model", model, "--out", str(out)] + (["--quick"] if quick else [])  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, timeout=3600)
    return torch.load(out, weights_only=False), time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", nargs="*", default=["small_cnn", "resnet18"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    print(machine_line())
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for model in args.models:
            results = {name: launch(model, p, t, args.quick, Path(folder)) for name, p, t in RUNS}
            reference = results[RUNS[0][0]][0]
            for name, (result, wall) in results.items():
                row = {
                    "model": model,
                    "run": name,
                    "calibrate_s": round(result["calibrate_seconds"], 2),
                    "calibrate_speedup": round(reference["calibrate_seconds"] / result["calibrate_seconds"], 2),
                    "calibrate_parts_s": {k: round(v, 3) for k, v in result["calibrate_parts"].items()},
                    "calibrate_agreement": relative_difference(result["calibrated"], reference["calibrated"]),
                    "finetune_steps": result["steps"],
                }
                for trainable in ("all", "separable"):
                    seconds = result[f"finetune_{trainable}_seconds"]
                    row[f"finetune_{trainable}_s"] = round(seconds, 2)
                    row[f"finetune_{trainable}_speedup"] = round(reference[f"finetune_{trainable}_seconds"] / seconds, 2)
                    row[f"finetune_{trainable}_agreement"] = relative_difference(
                        result[f"finetuned_{trainable}"], reference[f"finetuned_{trainable}"]
                    )
                row |= {
                    "wall_s_with_startup": round(wall, 1),
                }
                rows.append(row)
                print(json.dumps(row))
    if not args.quick:
        save_json("distributed", {"command": "python benchmarks/distributed.py", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

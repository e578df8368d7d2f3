"""Measured latency of a model and of chosen layers in it, for the before-and-after report.

Whole-model time comes from plain passes (no hooks, so nothing of ours is timed);
per-layer time from forward pre/post hooks on the listed layers in separate passes.
The two kinds of pass alternate, so a burst of load on the machine hits both alike,
and each figure is the median over the runs after a warm-up (first calls pay for
allocations and kernel selection). Eval mode under inference_mode, as deployed models run
(the counting pass in probe.py has already run by then, so lazy layers are initialised).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import distributed
from .probe import eval_mode


@dataclass
class Timing:
    total: float  # median seconds of one whole forward pass
    layers: dict[int, float] = field(default_factory=dict)  # id(module) -> median seconds per pass, all its calls


def device_of(args: tuple[Tensor, ...]) -> torch.device:
    return args[0].device


def _synchronizer(device: torch.device):
    # Kernels on an accelerator run asynchronously: wait for them before reading the clock.
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def measure(model: nn.Module, args: tuple[Tensor, ...], modules: list[nn.Module], *, runs: int, warmup: int) -> Timing:
    sync = _synchronizer(device_of(args))
    modules = list({id(m): m for m in modules}.values())
    starts: dict[int, list[float]] = {}
    spent: dict[int, float] = {}

    def before(module, inputs):
        sync()
        starts.setdefault(id(module), []).append(time.perf_counter())

    def after(module, inputs, output):
        sync()
        key = id(module)
        spent[key] = spent.get(key, 0.0) + time.perf_counter() - starts[key].pop()

    totals: list[float] = []
    per_layer: dict[int, list[float]] = {id(m): [] for m in modules}
    with eval_mode(model), torch.inference_mode():
        for _ in range(warmup):
            model(*args)
        for _ in range(runs):
            sync()
            start = time.perf_counter()
            model(*args)
            sync()
            totals.append(time.perf_counter() - start)

            handles = [m.register_forward_pre_hook(before) for m in modules]
            handles += [m.register_forward_hook(after) for m in modules]
            spent.clear()
            try:
                model(*args)
            finally:
                for handle in handles:
                    handle.remove()
            for key, times in per_layer.items():
                if key in spent:  # a layer this input never reaches has no time, not zero time
                    times.append(spent[key])
    layers = {key: statistics.median(t) for key, t in per_layer.items() if t}
    return Timing(statistics.median(totals), layers)


def measure_once(model: nn.Module, args: tuple[Tensor, ...], modules: list[nn.Module], *, runs: int, warmup: int) -> Timing:
    """measure() in one process: under torchrun rank 0 times and every process gets its figures.

    Timings differ from process to process, and a report must not: rank 0's are the ones shown.
    """
    if not distributed.active():
        return measure(model, args, modules, runs=runs, warmup=warmup)
    with distributed.together():
        timing = measure(model, args, modules, runs=runs, warmup=warmup) if distributed.is_main() else None
    # Layers travel by position in `modules`: id() means nothing in another process.
    shared = distributed.broadcast_object(None if timing is None else (timing.total, [timing.layers.get(id(m)) for m in modules]))
    total, per_layer = shared
    return Timing(total, {id(m): t for m, t in zip(modules, per_layer) if t is not None})

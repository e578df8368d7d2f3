"""objective="latency": convert only where the pair is measured faster, on this device and input.

Fewer MACs is not fewer milliseconds. A depthwise conv does little arithmetic for every byte
it moves, so it is bound by memory, and the pair adds a second pass over an activation
`rank` times as wide as the input; on a CPU the dense conv's tuned kernel often wins at
small ranks and narrow layers. So each candidate is timed against its pair on the input
shape that layer really sees (one pass of the example inputs), the two interleaved so a
burst of load hits both, median of the runs; a pair that is not faster by `margin` is not
used. Then the whole model: while the converted model is not faster than the original, the
converted layer with the smallest measured gain goes back to its original conv.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .batches import input_of
from .probe import cannot_run, eval_mode


def paired_medians(first: Callable, second: Callable, args: tuple, runs: int, warmup: int = 2) -> tuple[float, float]:
    """Median seconds of first(*args) and second(*args), timed alternately."""
    first_times, second_times = [], []
    with torch.inference_mode():
        for _ in range(warmup):
            first(*args)
            second(*args)
        for _ in range(runs):
            start = time.perf_counter()
            first(*args)
            middle = time.perf_counter()
            second(*args)
            first_times.append(middle - start)
            second_times.append(time.perf_counter() - middle)
    return statistics.median(first_times), statistics.median(second_times)


def layer_inputs(model: nn.Module, layers: Sequence[nn.Module], args: tuple) -> dict[int, Tensor]:
    """A random tensor shaped (and strided) like the first input each layer receives on `args`."""
    seen: dict[int, Tensor] = {}

    def hook(module, args, kwargs):
        if id(module) not in seen:
            seen[id(module)] = torch.empty_like(input_of(args, kwargs)).normal_()

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        with eval_mode(model), torch.no_grad():
            model(*args)
    except Exception as error:  # the user's model can fail in any way on inputs it cannot take
        raise cannot_run("objective='latency'", "model", args, error) from error
    finally:
        for handle in handles:
            handle.remove()
    return seen


def speed_reason(conv_seconds: float, pair_seconds: float) -> str:
    return (
        f"kept for speed: the pair took {pair_seconds * 1e3:.3f} ms against {conv_seconds * 1e3:.3f} ms "
        "for the original conv on this device and input"
    )


def drop_slower_pairs(candidates: list, model: nn.Module, args: tuple, build_pair, runs: int, margin: float) -> dict:
    """Keep the candidates whose pair is measured faster than their conv; return {id(candidate): seconds saved}.

    A dropped candidate's decision says why, with both timings.
    """
    inputs = layer_inputs(model, [c.conv for c in candidates], args)
    gains = {}
    for candidate in candidates:
        x = inputs.get(id(candidate.conv))
        if x is None:
            candidate.decision.converted = False
            candidate.decision.reason = "objective='latency': never ran on the example inputs, so not timed"
            continue
        pair = build_pair(candidate)
        with eval_mode(candidate.conv, pair):
            conv_seconds, pair_seconds = paired_medians(candidate.conv, pair, (x,), runs)
        if pair_seconds < conv_seconds * (1 - margin):
            gains[id(candidate)] = conv_seconds - pair_seconds
        else:
            candidate.decision.converted = False
            candidate.decision.relative_error = None  # not converted: no error to record, as for a reverted layer
            candidate.decision.reason = speed_reason(conv_seconds, pair_seconds)
    return gains


def model_seconds(original: nn.Module, converted: nn.Module, args: tuple, runs: int) -> tuple[float, float]:
    with eval_mode(original, converted):
        return paired_medians(original, converted, args, runs)

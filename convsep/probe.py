"""Running a model on real inputs to see what its convolutions do.

A conv's MACs depend on how many output positions it computes, which only a forward
pass shows, and calibration needs a conv's outputs inside the original model. Both are
found by watching the conv calls a forward pass makes (module convs and `F.conv*d` on a
parameter alike, since `nn.ConvNd` calls `F.convNd`), keyed by the weight they use.
Models run in eval mode without gradients; the train/eval flag of every module is put
back afterwards, so probing changes nothing (not even BatchNorm running statistics).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from .batches import as_args
from .errors import InputShapeError

CONV_FUNCTIONS = (torch.conv1d, torch.conv2d, torch.conv3d)  # F.convNd is torch.convNd

ConvCallback = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]  # (weight, input, output)


class ConvCalls(TorchFunctionMode):
    """Calls `callback(weight, input, output)` after every conv call made while the mode is active."""

    def __init__(self, callback: ConvCallback) -> None:
        super().__init__()
        self.callback = callback

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if func in CONV_FUNCTIONS:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            self.callback(weight, args[0] if args else kwargs["input"], output)
        return output


@contextlib.contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; every module's own train/eval flag restored after."""
    flags = [(module, module.training) for model in models for module in model.modules()]
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in flags:
            module.training = training


def describe_inputs(inputs: Any) -> str:
    if isinstance(inputs, torch.Tensor):
        return f"a tensor of shape {tuple(inputs.shape)}"
    if isinstance(inputs, (tuple, list)):
        return "(" + ", ".join(describe_inputs(x) for x in inputs) + ")"
    return f"a {type(inputs).__name__}"


class StopForward(Exception):
    """Raised from a hook to end a forward pass once it has shown what was needed."""


def forward(model: nn.Module, inputs: Any, what: str = "example_inputs") -> Any:
    """model(*inputs), with a clear InputShapeError when the model cannot take them."""
    try:
        return model(*as_args(inputs))
    except StopForward:
        raise
    except Exception as error:  # the model's own code can fail in any way on inputs it cannot take
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise InputShapeError(
            f"the model cannot run on {what} ({describe_inputs(inputs)}): {type(error).__name__}: {first}"
        ) from error


@dataclass
class ConvMacs:
    """What one forward pass on example inputs costs: the whole model, and each conv weight's output positions."""

    total: int  # MACs of the whole forward (FlopCounterMode's FLOPs / 2), for the whole batch
    positions: dict[int, int] = field(default_factory=dict)  # id(weight) -> output positions, all calls and samples

    def positions_of(self, weight: torch.Tensor) -> int:
        return self.positions.get(id(weight), 0)


def measure_macs(model: nn.Module, example_inputs: Any) -> ConvMacs:
    """Whole-model MACs and every conv's output positions, from one forward pass on `example_inputs`."""
    measured = ConvMacs(total=0)

    def count(weight: torch.Tensor, _input: torch.Tensor, output: torch.Tensor) -> None:
        # Output positions summed over the batch: MACs of this call = positions * N * (M/g) * K.
        positions = output.numel() // weight.shape[0]
        measured.positions[id(weight)] = measured.positions.get(id(weight), 0) + positions

    counter = FlopCounterMode(display=False)
    with evaluating(model), counter, ConvCalls(count):
        forward(model, example_inputs)
    measured.total = math.ceil(counter.get_total_flops() / 2)
    return measured

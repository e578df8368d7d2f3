"""One instrumented forward pass: what the report needs to know about a model on real inputs.

Counting by running, not by tracing, so it works for any model that runs, fx-traceable
or not. The pass runs under torch's own FlopCounterMode, so whole-model FLOPs are its
figures by construction (the cheapest exact way: one pass, nothing re-derived), while
forward hooks record the input and output shapes at the convolutions the report lists
and a torch-function mode records the functional convolutions (`F.conv2d(x, self.w)`),
which have no module to hook. Hooks on every module also remember which one was
running when a bad input broke the pass, so the error can name that layer.

The pieces any run of a user's model needs live here too, so calibration, fine-tuning
and timing share them: `eval_mode`, `ConvCalls` (sees every conv call, functional or
not), `describe_inputs` and `cannot_run` (the InputShapeError for inputs a model refuses).

The pass runs in eval mode under no_grad: counting must not move BatchNorm statistics
or build autograd graphs; training flags are restored afterwards. Not inference_mode:
tensors a model creates and keeps on its first call (lazy parameters, caches) would
become inference tensors that training can no longer use.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from .batches import input_of
from .errors import ConvsepError, ConvsepTypeError, InputShapeError, error_summary
from .layers import _SeparableConvNd
from .trace import CONV_ARG_NAMES, FUNCTIONAL_CONV_DIMS


@dataclass
class Call:
    """One call of a watched layer during the pass."""

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    order: int  # position among all watched calls, to list layers in execution order
    groups: int = 1  # functional convs only (a module knows its own)
    has_bias: bool = False  # functional convs only


@dataclass
class Probe:
    flops: int  # FlopCounterMode's total for the whole pass
    calls: dict[int, list[Call]] = field(default_factory=dict)  # id(module or weight) -> its calls


def example_args(example_inputs: Any) -> tuple[Tensor, ...]:
    """Positional arguments from a tensor or a tuple of tensors, or a clear error."""
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not args or not all(isinstance(a, Tensor) for a in args):
        got = type(example_inputs).__name__
        if isinstance(example_inputs, (tuple, list)):
            got += f" of ({', '.join(type(a).__name__ for a in args)})"
        raise ConvsepTypeError(
            f"example_inputs must be a tensor or a tuple of tensors (the model's positional inputs), got {got}"
        )
    return args


def describe_inputs(inputs: Any) -> str:
    """'(2, 3, 8, 8) float32' for a tensor; a tuple or list of inputs item by item (nested ones in parentheses)."""
    if isinstance(inputs, (tuple, list)):
        return ", ".join(_describe(x) for x in inputs)
    return _describe(inputs)


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (tuple, list)):
        return f"({describe_inputs(value)})"
    return f"a {type(value).__name__}"


def cannot_run(where: str, who: str, inputs: Any, error: BaseException) -> InputShapeError:
    """The error for a model that failed on inputs: where, which model, which inputs, and its own error's first line."""
    return InputShapeError(f"{where}: the {who} cannot run on inputs {describe_inputs(inputs)}: {error_summary(error)}")


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then every module's own training flag back."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


class ConvCalls(TorchFunctionMode):
    """Calls `callback(args, output)` after every F.conv1d/2d/3d call (nn.ConvNd calls them too),
    with the call's arguments by name (`input`, `weight`, `bias`, `stride`, ..., as far as given)."""

    def __init__(self, callback: Callable[[dict[str, Any], Tensor], None]) -> None:
        super().__init__()
        self.callback = callback

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if func in FUNCTIONAL_CONV_DIMS:
            self.callback(dict(zip(CONV_ARG_NAMES, args), **kwargs), output)
        return output


class _Tracker:
    """The stack of modules currently running; after an exception its top is where it happened."""

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[tuple[str, nn.Module]] = []
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, name: str):
        def hook(module, args):
            self.stack.append((name, module))

        return hook

    def _leave(self, module, args, output):
        self.stack.pop()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def probe(
    model: nn.Module,
    args: tuple[Tensor, ...],
    modules: list[nn.Module],
    weights: list[Tensor],
    *,
    label: str = "the model",
) -> Probe:
    """Run `model(*args)` once, counting FLOPs and recording the calls of `modules` and of
    functional convs on `weights`. Raises InputShapeError (naming the layer) if the pass fails."""
    result = Probe(flops=0)
    order = itertools.count()

    def record(key: int, call: Call) -> None:
        call.order = next(order)
        result.calls.setdefault(key, []).append(call)

    def shape_hook(module, args, kwargs, output):
        x = input_of(args, kwargs)
        if isinstance(x, Tensor) and isinstance(output, Tensor):
            record(id(module), Call(tuple(x.shape), tuple(output.shape), 0))

    watched = {id(w) for w in weights}
    handles = [m.register_forward_hook(shape_hook, with_kwargs=True) for m in {id(m): m for m in modules}.values()]
    tracker = _Tracker(model)

    def record_functional(conv: dict[str, Any], output: Tensor) -> None:
        weight = conv.get("weight")
        if id(weight) in watched:
            shapes = tuple(conv["input"].shape), tuple(output.shape)
            record(id(weight), Call(*shapes, 0, conv.get("groups", 1), conv.get("bias") is not None))

    recorder = ConvCalls(record_functional) if watched else contextlib.nullcontext()
    try:
        with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter, recorder:
            model(*args)
        result.flops = counter.get_total_flops()
    except ConvsepError:
        raise
    except Exception as error:  # any failure of the user's model on these inputs: say where, keep the cause
        raise InputShapeError(_failure_message(model, args, tracker.stack, error, label)) from error
    finally:
        tracker.remove()
        for handle in handles:
            handle.remove()
    return result


def _failure_message(model: nn.Module, args, stack, error: BaseException, label: str) -> str:
    where = "before any submodule ran"
    if stack:
        name, module = stack[-1]
        where = f"in {name or 'its own forward'} ({type(module).__name__}{_expects(module)})"
    return (
        f"example inputs {describe_inputs(args)} do not fit {label} ({type(model).__name__})"
        f"{_expected_input(model)}; it failed {where}: {error_summary(error)}"
    )


def _expects(module: nn.Module) -> str:
    if isinstance(module, (_ConvNd, _SeparableConvNd)):
        return f", expects {module.in_channels} input channels"
    if isinstance(module, nn.Linear):
        return f", expects {module.in_features} input features"
    return ""


def _expected_input(model: nn.Module) -> str:
    """What the model's first convolution (in definition order) expects, with the parameters' dtype."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    dtype_text = f" {str(dtype).removeprefix('torch.')}" if dtype is not None else ""
    for name, module in model.named_modules():
        if isinstance(module, (_ConvNd, _SeparableConvNd)):
            dims = len(module.kernel_size)
            spatial = {1: "L", 2: "H, W", 3: "D, H, W"}[dims]
            channels = module.in_channels
            return (
                f", which expects (batch, {channels}, {spatial}){dtype_text} inputs"
                f" (its first convolution, {name}, is a {type(module).__name__} with {channels} input channels)"
            )
    return f", which expects{dtype_text} inputs" if dtype_text else ""


def functional_weights(model: nn.Module) -> dict[str, Tensor]:
    """Qualified name -> parameter, for every parameter a functional conv could use: the ones no conv module owns."""
    owned = {id(p) for m in model.modules() if isinstance(m, _ConvNd) for p in m.parameters(recurse=False)}
    return {
        name: p
        for name, p in model.named_parameters()
        if id(p) not in owned and not isinstance(p, nn.parameter.UninitializedParameter) and p.dim() >= 3
    }

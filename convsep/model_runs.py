"""How calibration runs the two models: forwards with clear errors, stopped once they have shown what was needed,
and the original model's outputs at the layers being fitted, cached for several layers at a time.

Fitting layer after layer (calibrate.py) needs, for each layer and batch, the layer's inputs in the converted model
(which change as the layers before it are fitted) and the original layer's outputs (which do not). Running the
original's prefix again for every layer costs about (layers / 2) forwards of the original, most of in-order
calibration's time (the original is the larger model). OriginalOutputs instead keeps the outputs of as many upcoming
layers as fit in a memory budget, gathered by one forward of the original per batch; a layer whose outputs alone do
not fit is streamed as before, so memory stays bounded whatever the data.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from .batches import as_args, input_of
from .errors import ConvsepError
from .probe import ConvCalls, cannot_run

# Bytes of the original's outputs kept at once (on the models' device) for in-order calibration.
ORIGINAL_OUTPUTS_BYTES = 1 << 30

Site = Union[nn.Module, Tensor]  # a conv module, or a functional conv's weight
# (position in the order, the conv's input, its output) -> the pair's squared error on that input, or None
InitialError = Callable[[int, Tensor, Tensor], Optional[float]]


class StopForward(Exception):
    """Raised from a hook to end a forward pass once it has shown what was needed."""


def forward(model: nn.Module, inputs: Any, where: str, who: str = "model") -> None:
    """model(*inputs), with a clear InputShapeError when the model cannot take them."""
    args = as_args(inputs)
    try:
        model(*args)
    except (StopForward, ConvsepError):  # ConvsepError: from calibrate's own hooks, already clear
        raise
    except Exception as error:  # the model's own code can fail in any way on inputs it cannot take
        raise cannot_run(where, who, args, error) from error


@contextlib.contextmanager
def every_call(sites: list[Site], keep) -> Iterator[None]:
    """keep(index in `sites`, input, output) after every call of each conv module in `sites`, and of every
    conv call that uses a weight in `sites` (a functional conv's)."""
    handles = [
        site.register_forward_hook(
            lambda _module, args, kwargs, output, index=index: keep(index, input_of(args, kwargs), output),
            with_kwargs=True,
        )
        for index, site in enumerate(sites)
        if isinstance(site, nn.Module)
    ]
    by_weight = {id(site): index for index, site in enumerate(sites) if isinstance(site, Tensor)}

    def functional(conv: dict, output: Tensor) -> None:
        index = by_weight.get(id(conv.get("weight")))
        if index is not None:
            keep(index, conv["input"], output)

    try:
        with ConvCalls(functional) if by_weight else contextlib.nullcontext():
            yield
    finally:
        for handle in handles:
            handle.remove()


def run_order(converted: nn.Module, modules: list[nn.Module], inputs: Any) -> list[tuple[int, int]]:
    """(index in `modules`, calls per batch) of the modules in the order of their first call on one batch
    (a module listed twice counts as its last index)."""
    calls: dict[int, int] = {}

    def record(module, _args):
        calls[id(module)] = calls.get(id(module), 0) + 1

    index_of = {id(module): index for index, module in enumerate(modules)}
    handles = [modules[index].register_forward_pre_hook(record) for index in index_of.values()]
    try:
        forward(converted, inputs, "calibration batch 1", "converted model")
    finally:
        for handle in handles:
            handle.remove()
    return [(index_of[module], count) for module, count in calls.items()]


def original_calls(
    original: nn.Module, site: Site, inputs: Any, expected: int, where: str
) -> list[tuple[Tensor, Tensor]]:
    """(input, output) of each call of the conv module `site`, or of the conv calls that use the weight
    `site`, stopping the forward once all have been seen."""
    outputs: list[tuple[Tensor, Tensor]] = []

    def keep(x: Tensor, output: Tensor) -> None:
        if len(outputs) + 1 == expected:
            outputs.append((x, output))
            raise StopForward
        outputs.append((x.detach().clone(), output.detach().clone()))  # the forward goes on: in-place ops follow

    try:
        with every_call([site], lambda _index, x, output: keep(x, output)):
            forward(original, inputs, where, "original model")
    except StopForward:
        pass
    return outputs


def pair_inputs(converted: nn.Module, pair: nn.Module, inputs: Any, expected: int, where: str) -> list[Tensor]:
    """The inputs of `pair` in the converted model, stopping before the pair runs for the last time."""
    seen: list[Tensor] = []

    def keep(_module, args, kwargs):
        x = input_of(args, kwargs)
        if len(seen) + 1 == expected:
            seen.append(x)
            raise StopForward
        seen.append(x.detach().clone())  # the forward goes on: an in-place op could change it

    handle = pair.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        forward(converted, inputs, where, "converted model")
    except StopForward:
        pass
    finally:
        handle.remove()
    return seen


def outputs_budget(device: torch.device) -> int:
    """Bytes OriginalOutputs may keep on `device`: ORIGINAL_OUTPUTS_BYTES, and on a GPU at most a quarter of what is
    free there (the models and the pairs' sums need the rest)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return min(ORIGINAL_OUTPUTS_BYTES, free // 4)
    return ORIGINAL_OUTPUTS_BYTES


class OriginalOutputs:
    """The original model's outputs at each fitted layer on every batch, for the layers in `order` (sites and calls
    per batch), gathered for as many upcoming layers as fit in `budget` bytes by one forward per batch.

    take(position) gives, per batch, per call: (output, initial_error(position, input, output)), computed when the
    output is seen (the original's input to the layer is not kept); or None when the layer's outputs alone do not
    fit: then stream(position, batch) runs the original's prefix on each batch, as the layer is fitted. Each window
    is gathered from the layer asked for on, so call take in order.
    """

    def __init__(self, original: nn.Module, order: list[tuple[Site, int]], batches: Iterable[Any], count: Optional[int],
                 initial_error: InitialError, budget: Optional[int] = None) -> None:  # fmt: skip
        self.original, self.order, self.batches, self.count = original, order, batches, count
        self.initial_error = initial_error
        self.budget = ORIGINAL_OUTPUTS_BYTES if budget is None else budget
        self.cached: dict[int, list[list[tuple[Tensor, Optional[float]]]]] = {}
        self.covered = 0  # positions before this one were gathered (or streamed)

    def take(self, position: int, name: str) -> Optional[list[list[tuple[Tensor, Optional[float]]]]]:
        """The outputs at `position` on every batch; `name` is the layer being fitted, for error messages."""
        if position >= self.covered and self.budget <= 0:  # nothing is kept: every layer streams
            self.covered = position + 1
        elif position >= self.covered:
            self._gather(position, name)
        return self.cached.pop(position, None)

    def stream(self, position: int, inputs: Any, where: str) -> list[tuple[Tensor, Optional[float]]]:
        """One batch's (output, initial error) per call at a layer take() left out: a forward of the original's prefix."""
        site, calls = self.order[position]
        return [
            (y, self.initial_error(position, x, y))
            for x, y in original_calls(self.original, site, inputs, calls, where)
        ]

    def _gather(self, start: int, name: str) -> None:
        """Every batch's outputs at the layers from `start` on, as many as fit; at least `start` is decided."""
        end = len(self.order)  # the window is [start, end): it shrinks from the end while its outputs do not fit
        stored: dict[int, list] = {position: [] for position in range(start, end)}
        sizes = dict.fromkeys(range(start, end), 0)  # bytes kept per layer
        for index, inputs in enumerate(self.batches, 1):
            where = f"calibration batch {index} (calibrating {name!r})"
            seen = self._one_batch(start, end, inputs, where)
            for position in range(start, end):
                stored[position].append(seen[position])
                sizes[position] += sum(output.numel() * output.element_size() for output, _ in seen[position])
            # Projected over all batches (as far as known): drop the last layers until the rest fits.
            scale = max(1.0, (self.count or index) / index)
            while end - start > 1 and scale * sum(sizes[p] for p in range(start, end)) > self.budget:
                end -= 1
                del stored[end], sizes[end]
            if scale * sizes[start] > self.budget:  # one layer alone does not fit: stream it
                self.covered = start + 1
                return
        self.cached.update(stored)
        self.covered = end

    def _one_batch(self, start: int, end: int, inputs: Any, where: str) -> dict[int, list]:
        seen: dict[int, list] = {position: [] for position in range(start, end)}
        missing = [sum(calls for _, calls in self.order[start:end])]

        def keep(index: int, x: Tensor, output: Tensor) -> None:
            position = start + index
            if len(seen[position]) == self.order[position][1]:
                return  # a call beyond those the converted model makes: not fitted
            # A copy: the forward goes on, and an in-place op after the layer would change its output.
            seen[position].append((output.detach().clone(), self.initial_error(position, x, output)))
            missing[0] -= 1
            if not missing[0]:
                raise StopForward

        try:
            with every_call([site for site, _ in self.order[start:end]], keep):
                forward(self.original, inputs, where, "original model")
        except StopForward:
            pass
        return seen

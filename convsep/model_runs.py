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
import logging
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from .batches import as_args, input_of
from .errors import ConvsepError
from .probe import ConvCalls, cannot_run

log = logging.getLogger(__name__)

# Bytes of the original's outputs kept at once (on the models' device) for in-order calibration.
ORIGINAL_OUTPUTS_BYTES = 1 << 30

Site = Union[nn.Module, Tensor]  # a conv module, or a functional conv's weight
# (position in the order, the conv's input, its output) -> the pair's squared error on that input, or None
InitialError = Callable[[int, Tensor, Tensor], Optional[float]]


class StopForward(Exception):
    """Raised from a hook to end a forward pass once it has shown what was needed."""


def forward(model: nn.Module, inputs: Any, where: str, who: str) -> None:
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

    begin(position, name) readies a layer (gathering a new window from it if it is not in one); outputs(batch number,
    inputs, where) then gives that batch's (output, initial_error(position, input, output)) per call, the initial
    error computed when the output is seen (the original's input to the layer is not kept). A layer whose outputs
    alone do not fit is streamed: the original's prefix runs on each batch as the layer is fitted. So is every layer
    once a pass over the data gave other batches than the pass that gathered them (a shuffling loader): each batch's
    inputs are checked against what was gathered. Call begin in order.
    """

    def __init__(self, original: nn.Module, order: list[tuple[Site, int]], batches: Iterable[Any],
                 initial_error: InitialError, budget: int) -> None:  # fmt: skip
        self.original, self.order, self.batches = original, order, batches
        self.initial_error = initial_error
        self.budget = budget  # outputs_budget(device)
        self.cached: dict[int, list[tuple[tuple, list[tuple[Tensor, Optional[float]]]]]] = {}  # (fingerprint, seen)
        self.covered = 0  # positions before this one were gathered (or streamed)
        self.position, self.current, self.end = 0, None, 0

    def begin(self, position: int, name: str) -> None:
        if position >= self.covered and self.budget <= 0:  # nothing is kept: every layer streams
            self.covered = position + 1
        elif position >= self.covered:
            self._gather(position, name)
        self.position, self.current = position, self.cached.pop(position, None)

    def outputs(self, index: int, inputs: Any, where: str) -> list[tuple[Tensor, Optional[float]]]:
        """Batch `index`'s (output, initial error) per call at the layer begin() readied."""
        if self.current is not None:
            if index <= len(self.current) and self.current[index - 1][0] == fingerprint(inputs):
                return self.current[index - 1][1]
            log.info("%s: the data gave other batches than on the pass before (shuffled?): the original's outputs "
                     "are computed layer by layer from here on", where)  # fmt: skip
            self.current, self.budget = None, 0
            self.cached.clear()
            self.covered = self.position + 1
        site, calls = self.order[self.position]
        return [
            (y, self.initial_error(self.position, x, y))
            for x, y in original_calls(self.original, site, inputs, calls, where)
        ]

    def _count(self) -> Optional[int]:
        """Batches per pass, once known (calibrate's batches know it after their first pass)."""
        count = getattr(self.batches, "count", None)
        if isinstance(count, int):
            return count
        return len(self.batches) if hasattr(self.batches, "__len__") else None

    def _gather(self, start: int, name: str) -> None:
        """Every batch's outputs at the layers from `start` on, as many as fit; at least `start` is decided."""
        self.end = len(self.order)  # the window is [start, end): _one_batch shrinks it to what fits
        stored: dict[int, list] = {position: [] for position in range(start, self.end)}
        sizes = dict.fromkeys(range(start, self.end), 0)  # bytes kept per layer
        count = self._count()
        for index, inputs in enumerate(self.batches, 1):
            scale = max(1.0, (count or index) / index)  # bytes so far, projected over every batch (as far as known)
            where = f"calibration batch {index} (calibrating {name!r})"
            seen = self._one_batch(start, inputs, where, sizes, scale)
            for position in [p for p in stored if p >= self.end]:
                del stored[position], sizes[position]
            key = fingerprint(inputs)
            for position in stored:
                stored[position].append((key, seen[position]))
                sizes[position] += sum(output.numel() * output.element_size() for output, _ in seen[position])
            if scale * sizes[start] > self.budget:  # one layer alone does not fit: stream it
                self.covered = start + 1
                return
        self.cached.update(stored)
        self.covered = self.end

    def _one_batch(self, start: int, inputs: Any, where: str, sizes: dict[int, int], scale: float) -> dict[int, list]:
        """One forward of the original, keeping the outputs at positions [start, self.end): the window ends before
        the first layer whose outputs would take the kept bytes, projected over every batch, past the budget."""
        seen: dict[int, list] = {position: [] for position in range(start, self.end)}
        held = [scale * sum(sizes.values())]

        def missing() -> bool:
            return any(len(seen[p]) < self.order[p][1] for p in range(start, self.end))

        def keep(index: int, x: Tensor, output: Tensor) -> None:
            position = start + index
            if position >= self.end or len(seen[position]) == self.order[position][1]:
                return  # past the window, or a call beyond those the converted model makes (not fitted)
            added = scale * output.numel() * output.element_size()
            if position > start and held[0] + added > self.budget:
                self.end = position  # this layer and those after it: a later window
                if not missing():
                    raise StopForward
                return
            held[0] += added
            # A copy: the forward goes on, and an in-place op after the layer would change its output.
            seen[position].append((output.detach().clone(), self.initial_error(position, x, output)))
            if not missing():
                raise StopForward

        try:
            with every_call([site for site, _ in self.order[start : self.end]], keep):
                forward(self.original, inputs, where, "original model")
        except StopForward:
            pass
        return seen


def fingerprint(inputs: Any) -> tuple:
    """What tells one batch from another cheaply: each input tensor's shape, float64 sum, and sum weighted by the
    position along its last two dimensions (a flipped image, the common augmentation, has the same plain sum)."""
    return tuple((tuple(t.shape), float(t.sum(dtype=torch.float64)), _weighted_sum(t))
                 for t in as_args(inputs) if isinstance(t, Tensor))  # fmt: skip


def _weighted_sum(t: Tensor) -> float:
    if t.dim() == 0:
        return 0.0
    last = t.shape[-2:] if t.dim() >= 2 else t.shape[-1:]
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32  # exact weights up to 2^24 positions
    ramp = torch.arange(1, last.numel() + 1, device=t.device, dtype=dtype).reshape(last)
    return float((t.detach() * ramp).sum(dtype=torch.float64))

"""The converted model's forward up to the layer being fitted, without recomputing what the last fit did not change.

Calibrating layer after layer (calibrate.py) runs the converted model on every batch up to each layer in turn: about
(layers / 2) forwards of it in all, most of in-order calibration's time once the original's outputs are kept
(model_runs.py). Yet between two passes only the layer fitted last changed. Every module call that ended before that
layer's first call, in the pass that fitted it, computed the same outputs as it will in the next pass: ConvertedPrefix
records the outermost such calls (a ResNet's stem and finished stages, a finished block) and serves their outputs in
the next pass instead of running them, so each pass computes little more than the stretch between two fitted layers.

Works on any model, no graph needed: module calls are told apart by (module, how many times it was called in this
forward), and an output is kept only when every leaf is a tensor or an immutable scalar and the forward did not
change it in place after the call (version counters tell). Kept outputs are served as copies, within a memory
budget; past it, the calls run as before. Before a call is first served, it is run once and compared bit for bit with what would be served: a module
whose output is not a function of its inputs (hidden state, randomness in eval mode) turns the cache off, and so does
data that comes in another order on another pass (shuffled), so the fits are the same as without the cache.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from .model_runs import fingerprint

log = logging.getLogger(__name__)

_IMMUTABLE = (int, float, bool, str, type(None), torch.Size, torch.dtype, torch.device)
Key = tuple[int, int]  # (id of the module, its call number in the forward)


class ConvertedPrefix:
    """Serves the converted model's module outputs that the last fit did not change; see the module docstring.

    with prefix.pass_to(layer): one pass over the data up to `layer` (the layer to fit next);
    with prefix.batch(index, inputs): each batch's forward within it.
    """

    def __init__(self, model: nn.Module, budget: int) -> None:
        self.model, self.budget = model, budget
        self.enabled = budget > 0
        self.served: dict[int, tuple[tuple, dict[Key, Any]]] = {}  # batch index -> (fingerprint, outputs by call)
        self.verified: set[Key] = set()
        self._active = False  # in a batch: calls of the converted model's modules elsewhere are not this forward's

    @contextlib.contextmanager
    def pass_to(self, layer: nn.Module) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._target, self._recorded, self._bytes = layer, {}, 0
        modules = [m for m in self.model.modules() if m is not self.model]
        handles = [m.register_forward_pre_hook(self._before, prepend=True) for m in modules]
        handles += [m.register_forward_hook(self._after) for m in modules]
        originals = {}
        served_modules = {key[0] for _, outputs in self.served.values() for key in outputs}
        for module in modules:
            if id(module) in served_modules and id(module) not in originals:
                originals[id(module)] = (module, module.__dict__.get("forward"))
                module.forward = self._serving(module, module.forward)
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module, own in originals.values():
                del module.forward
                if own is not None:
                    module.forward = own
        self.served = self._recorded if self.enabled else {}

    @contextlib.contextmanager
    def batch(self, index: int, inputs: Any) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        key = fingerprint(inputs)
        served = self.served.get(index)
        if served is not None and served[0] != key:
            self._disable(f"calibration batch {index}: the data gave other batches than on the pass before (shuffled?)")
        self._index, self._key = index, key
        self._now = served[1] if served is not None and self.enabled else {}
        self._calls: dict[int, int] = {}
        self._stack: list[tuple[nn.Module, int]] = []
        self._ended: list[tuple[int, Key, Any]] = []  # (depth, call, output) of the outermost calls that ended
        self._cut, self._active = False, True
        try:
            yield
        finally:
            self._active = False
            if self._cut and self.enabled:
                self._keep()

    def _before(self, module: nn.Module, _args) -> None:
        if not self._active:
            return
        if module is self._target:
            self._cut = True  # what ends from here on may depend on the layer about to be fitted
        number = self._calls.get(id(module), 0)
        self._calls[id(module)] = number + 1
        self._stack.append((module, number))

    def _after(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._active or not self._stack:
            return
        depth = len(self._stack)
        _, number = self._stack.pop()
        if self._cut:
            return
        while self._ended and self._ended[-1][0] > depth:  # its own calls: served with it from now on
            self._ended.pop()
        call = (id(module), number)
        kept = self._now.get(call)  # served: the copy kept, not the one the model may have changed since
        if kept is None and _keepable(output):
            # An in-place module (ReLU(inplace=True)) returns its input changed: served, it changes it the same way.
            in_place = isinstance(output, Tensor) and bool(args) and output is args[0]
            kept = _Kept(tree_map(lambda leaf: leaf.detach() if isinstance(leaf, Tensor) else leaf, output), in_place)
        self._ended.append((depth, call, kept))

    def _keep(self) -> None:
        """This batch's outermost calls that ended before the cut, as many as fit the budget, in call order."""
        outputs = {}
        for _, call, output in self._ended:
            if output is None or not output.unchanged():  # the model changed it in place after the call
                continue
            # The whole storage: a view keeps all of it alive.
            size = sum(t.untyped_storage().nbytes() for t in tree_flatten(output.value)[0] if isinstance(t, Tensor))
            if self._bytes + size > self.budget:
                break
            self._bytes += size
            outputs[call] = output
        if outputs:
            self._recorded[self._index] = (self._key, outputs)

    def _serving(self, module: nn.Module, forward):
        def serve(*args, **kwargs):
            # Only a call through module(...) in this forward (its pre-hook is on top): not a direct .forward() call.
            if not (self._active and self.enabled and self._stack and self._stack[-1][0] is module):
                return forward(*args, **kwargs)
            call = (id(module), self._stack[-1][1])
            kept = self._now.get(call)
            if kept is None:
                return forward(*args, **kwargs)
            if call not in self.verified:
                live = forward(*args, **kwargs)
                if not _same(live, kept.value):
                    self._disable(f"module {type(module).__name__}'s output is not the one of the pass before")
                    return live
                self.verified.add(call)
                return live
            if kept.in_place:
                return args[0].copy_(kept.value)
            return tree_map(lambda leaf: leaf.clone() if isinstance(leaf, Tensor) else leaf, kept.value)

        return serve

    def _disable(self, why: str) -> None:
        log.info("%s: the converted model runs in full for each layer from here on", why)
        self.enabled, self.served, self._now = False, {}, {}


class _Kept:
    """A call's output as it ended, and whether the call wrote it into its input.

    Not a copy: the model's own tensors, with their version counters (which every in-place op bumps, on views too)
    so that one the forward changed after the call is known and not kept. Served, they are copied.
    """

    __slots__ = ("value", "in_place", "versions")

    def __init__(self, value: Any, in_place: bool) -> None:
        self.value, self.in_place = value, in_place
        self.versions = [leaf._version for leaf in tree_flatten(value)[0] if isinstance(leaf, Tensor)]

    def unchanged(self) -> bool:
        now = [leaf._version for leaf in tree_flatten(self.value)[0] if isinstance(leaf, Tensor)]
        return now == self.versions


def _keepable(output: Any) -> bool:
    leaves = tree_flatten(output)[0]
    return all(isinstance(leaf, (Tensor, *_IMMUTABLE)) for leaf in leaves)


def _same(a: Any, b: Any) -> bool:
    left, left_spec = tree_flatten(a)
    right, right_spec = tree_flatten(b)
    if left_spec != right_spec or len(left) != len(right):
        return False
    for x, y in zip(left, right, strict=True):
        if isinstance(x, Tensor) != isinstance(y, Tensor):
            return False
        if isinstance(x, Tensor) and not (x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)):
            return False
        if not isinstance(x, Tensor) and x != y:
            return False
    return True

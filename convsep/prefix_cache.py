"""The converted model's forward up to the layer being fitted, without recomputing what the last fit did not change.

Calibrating layer after layer (calibrate.py) runs the converted model on every batch up to each layer in turn: about
(layers / 2) forwards of it in all, most of in-order calibration's time once the original's outputs are kept
(model_runs.py). Yet between two passes only the layer fitted last changed. Every module call that ended before that
layer's first call, in the pass that fitted it, computed the same outputs as it will in the next pass: ConvertedPrefix
records the outermost such calls (a ResNet's stem and finished stages, a finished block) and serves their outputs in
the next pass instead of running them, so each pass computes little more than the stretch between two fitted layers.

Works on any model, no graph needed. A call is known by where it sits in the tree of calls (its parent call's key,
its module, how often that module was called before in the parent call), which serving a call's own calls does not
shift. Only a call that did nothing but compute its output is served: one that changed an input in place
(ReLU(inplace=True)), returned memory it shares with an input (a view, its input itself), or changed its modules
(rebound an attribute, a U-Net encoder keeping its output; a buffer or parameter in place) runs, and so does every
module with hooks of anyone else's (timm's feature hooks), TorchScript, and a call whose output the forward changed
in place after it (version counters tell). Kept outputs are the model's own tensors, served as copies, within a
memory budget; past it, the calls run as before. Before a call is first served, it is run once and compared bit for
bit with what would be served: a module whose output is not a function of its inputs (state outside the model,
randomness in eval mode) turns the cache off, and so does data that comes in another order on another pass
(shuffled), so the fits are the same as without the cache.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from .model_runs import fingerprint

log = logging.getLogger(__name__)

_IMMUTABLE = (int, float, bool, str, type(None), torch.Size, torch.dtype, torch.device)


class _Frame:
    """A module call in progress: its key (where it sits in the tree of calls, which a served call's own calls do not
    shift), how often each child module has been called in it, and its inputs with their version counters."""

    __slots__ = ("module", "key", "children", "inputs", "state")

    def __init__(self, module: Optional[nn.Module], key: tuple, inputs: list, state: Optional[list]) -> None:
        self.module, self.key, self.children, self.inputs, self.state = module, key, {}, inputs, state


class ConvertedPrefix:
    """Serves the converted model's module outputs that the last fit did not change; see the module docstring.

    with prefix.pass_to(layer): one pass over the data up to `layer` (the layer to fit next);
    with prefix.batch(index, inputs): each batch's forward within it.
    """

    def __init__(self, model: nn.Module, budget: int) -> None:
        self.model, self.budget = model, budget
        self.enabled = budget > 0
        self.served: dict[int, tuple[tuple, dict[tuple, Any]]] = {}  # batch index -> (fingerprint, outputs by call)
        self.verified: set[tuple] = set()
        self._active = False  # in a batch: calls of the converted model's modules elsewhere are not this forward's

    @contextlib.contextmanager
    def pass_to(self, layer: nn.Module) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._target, self._recorded, self._bytes = layer, {}, 0
        self._servable = _servable(self.model)  # id -> the modules a call of it may change
        modules = [m for m in _hookable(self.model) if m is not self.model]
        handles, originals = [], {}
        served_modules = {key[-2] for _, outputs in self.served.values() for key in outputs}
        try:
            for module in modules:
                handles.append(module.register_forward_pre_hook(self._before, prepend=True, with_kwargs=True))
                handles.append(module.register_forward_hook(self._after, with_kwargs=True))
                if id(module) in served_modules:
                    originals[id(module)] = (module, module.__dict__.get("forward"))
                    module.forward = self._serving(module, module.forward)
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
        self._stack = [_Frame(None, (), [], None)]  # the root's call, which is not hooked
        self._ended: list[tuple[int, tuple, Any]] = []  # (depth, call, output) of the outermost calls that ended
        self._cut, self._active = False, True
        try:
            yield
        finally:
            self._active = False
            if self._cut and self.enabled:
                self._keep()

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._active:
            return
        if module is self._target:
            self._cut = True  # what ends from here on may depend on the layer about to be fitted
        parent = self._stack[-1]
        number = parent.children.get(id(module), 0)
        parent.children[id(module)] = number + 1
        inputs = [(t, t._version) for t in _tensors((args, kwargs))]
        within = self._servable.get(id(module))
        state = None if within is None or self._cut else _state(within)
        self._stack.append(_Frame(module, (parent.key, id(module), number), inputs, state))

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._active or len(self._stack) < 2:
            return
        depth = len(self._stack)
        frame = self._stack.pop()
        if self._cut:
            return
        while self._ended and self._ended[-1][0] > depth:  # its own calls: served with it from now on
            self._ended.pop()
        kept = self._now.get(frame.key)  # served: the copy kept, not the one the model may have changed since
        if (kept is None and frame.state is not None and _keepable(output) and _apart(output, frame.inputs)
                and _state(self._servable[id(module)]) == frame.state):  # fmt: skip
            kept = _Kept(tree_map(lambda leaf: leaf.detach() if isinstance(leaf, Tensor) else leaf, output))
        self._ended.append((depth, frame.key, kept))

    def _keep(self) -> None:
        """This batch's outermost calls that ended before the cut, as many as fit the budget, in call order."""
        outputs = {}
        for _, call, output in self._ended:
            if output is None or not output.unchanged():  # the model changed it in place after the call
                continue
            # The whole storage: a view keeps all of it alive.
            size = sum(t.untyped_storage().nbytes() for t in _tensors(output.value))
            if self._bytes + size > self.budget:
                break
            self._bytes += size
            outputs[call] = output
        if outputs:
            self._recorded[self._index] = (self._key, outputs)

    def _serving(self, module: nn.Module, forward):
        def serve(*args, **kwargs):
            # Only a call through module(...) in this forward (its pre-hook is on top): not a direct .forward() call.
            if not (self._active and self.enabled and self._stack[-1].module is module):
                return forward(*args, **kwargs)
            call = self._stack[-1].key
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
            return tree_map(lambda leaf: leaf.clone() if isinstance(leaf, Tensor) else leaf, kept.value)

        return serve

    def _disable(self, why: str) -> None:
        log.info("%s: the converted model runs in full for each layer from here on", why)
        self.enabled, self.served, self._now = False, {}, {}


class _Kept:
    """A call's output as it ended: not a copy but the model's own tensors, with their version counters (which every
    in-place op bumps, on views too), so that one the forward changed after the call is known and not kept. Served,
    they are copied."""

    __slots__ = ("value", "versions")

    def __init__(self, value: Any) -> None:
        self.value = value
        self.versions = [t._version for t in _tensors(value)]

    def unchanged(self) -> bool:
        return [t._version for t in _tensors(self.value)] == self.versions


def _servable(model: nn.Module) -> dict[int, list[nn.Module]]:
    """The modules whose calls may be served, each with the modules of its subtree: none with hooks of anyone else's
    (they may read what a call passes by), no TorchScript (it takes no hooks)."""
    if _global_hooks():
        return {}
    servable: dict[int, list[nn.Module]] = {}

    def visit(module: nn.Module) -> bool:
        ok = True
        for child in module.children():
            ok = visit(child) and ok
        ok = ok and not isinstance(module, torch.jit.ScriptModule)
        ok = ok and not (module._forward_hooks or module._forward_pre_hooks)
        if ok:
            servable[id(module)] = list(module.modules())
        return ok

    visit(model)
    return servable


def _state(modules: list[nn.Module]) -> list:
    """What a call could change on its modules besides its output: every attribute (rebinding one changes its id),
    and the buffers and parameters in place (their version counters). A call that changed any of it (a U-Net encoder
    keeping its output for a later layer, a counter) is run, never served."""
    state = []
    for module in modules:
        for name, value in module.__dict__.items():
            if name in ("_parameters", "_buffers", "_modules"):
                state += [(key, id(item), getattr(item, "_version", None)) for key, item in value.items()]
            else:
                state.append((name, id(value)))
    return state


def _global_hooks() -> bool:
    from torch.nn.modules import module as module_file

    return bool(module_file._global_forward_hooks or module_file._global_forward_pre_hooks)


def _hookable(model: nn.Module) -> Iterator[nn.Module]:
    """The modules that take hooks: not TorchScript modules, nor what they hold."""
    if isinstance(model, torch.jit.ScriptModule):
        return
    yield model
    for child in model.children():
        yield from _hookable(child)


def _apart(output: Any, inputs: list) -> bool:
    """Whether the call left its inputs as they were and returned nothing that shares their memory: served, a call
    that changed an input in place (ReLU(inplace=True)) or returned a view of one (chunk) would do neither."""
    if any(t._version != version for t, version in inputs):
        return False
    held = {t.untyped_storage().data_ptr() for t, _ in inputs}
    return not any(t.untyped_storage().data_ptr() in held for t in _tensors(output))


def _tensors(tree: Any) -> list[Tensor]:
    """The tensors among the leaves of a (nested) output or argument list."""
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, Tensor)]


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

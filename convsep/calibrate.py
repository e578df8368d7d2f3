"""Data-aware calibration: refit each depthwise + pointwise pair to reproduce its original layer's outputs.

The SVD init minimises the error of the weights; what matters is the error of the
outputs on real inputs. With the depthwise filters fixed, a pair's output is linear in
its pointwise weights, so the pointwise weights (and bias) that best reproduce the
original layer's outputs are a least-squares solution: accumulate X^T X and X^T Y over
the calibration batches (X: the depthwise outputs, Y: the original outputs), then solve
one small system per group (the pointwise conv is block-diagonal across groups).
Optionally the depthwise filters are refitted the same way with the pointwise weights
fixed, alternating; every step lowers the layer's output error on the calibration data.

Layers are fitted one after the other in the order the model runs them, so that errors
do not pile up: each pair is fitted on its inputs in the converted model (with the
pairs before it already calibrated), against the original layer's outputs on the
original model's inputs to that layer. No labels are needed. That costs a partial forward
of both models per layer and batch; `sequential=False` fits every pair at once on its
inputs in the original model instead: one forward of the original per batch, but the pairs
no longer make up for the errors of the ones before them.

The ridge term pulls towards the current weights (the SVD init at first), not towards
zero: with little data, or directions the data never excites, the fit stays where the
closed form put it. Its strength is `ridge` times the mean diagonal of the system's
Gram matrix, so it does not depend on the scale of the activations.

Under torchrun each process passes its own shard of the batches: the sums of every layer are
added up over the processes before its solve, and rank 0's solution is broadcast, so every
process ends with the same weights as one process calibrating on all the shards (to float
rounding); shards may differ in length, and some may be empty.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from . import distributed
from .activations import patches
from .batches import as_args, rereadable, split_batch
from .devices import device_of, on_device, parse_device, to_device
from .eager import require_eager
from .errors import ConvsepError, ConvsepTypeError, ConvsepValueError
from .kept import KeptLayer, kept_layers
from .layers import _SeparableConvNd
from .plan import LayerDecision, plan_of
from .probe import ConvCalls, cannot_run, eval_mode
from .progress import progress_bar
from .warn import warn_user

log = logging.getLogger(__name__)

# Above this many unknowns per group the depthwise refit's normal matrix gets too large (4096^2 float64 = 134 MB).
MAX_DEPTHWISE_UNKNOWNS = 4096
NO_BATCHES = "calibration data yielded no batches: nothing to calibrate on"
# A kept layer with more weights per output (per group) is not refitted: its system would cost more than the
# pairs' (a 512-channel 3x3 conv has 4,608), and too few samples per weight would fit the data, not the layer.
MAX_KEPT_UNKNOWNS = 4096
SAMPLES_PER_KEPT_WEIGHT = 4
# Feature elements handled at once while accumulating, to bound memory on large activations.
_CHUNK_ELEMENTS = 1 << 22


def calibrate(
    converted: nn.Module,
    original: nn.Module,
    data: Iterable[Any],
    *,
    batches: Optional[int] = None,
    ridge: float = 1e-3,
    alternate: int = 0,
    sequential: bool = True,
    refit_kept: bool = False,
    verbose: bool = False,
    device: Optional[torch.device | str] = None,
) -> nn.Module:
    """Refit the pairs of `converted` so that each reproduces its original layer's outputs on `data`.

    converted: a model returned by `convsep.convert` (it carries the conversion plan). It is
        modified in place and returned; `original` is never modified (both run in eval mode
        during calibration, and every module's train/eval flag is restored afterwards).
    original: the model `convert` was given.
    data: an iterable of batches: input tensors, or tuples (inputs, targets, ...) whose
        targets are ignored; inputs may be a tuple of tensors for models with several inputs.
        It is iterated once per converted layer; a one-shot iterator (a generator) is read
        once and kept in memory (bound it with `batches`).
    batches: use at most this many batches (default: all).
    ridge: strength of the pull towards the current weights, relative to the mean diagonal
        of each least-squares system (default 1e-3).
    alternate: after the pointwise refit, this many rounds of (depthwise refit, pointwise
        refit). 0 refits only the pointwise weights and biases.
    sequential: fit the pairs one after the other, each on its inputs in the converted model
        with the pairs before it calibrated (the default: errors do not pile up; a partial
        forward of both models per layer and batch); False fits them all at once on their
        inputs in the original model (one forward of the original per batch).
    refit_kept: also refit the layers conversion kept as they were (nn.Linear and standard
        convs, not shared, not parametrized) that run after a converted one, in the same order, on
        their inputs in the converted model against the original layer's outputs: a classifier
        head then makes up for what the pairs before it changed (see kept.py). Needs
        sequential=True. A layer with more than 4,096 weights per output (per group), or fewer
        than 4 samples per weight in the data, is left as it was, with the reason recorded.
    verbose: print each layer's relative output error on the data before and after; with
        tqdm installed (the `progress` extra) and stderr a terminal, also a progress bar.
    device: run on this device (converted is moved there and returned there; original is
        copied there if it lives elsewhere). Default: the device of converted's parameters.

    The per-layer errors are recorded in `converted.convsep_plan.calibration`.

    In a torch.distributed process group (torchrun), `data` is this process's shard: the fit uses
    the batches of every process, and every process ends with the same weights (see the module
    docstring). Only rank 0 prints. All processes must pass the same models.
    """
    with distributed.together():  # a bad argument on one process ends them all, not only that one
        plan = _check_arguments(converted, original, batches, ridge, alternate, sequential, refit_kept)
        if device is not None:
            device = parse_device(device)
            converted.to(device)
            original = on_device(original, device)
        else:
            device = device_of(converted)
        source = _Batches(data, batches, device)
        layers = [_Layer.find(decision, converted, original) for decision in plan.converted]
        kept = [_Layer(name, layer, source) for name, layer, source in kept_layers(converted, original)] if refit_kept else []
    converted_layers = ";".join(f"{d.name}>{d.module}@{d.rank}" for d in plan.converted)
    distributed.same_everywhere(distributed.fingerprint(converted, original, extra=converted_layers), "models")
    verbose = verbose and distributed.is_main()

    with eval_mode(converted, original), torch.no_grad():
        if sequential:
            results, kept_results = _calibrate_in_order(layers, kept, original, converted, source, ridge, alternate, verbose)
        else:
            results, kept_results = _calibrate_at_once(layers, original, source, ridge, alternate, verbose), None
    # What the fits used (a full pass per calibrated layer); nothing when the data reached no layer.
    counts = torch.tensor([source.count, source.samples] if results else [0, 0], dtype=torch.float64)
    distributed.all_sum([counts])
    plan.calibration = {
        "batches": int(counts[0]),
        "samples": int(counts[1]),
        "ridge": ridge,
        "alternate": alternate,
        "sequential": sequential,
        "layers": results,
    }
    if refit_kept:
        plan.calibration["kept"] = kept_results
    return converted


def _calibrate_in_order(layers, kept, original, converted, source, ridge, alternate, verbose) -> tuple[dict, dict]:
    """Each pair (and each kept layer after one) on its inputs in the converted model, in the order the model runs them."""
    every = layers + kept
    with distributed.together():
        first = source.first()
        order = None if first is None else _run_order(converted, every, first)
    order = distributed.first_given(order)  # a process with an empty shard learns it from the others
    if order is None:
        raise ConvsepValueError(NO_BATCHES)
    _warn_not_reached(layers, {index for index, _ in order})
    # A kept layer that runs before every pair sees the original's inputs: nothing to make up for.
    order = order[next((position for position, (index, _) in enumerate(order) if index < len(layers)), len(order)) :]
    total = len(order) * source.count if source.count else 0
    progress = progress_bar(total, verbose, "calibrating", "batch", leave=False)
    results, kept_results = {}, {}
    try:
        for index, calls in order:  # in the order the model runs them, so each fit sees the ones before it
            layer = every[index]
            if layer.decision is None:
                kept_results[layer.name] = _refit_kept(layer, calls, original, converted, source, ridge, verbose, progress)
                continue
            stats = _LayerStats(layer.pair, patches=alternate > 0)
            _accumulate_in_converted(stats, layer, calls, original, converted, source, progress)
            results[layer.name] = _refit(layer, stats, ridge, alternate, verbose, progress)
    finally:
        if progress is not None:
            progress.close()
    return results, kept_results


def _refit_kept(layer, calls, original, converted, source, ridge, verbose, progress) -> dict:
    """Refit a kept layer on its inputs in the converted model, or say why it was left as it was."""
    unknowns = layer.pair.in_channels // layer.pair.groups * layer.pair.rank + (layer.pair.pointwise.bias is not None)
    if unknowns > MAX_KEPT_UNKNOWNS:
        return {"refitted": False, "reason": f"{unknowns} weights per output (more than {MAX_KEPT_UNKNOWNS})"}
    stats = _LayerStats(layer.pair, patches=False, on_original_inputs=True)  # its initial error is its error before
    _accumulate_in_converted(stats, layer, calls, original, converted, source, progress)
    if stats.count < SAMPLES_PER_KEPT_WEIGHT * unknowns:
        return {
            "refitted": False,
            "reason": f"{stats.count} samples for {unknowns} weights per output (fewer than {SAMPLES_PER_KEPT_WEIGHT} "
            "per weight): refitting would fit the calibration data, not the layer",
        }
    record = _refit(layer, stats, ridge, 0, verbose, progress)
    return {"refitted": True, "before": record["before"], "after": record["after"]}


def _calibrate_at_once(layers, original, source, ridge, alternate, verbose) -> dict:
    """Every pair on its inputs in the original model, from one forward of the original per batch."""
    layers = list({id(layer.pair): layer for layer in layers}.values())  # a shared pair: its last layer, as in order
    stats = [_LayerStats(layer.pair, patches=alternate > 0, on_original_inputs=True) for layer in layers]
    calls = torch.zeros(len(layers), dtype=torch.float64)

    def keep(index: int, x: Tensor, y: Tensor) -> None:
        calls[index] += 1
        stats[index].add(x, y, layers[index].name)

    progress = progress_bar(source.count or 0, verbose, "calibrating", "batch", leave=False)
    try:
        with distributed.together(), _every_call([layer.original for layer in layers], keep):
            batches = 0
            for batches, inputs in enumerate(source, 1):
                _forward(original, inputs, f"calibration batch {batches}", "original model")
                if progress is not None:
                    progress.update()
        if distributed.global_min(-batches) == 0:  # no process had a batch (the most any had is 0)
            raise ConvsepValueError(NO_BATCHES)
        distributed.all_sum([calls])
        reached = [index for index in range(len(layers)) if calls[index] > 0]
        _warn_not_reached(layers, set(reached))
        results = {}
        for index in reached:
            stats[index].sum_over_processes()
            results[layers[index].name] = _refit(layers[index], stats[index], ridge, alternate, verbose, progress)
    finally:
        if progress is not None:
            progress.close()
    return results


@contextlib.contextmanager
def _every_call(sites: list[Union[nn.Module, Tensor]], keep) -> Iterator[None]:
    """keep(index in `sites`, input, output) after every call of each conv module in `sites`, and of every
    conv call that uses a weight in `sites` (a functional conv's)."""
    handles = [
        site.register_forward_hook(lambda _module, args, output, index=index: keep(index, args[0], output))
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


def _warn_not_reached(layers: list[_Layer], reached: set[int]) -> None:
    not_run = [layer.name for index, layer in enumerate(layers) if index not in reached]
    if not_run and distributed.is_main():
        warn_user(f"not calibrated, since the data never reached them: {', '.join(not_run)}")


def _accumulate_in_converted(stats, layer, calls, original, converted, source, progress) -> None:
    """Add up one pair's sums over all batches: its inputs in the converted model, the original layer's outputs."""
    with distributed.together():
        for index, inputs in enumerate(source, 1):
            where = f"calibration batch {index} (calibrating {layer.name!r})"
            seen = _original_calls(original, layer.original, inputs, calls, where)
            sources = _pair_inputs(converted, layer.module, inputs, calls, where)
            if len(seen) != len(sources):
                raise ConvsepValueError(
                    f"{where}: the layer ran {len(sources)} times in the converted model and "
                    f"{len(seen)} times in the original: is `original` the model convert was given?"
                )
            for x, (x_original, y) in zip(sources, seen):
                stats.add(x, y, layer.name)
                if stats.initial_error is not None:
                    # The pair as it stands, on the inputs the original layer saw: the error its init was predicted to make.
                    stats.initial_error += float((layer.pair(x_original) - y).square().sum(dtype=torch.float64))
            if progress is not None:
                progress.update()
    stats.sum_over_processes()


def _refit(layer, stats, ridge, alternate, verbose, progress) -> dict:
    """Refit one pair from its sums (over every process) and say how its output error changed."""
    with distributed.together():
        before, after = _fit(layer.pair, stats, ridge, alternate, layer.name)
    # Every process solved the same sums; rank 0's answer makes them agree to the last bit.
    distributed.broadcast_module(layer.module)
    if stats.initial_error is None:  # fitted on the original's inputs: its error before the fit is the initial one
        initial = before
    else:
        initial = _relative_error(stats.initial_error, stats.target_energy) if stats.count else float("nan")
    decision = layer.decision
    what = "calibrated" if decision is not None else "refitted kept layer"
    message = f"{what} {layer.name}: relative output error {before:.4f} -> {after:.4f}"
    if decision is not None and decision.predicted_output_error is not None:
        message += (
            f" (as converted, on the original's inputs: predicted {decision.predicted_output_error:.4f}, "
            f"measured {initial:.4f})"
        )
    if decision is not None and decision.predicted_refit_error is not None:
        message += f" (predicted after the refit: {decision.predicted_refit_error:.4f})"
    log.info("%s", message)
    if verbose:
        (progress.write if progress is not None else print)(message)
    return {"before": before, "after": after, "initial": initial}


def _check_arguments(converted, original, batches, ridge, alternate, sequential, refit_kept):
    for name, model in (("converted", converted), ("original", original)):
        require_eager(model, name)
    if converted is original:
        raise ConvsepValueError("converted and original are the same model: pass the model convert was given as original")
    plan = plan_of(converted)
    if plan is None:
        raise ConvsepValueError("converted has no conversion plan (convsep_plan): pass a model returned by convsep.convert")
    if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int) or batches < 1):
        raise ConvsepValueError(f"batches={batches!r} must be a positive int (or None for all batches)")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0 or math.isinf(ridge):
        raise ConvsepValueError(f"ridge={ridge!r} must be a finite number >= 0")
    if isinstance(alternate, bool) or not isinstance(alternate, int) or alternate < 0:
        raise ConvsepValueError(f"alternate={alternate!r} must be an int >= 0 (rounds of depthwise + pointwise refits)")
    if not isinstance(sequential, bool):
        raise ConvsepTypeError(f"sequential={sequential!r} must be True or False")
    if not isinstance(refit_kept, bool):
        raise ConvsepTypeError(f"refit_kept={refit_kept!r} must be True or False")
    if refit_kept and not sequential:
        raise ConvsepValueError(
            "refit_kept=True needs sequential=True: fitted at once, every layer sees the original model's inputs, "
            "which the kept layers already fit"
        )
    return plan


class _Batches:
    """The calibration inputs: on the device, at most `limit` batches, re-iterable, checked to be non-empty."""

    def __init__(self, data: Iterable[Any], limit: Optional[int], device: torch.device) -> None:
        if isinstance(data, Tensor):
            raise ConvsepTypeError(
                "calibration data is a single tensor, which would be iterated sample by sample: pass a list of batches, e.g. [x]"
            )
        if not hasattr(data, "__iter__") and not hasattr(data, "__getitem__"):
            raise ConvsepTypeError(
                f"calibration data must be an iterable of batches (a list, a DataLoader, ...), got {type(data).__name__}"
            )
        self.data = rereadable(data, limit)  # it is read once per layer
        self.limit, self.device = limit, device
        self.samples = 0
        self.count: Optional[int] = None  # batches per pass, known once a pass has ended (or from len())
        if hasattr(self.data, "__len__"):
            self.count = len(self.data) if limit is None else min(len(self.data), limit)

    def _inputs(self):
        for index, batch in enumerate(itertools.islice(self.data, self.limit), 1):
            inputs, _ = split_batch(batch, f"calibration batch {index}")
            yield to_device(inputs, self.device)

    def first(self):
        """The first batch's inputs, or None for data that yields nothing (checked by the caller, with the other processes)."""
        return next(self._inputs(), None)

    def __iter__(self):
        count = samples = 0
        for inputs in self._inputs():
            count += 1
            samples += _samples(inputs)
            yield inputs
        self.count, self.samples = count, samples


def _samples(inputs: Any) -> int:
    first = inputs[0] if isinstance(inputs, (tuple, list)) and inputs else inputs
    return int(first.shape[0]) if isinstance(first, Tensor) and first.dim() else 1


@dataclass
class _Layer:
    name: str
    pair: Union[_SeparableConvNd, KeptLayer]  # in the converted model: what the least squares refits
    # What identifies the layer's calls in the original model: the conv module (whose weight may be
    # computed anew on every call, by weight norm), or a functional conv's weight parameter.
    original: Union[nn.Module, Tensor]
    decision: Optional[LayerDecision] = None  # None for a kept layer

    @property
    def module(self) -> nn.Module:
        return self.pair.module if isinstance(self.pair, KeptLayer) else self.pair

    @classmethod
    def find(cls, decision: LayerDecision, converted: nn.Module, original: nn.Module) -> "_Layer":
        try:
            pair = converted.get_submodule(decision.module)
        except AttributeError:
            pair = None
        if not isinstance(pair, _SeparableConvNd):
            raise ConvsepValueError(
                f"the plan says {decision.name!r} became {decision.module!r}, but converted has no pair there"
            )
        try:
            if decision.kind.startswith("F."):
                site = original.get_parameter(decision.name)
            else:
                site = original.get_submodule(decision.name)
                site = site if isinstance(site, _ConvNd) else None
        except AttributeError:
            site = None
        if site is None:
            raise ConvsepValueError(
                f"original has no convolution {decision.name!r}, which converted's plan names: pass the model convert was given"
            )
        return cls(decision.name, pair, site, decision)


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once it has shown what was needed."""


def _forward(model: nn.Module, inputs: Any, where: str, who: str = "model") -> None:
    """model(*inputs), with a clear InputShapeError when the model cannot take them."""
    args = as_args(inputs)
    try:
        model(*args)
    except (_StopForward, ConvsepError):  # ConvsepError: from calibrate's own hooks, already clear
        raise
    except Exception as error:  # the model's own code can fail in any way on inputs it cannot take
        raise cannot_run(where, who, args, error) from error


def _run_order(converted: nn.Module, layers: list[_Layer], inputs: Any) -> list[tuple[int, int]]:
    """(index in `layers`, calls per batch) of the pairs in the order of their first call on one batch."""
    calls: dict[int, int] = {}

    def record(module, _args):
        calls[id(module)] = calls.get(id(module), 0) + 1

    index_of = {id(layer.module): index for index, layer in enumerate(layers)}  # a shared pair: its last layer
    handles = [layers[index].module.register_forward_pre_hook(record) for index in index_of.values()]
    try:
        _forward(converted, inputs, "calibration batch 1", "converted model")
    finally:
        for handle in handles:
            handle.remove()
    return [(index_of[pair], count) for pair, count in calls.items()]


def _original_calls(
    original: nn.Module, site: Union[nn.Module, Tensor], inputs: Any, expected: int, where: str
) -> list[tuple[Tensor, Tensor]]:
    """(input, output) of each call of the conv module `site`, or of the conv calls that use the weight
    `site`, stopping the forward once all have been seen."""
    outputs: list[tuple[Tensor, Tensor]] = []

    def keep(x: Tensor, output: Tensor) -> None:
        outputs.append((x, output))
        if len(outputs) == expected:
            raise _StopForward

    try:
        with _every_call([site], lambda _index, x, output: keep(x, output)):
            _forward(original, inputs, where, "original model")
    except _StopForward:
        pass
    return outputs


def _pair_inputs(converted: nn.Module, pair: nn.Module, inputs: Any, expected: int, where: str) -> list[Tensor]:
    """The inputs of `pair` in the converted model, stopping before the pair runs for the last time."""
    seen: list[Tensor] = []

    def keep(_module, args):
        seen.append(args[0])
        if len(seen) == expected:
            raise _StopForward

    handle = pair.register_forward_pre_hook(keep)
    try:
        _forward(converted, inputs, where, "converted model")
    except _StopForward:
        pass
    finally:
        handle.remove()
    return seen


class _LayerStats:
    """Sums over the calibration data that determine the least-squares fits of one pair.

    features: the depthwise outputs (pointwise refit only), or the depthwise conv's input
    patches (for alternating: the depthwise outputs are linear in them, so both refits
    follow from the same sums without another pass over the data). Per group g:
    gram = sum F F^T, cross = sum F Y^T, feature_sum = sum F, target_sum = sum Y.
    """

    def __init__(self, pair: _SeparableConvNd, patches: bool, on_original_inputs: bool = False) -> None:
        self.pair, self.patches = pair, patches
        self.groups = pair.groups
        self.kernel = math.prod(pair.kernel_size)
        per_channel = self.kernel if patches else pair.rank
        width = pair.in_channels // self.groups * per_channel
        outputs = pair.out_channels // self.groups
        device = pair.pointwise.weight.device
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.gram = zeros(self.groups, width, width)
        self.cross = zeros(self.groups, width, outputs)
        self.feature_sum = zeros(self.groups, width)
        self.target_sum = zeros(self.groups, outputs)
        self.count = 0  # output positions seen (samples x positions)
        self.target_energy = 0.0  # sum of Y^2
        # sum of (pair(X_original) - Y)^2 before the refit; None when X is X_original (the fit's own "before")
        self.initial_error: Optional[float] = None if on_original_inputs else 0.0

    def _features(self, x: Tensor) -> Tensor:
        # The depthwise outputs, or every input channel's patches at the depthwise conv's output positions
        # (positions possibly flattened: only their count and order matter here).
        return patches(x, self.pair.depthwise) if self.patches else self.pair.depthwise(x)

    def add(self, x: Tensor, y: Tensor, name: str) -> None:
        if isinstance(self.pair, KeptLayer):
            x, y = self.pair.arrange(x, y)
        elif x.dim() == self.pair.depthwise.weight.dim() - 1:  # an unbatched call
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        per_sample = x[:1].numel() * (self.kernel if self.patches else self.pair.rank)
        step = max(1, _CHUNK_ELEMENTS // max(per_sample, 1))
        for start in range(0, x.shape[0], step):
            features = self._features(x[start : start + step])
            target = y[start : start + step]
            if features[0, 0].numel() != target[0, 0].numel() or target.shape[1] != self.pair.out_channels:
                raise ConvsepValueError(
                    f"layer {name!r}: the original layer's outputs {tuple(target.shape)} do not match the pair's "
                    f"{self.pair.out_channels} channels at {features[0, 0].numel()} positions"
                )
            # Products in the model's dtype (float32 sums over one chunk are accurate enough and twice
            # as fast as float64), accumulated over chunks and batches in float64.
            f = _by_group(features.detach(), self.groups)  # (groups, features per group, positions)
            t = _by_group(target.detach().to(f.dtype), self.groups)
            self.gram += torch.bmm(f, f.transpose(1, 2)).double()
            self.cross += torch.bmm(f, t.transpose(1, 2)).double()
            self.feature_sum += f.sum(dim=2).double()
            self.target_sum += t.sum(dim=2).double()
            self.count += f.shape[-1]
            self.target_energy += float(t.square().sum(dtype=torch.float64))

    def finite(self) -> bool:
        """Whether every sum is finite: one NaN or inf in the data poisons them all, and then the fit."""
        sums = (self.gram, self.cross, self.feature_sum, self.target_sum)
        return math.isfinite(self.target_energy) and all(bool(torch.isfinite(t).all()) for t in sums)

    def sum_over_processes(self) -> None:
        """Add up the sums of every process of a distributed job (nothing to do in one process)."""
        if not distributed.active():
            return
        scalars = torch.tensor([self.count, self.target_energy, self.initial_error or 0.0], dtype=torch.float64, device=self.gram.device)
        distributed.all_sum([self.gram, self.cross, self.feature_sum, self.target_sum, scalars])
        self.count, self.target_energy = int(scalars[0]), float(scalars[1])
        if self.initial_error is not None:
            self.initial_error = float(scalars[2])


def _by_group(x: Tensor, groups: int) -> Tensor:
    """(batch, channels, *positions) -> (groups, channels per group, batch x positions)."""
    return x.reshape(x.shape[0], groups, x.shape[1] // groups, -1).permute(1, 2, 0, 3).reshape(groups, x.shape[1] // groups, -1)


def _depthwise_factors(pair: _SeparableConvNd) -> Tensor:
    """The depthwise filters as (groups, in per group, rank, kernel elements), in float64."""
    g, r = pair.groups, pair.rank
    return pair.depthwise.weight.detach().double().reshape(g, pair.in_channels // g, r, -1)


def _pointwise_system(pair: _SeparableConvNd, stats: _LayerStats) -> tuple[Tensor, Tensor, Tensor]:
    """(A, B, current solution) of the pointwise least squares A theta = B, theta = [P^T; bias]."""
    g = pair.groups
    if stats.patches:  # depthwise outputs F = d X: their sums follow from the patch sums
        d = _depthwise_factors(pair)
        mg, r, k = d.shape[1:]
        q = stats.gram.reshape(g, mg, k, mg, k)
        gram = torch.einsum("gcjk,gckdl,gdml->gcjdm", d, q, d).reshape(g, mg * r, mg * r)
        cross = torch.einsum("gcjk,gckn->gcjn", d, stats.cross.reshape(g, mg, k, -1)).reshape(g, mg * r, -1)
        feature_sum = torch.einsum("gcjk,gck->gcj", d, stats.feature_sum.reshape(g, mg, k)).reshape(g, mg * r)
    else:
        gram, cross, feature_sum = stats.gram, stats.cross, stats.feature_sum
    weight = pair.pointwise.weight.detach().double()
    theta = weight.reshape(g, weight.shape[0] // g, -1).transpose(1, 2)  # (g, inputs, outputs)
    if pair.pointwise.bias is None:
        return gram, cross, theta
    width = gram.shape[-1]
    a = gram.new_zeros(g, width + 1, width + 1)
    a[:, :width, :width] = gram
    a[:, :width, width] = a[:, width, :width] = feature_sum
    a[:, width, width] = stats.count
    b = torch.cat([cross, stats.target_sum.unsqueeze(1)], dim=1)
    bias = pair.pointwise.bias.detach().double().reshape(g, 1, -1)
    return a, b, torch.cat([theta, bias], dim=1)


def _ridge_solve(a: Tensor, b: Tensor, current: Tensor, ridge: float, width: int) -> Tensor:
    """argmin ||data fit||^2 + lam ||theta - current||^2, lam = ridge x mean diagonal of the weight block of a."""
    scale = a[:, :width, :width].diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)
    lam = (ridge * scale).clamp_min(1e-12 * scale).reshape(-1, 1, 1)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return torch.linalg.solve(a + lam * eye, b + lam * current)


def _residual(a: Tensor, b: Tensor, theta: Tensor, stats: _LayerStats) -> float:
    """Relative output error ||Y_hat - Y|| / ||Y|| on the data, from the sums alone."""
    squared = stats.target_energy - 2 * float((theta * b).sum()) + float((theta * (a @ theta)).sum())
    return _relative_error(squared, stats.target_energy)


def _relative_error(squared_error: float, energy: float) -> float:
    """sqrt(squared error / energy of the target); a target that is zero everywhere (a pruned layer) is met
    exactly by zero outputs (0.0) and missed infinitely by any other."""
    squared_error = max(squared_error, 0.0)  # from sums, rounding can take an exact fit below zero
    if energy > 0:
        return math.sqrt(squared_error / energy)
    return 0.0 if squared_error == 0 else math.inf


def _refit_pointwise(pair: _SeparableConvNd, stats: _LayerStats, ridge: float) -> tuple[float, float]:
    a, b, current = _pointwise_system(pair, stats)
    width = pair.pointwise.weight[0].numel()  # inputs per output: the pair's depthwise outputs, or a kept layer's features
    theta = _ridge_solve(a, b, current, ridge, width)
    with torch.no_grad():
        weight = pair.pointwise.weight
        weight.copy_(theta[:, :width].transpose(1, 2).reshape(weight.shape))
        if pair.pointwise.bias is not None:
            pair.pointwise.bias.copy_(theta[:, width].reshape(-1))
    return _residual(a, b, current, stats), _residual(a, b, theta, stats)


def _refit_depthwise(pair: _SeparableConvNd, stats: _LayerStats, ridge: float) -> None:
    """Least squares for the depthwise filters with the pointwise weights and bias fixed."""
    g = pair.groups
    d = _depthwise_factors(pair)
    mg, r, k = d.shape[1:]
    p = pair.pointwise.weight.detach().double().reshape(g, -1, mg, r)  # (g, outputs, in per group, rank)
    q = stats.gram.reshape(g, mg, k, mg, k)
    # Y - bias = sum_{c,j,k} P[n,c,j] d[c,j,k] X[c,k]: the normal matrix is (P^T P) (x) (X X^T) entrywise.
    ptp = torch.einsum("gncj,gndm->gcjdm", p, p)
    a = torch.einsum("gcjdm,gckdl->gcjkdml", ptp, q).reshape(g, mg * r * k, mg * r * k)
    cross = stats.cross
    if pair.pointwise.bias is not None:
        bias = pair.pointwise.bias.detach().double().reshape(g, 1, -1)
        cross = cross - stats.feature_sum.unsqueeze(-1) * bias
    b = torch.einsum("gncj,gckn->gcjk", p, cross.reshape(g, mg, k, -1)).reshape(g, -1, 1)
    solution = _ridge_solve(a, b, d.reshape(g, -1, 1), ridge, a.shape[-1])
    with torch.no_grad():
        pair.depthwise.weight.copy_(solution.reshape(pair.depthwise.weight.shape))


def _fit(pair: _SeparableConvNd, stats: _LayerStats, ridge: float, alternate: int, name: str) -> tuple[float, float]:
    """Pointwise refit, then `alternate` rounds of depthwise + pointwise; (error before, error after)."""
    if stats.count == 0:
        return float("nan"), float("nan")
    if not stats.finite():
        raise ConvsepValueError(
            f"calibrating {name!r}: its inputs or the original layer's outputs on the calibration data hold NaN or "
            "inf, so its fit would be NaN: the layer was left as it was. Look for NaN/inf in the calibration data"
        )
    before, after = _refit_pointwise(pair, stats, ridge)
    unknowns = pair.in_channels // pair.groups * pair.rank * stats.kernel
    if alternate and unknowns > MAX_DEPTHWISE_UNKNOWNS:
        warn_user(
            f"layer {name!r}: refitting its depthwise filters means {unknowns} unknowns per group (more than "
            f"{MAX_DEPTHWISE_UNKNOWNS}); only its pointwise weights were refitted",
        )
        return before, after
    for _ in range(alternate):
        _refit_depthwise(pair, stats, ridge)
        _, after = _refit_pointwise(pair, stats, ridge)
    return before, after

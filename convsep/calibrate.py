"""Data-aware calibration: refit each depthwise + pointwise pair to reproduce its original layer's outputs.

Each pair's pointwise weights (and, alternating, its depthwise filters) are refitted by least
squares on sums taken over the calibration batches (least_squares.py says what is solved).
This module decides which inputs the sums are taken over and in which order the layers are
fitted, runs both models to get them, and records what the fits did.

Layers are fitted one after the other in the order the model runs them, so that errors
do not pile up: each pair is fitted on its inputs in the converted model (with the
pairs before it already calibrated), against the original layer's outputs on the
original model's inputs to that layer. No labels are needed. That costs a partial forward
of the converted model per layer and batch, in which what the last fit did not change is served
from the pass before (prefix_cache.py), and of the original one per batch and group of layers
whose outputs fit in memory (model_runs.py); `sequential=False` fits every pair at once
on its inputs in the original model instead: one forward of the original per batch, but the
pairs no longer make up for the errors of the ones before them.

Under torchrun each process passes its own shard of the batches: the sums of every layer are
added up over the processes before its solve, and rank 0's solution is broadcast, so every
process ends with the same weights as one process calibrating on all the shards (to float
rounding); shards may differ in length, and some may be empty.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from . import distributed
from .batches import rereadable, split_batch
from .devices import device_of, on_device, parse_device, to_device
from .eager import require_eager
from .errors import ConvsepTypeError, ConvsepValueError, error_summary
from .kept import KeptLayer, kept_layers
from .layers import _SeparableConvNd
from .least_squares import LayerStats, fit, refits_depthwise, relative_error
from .model_runs import OriginalOutputs, every_call, forward, outputs_budget, pair_inputs, run_order
from .plan import LayerDecision, plan_of
from .prefix_cache import ConvertedPrefix
from .probe import eval_mode
from .progress import progress_bar
from .warn import warn_user

log = logging.getLogger(__name__)

NO_BATCHES = "calibration data yielded no batches: nothing to calibrate on"
# A kept layer with more weights per output (per group) is not refitted: its system would cost more than the
# pairs' (a 512-channel 3x3 conv has 4,608), and too few samples per weight would fit the data, not the layer.
MAX_KEPT_UNKNOWNS = 4096
SAMPLES_PER_KEPT_WEIGHT = 4


def calibrate(
    converted: nn.Module,
    original: nn.Module,
    data: Iterable[Any],
    *,
    batches: Optional[int] = None,
    ridge: float = 1e-3,
    alternate: int = 0,
    sequential: bool = True,
    refit_kept: Optional[bool] = None,
    verbose: bool = False,
    device: Optional[torch.device | str] = None,
) -> nn.Module:
    """Refit the pairs of `converted` so that each reproduces its original layer's outputs on `data`.

    converted: a model returned by `convsep.convert` (it carries the conversion plan). It is
        modified in place and returned; `original` is never modified (both run in eval mode
        during calibration, and every module's train/eval flag is restored afterwards).
    original: the model `convert` was given. For a model converted twice (convert(convert(model), ...)) that
        may be the first conversion's result: then only the pairs the second conversion made are calibrated
        (the others are pairs in both models), or the model itself, and every pair is calibrated.
    data: an iterable of batches: input tensors, or tuples (inputs, targets, ...) whose
        targets are ignored; inputs may be a tuple of tensors for models with several inputs.
        It is iterated once per converted layer (in order, once more per group of layers whose
        original outputs are kept: model_runs.py); a one-shot iterator (a generator) is read
        once and kept in memory (bound it with `batches`). Data that comes in another order
        on each pass (shuffle=True) is fitted correctly, without those savings.
    batches: use at most this many batches (default: all).
    ridge: strength of the pull towards the current weights, relative to the mean diagonal
        of each least-squares system (default 1e-3).
    alternate: after the pointwise refit, this many rounds of (depthwise refit, pointwise
        refit). 0 refits only the pointwise weights and biases.
    sequential: fit the pairs one after the other, each on its inputs in the converted model
        with the pairs before it calibrated (the default: errors do not pile up; a partial
        forward of the converted model per layer and batch, from what the layer fitted last
        changed on: see prefix_cache.py); False fits them all at once on their inputs in the
        original model (one forward of the original per batch).
    refit_kept: also refit the layers conversion kept as they were (nn.Linear and standard
        convs, not shared, not parametrized) that run after a converted one, in the same order, on
        their inputs in the converted model against the original layer's outputs: a classifier
        head then makes up for what the pairs before it changed (see kept.py). Needs
        sequential=True. A layer with more than 4,096 weights per output (per group), or fewer
        than 4 samples per weight in the data, is left as it was, with the reason recorded.
        Default (None): True in order, False at once; pass False to leave every kept layer as it was
        (a layer `exclude=`d from conversion is kept, and so refitted by default).
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
        # On small_cnn over three trainings: 0.19-0.28 points more at 0.25 of the MACs and 0.71-1.29 at 0.15
        # (benchmarks/results/rank_policies_seeds*.md), for a pass per kept layer.
        refit_kept = sequential if refit_kept is None else refit_kept
        if device is not None:
            device = parse_device(device)
            converted.to(device)
            original = on_device(original, device)
        else:
            device = device_of(converted)
        source = _Batches(data, batches, device)
        found = [_Layer.find(decision, converted, original) for decision in plan.converted]
        layers = [layer for layer in found if layer is not None]
        _log_earlier(plan.converted, found)
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
        order = None if first is None else run_order(converted, [layer.module for layer in every], first)
    order = distributed.first_given(order)  # a process with an empty shard learns it from the others
    if order is None:
        raise ConvsepValueError(NO_BATCHES)
    _warn_not_reached(layers, {index for index, _ in order})
    # A kept layer that runs before every pair sees the original's inputs: nothing to make up for.
    order = order[next((position for position, (index, _) in enumerate(order) if index < len(layers)), len(order)) :]
    kept_results = {every[index].name: _too_many_unknowns(every[index]) for index, _ in order if index >= len(layers)}
    kept_results = {name: record for name, record in kept_results.items() if record is not None}
    order = [(index, calls) for index, calls in order if every[index].name not in kept_results]  # never run

    def initial_error(position: int, x: Tensor, y: Tensor) -> Optional[float]:
        """A pair as converted, on the input the original layer saw: the error its init was predicted to make."""
        layer = every[order[position][0]]
        if layer.decision is None:
            return None
        try:  # within the original's forward: the pair's own failure must not read as the original's
            output = layer.pair(x)
        except Exception as error:
            raise ConvsepValueError(
                f"layer {layer.name!r}: its pair cannot run on the original layer's input {tuple(x.shape)}: "
                f"{error_summary(error)}"
            ) from error
        if output.shape != y.shape:  # stats.add, which sees it first, says what does not match
            return math.nan
        return float((output - y).square().sum(dtype=torch.float64))

    sites = [(every[index].original, calls) for index, calls in order]
    originals = OriginalOutputs(original, sites, source, initial_error, outputs_budget(source.device))
    # Half the budget: while a pass serves the outputs kept by the one before, it keeps the next pass's.
    runs = _Runs(originals, ConvertedPrefix(converted, outputs_budget(source.device) // 2))
    total = len(order) * source.count if source.count else 0
    progress = progress_bar(total, verbose, "calibrating", "batch", leave=False)
    results = {}
    try:
        for position, (index, calls) in enumerate(order):  # in the order the model runs them: each fit sees those before
            layer = every[index]
            if layer.decision is None:
                kept_results[layer.name] = _refit_kept(layer, calls, runs, position, converted, source, ridge, verbose,
                                                       progress)  # fmt: skip
                continue
            stats = LayerStats(layer.pair, refits_depthwise(layer.pair, alternate), batches=source.count)
            _accumulate_in_converted(stats, layer, calls, runs, position, converted, source, progress)
            results[layer.name] = _refit(layer, stats, ridge, alternate, verbose, progress)
    finally:
        if progress is not None:
            progress.close()
    return results, {layer.name: kept_results[layer.name] for layer in kept if layer.name in kept_results}


def _too_many_unknowns(layer) -> Optional[dict]:
    """Why a kept layer is not refitted whatever the data (its system would be too large), or None."""
    unknowns = _kept_unknowns(layer)
    if unknowns > MAX_KEPT_UNKNOWNS:
        return {"refitted": False, "reason": f"{unknowns} weights per output (more than {MAX_KEPT_UNKNOWNS})"}
    return None


def _refit_kept(layer, calls, runs, position, converted, source, ridge, verbose, progress) -> dict:
    """Refit a kept layer on its inputs in the converted model, or say why it was left as it was."""
    unknowns = _kept_unknowns(layer)
    stats = LayerStats(layer.pair, patches=False, on_original_inputs=True)  # its initial error is its error before
    _accumulate_in_converted(stats, layer, calls, runs, position, converted, source, progress)
    if stats.count < SAMPLES_PER_KEPT_WEIGHT * unknowns:
        return {
            "refitted": False,
            "reason": f"{stats.count} samples for {unknowns} weights per output (fewer than {SAMPLES_PER_KEPT_WEIGHT} "
            "per weight): refitting would fit the calibration data, not the layer",
        }
    record = _refit(layer, stats, ridge, 0, verbose, progress)
    return {"refitted": True, "before": record["before"], "after": record["after"]}


def _kept_unknowns(layer) -> int:
    """A kept layer's weights per output (per group), its bias included."""
    return layer.pair.in_channels // layer.pair.groups * layer.pair.rank + (layer.pair.pointwise.bias is not None)


def _calibrate_at_once(layers, original, source, ridge, alternate, verbose) -> dict:
    """Every pair on its inputs in the original model, from one forward of the original per batch."""
    layers = list({id(layer.pair): layer for layer in layers}.values())  # a shared pair: its last layer, as in order
    stats = [LayerStats(layer.pair, refits_depthwise(layer.pair, alternate), True, source.count) for layer in layers]
    calls = torch.zeros(len(layers), dtype=torch.float64)

    def keep(index: int, x: Tensor, y: Tensor) -> None:
        calls[index] += 1
        stats[index].add(x, y, layers[index].name)

    progress = progress_bar(source.count or 0, verbose, "calibrating", "batch", leave=False)
    try:
        with distributed.together(), every_call([layer.original for layer in layers], keep):
            batches = 0
            for batches, inputs in enumerate(source, 1):
                forward(original, inputs, f"calibration batch {batches}", "original model")
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


def _warn_not_reached(layers: list[_Layer], reached: set[int]) -> None:
    not_run = [layer.name for index, layer in enumerate(layers) if index not in reached]
    if not_run and distributed.is_main():
        warn_user(f"not calibrated, since the data never reached them: {', '.join(not_run)}")


@dataclass
class _Runs:
    """How in-order calibration runs the two models: the original's outputs kept for several layers at once
    (model_runs.py), the converted model's forward without what the last fit did not change (prefix_cache.py)."""

    originals: OriginalOutputs
    prefix: ConvertedPrefix


def _accumulate_in_converted(stats, layer, calls, runs, position, converted, source, progress) -> None:
    """Add up one pair's sums over all batches: its inputs in the converted model, the original layer's outputs
    (OriginalOutputs: gathered for several layers at once, or the original's prefix run here for this one)."""
    with distributed.together(), runs.prefix.pass_to(layer.module):
        runs.originals.begin(position, layer.name)
        for index, inputs in enumerate(source, 1):
            where = f"calibration batch {index} (calibrating {layer.name!r})"
            seen = runs.originals.outputs(index, inputs, where)
            with runs.prefix.batch(index, inputs):
                sources = pair_inputs(converted, layer.module, inputs, calls, where)
            if len(seen) != len(sources):
                raise ConvsepValueError(
                    f"{where}: the layer ran {len(sources)} times in the converted model and "
                    f"{len(seen)} times in the original: is `original` the model convert was given?"
                )
            for x, (y, initial) in zip(sources, seen, strict=True):
                stats.add(x, y, layer.name)
                if stats.initial_error is not None:
                    stats.initial_error += initial
            if progress is not None:
                progress.update()
    stats.sum_over_processes()


def _refit(layer, stats, ridge, alternate, verbose, progress) -> dict:
    """Refit one pair from its sums (over every process) and say how its output error changed."""
    with distributed.together():
        before, after = fit(layer.pair, stats, ridge, alternate, layer.name)
    # Every process solved the same sums; rank 0's answer makes them agree to the last bit.
    distributed.broadcast_module(layer.module)
    if stats.initial_error is None:  # fitted on the original's inputs: its error before the fit is the initial one
        initial = before
    else:
        initial = relative_error(stats.initial_error, stats.all_target_energy) if stats.count else float("nan")
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
    if refit_kept is not None and not isinstance(refit_kept, bool):
        raise ConvsepTypeError(f"refit_kept={refit_kept!r} must be True, False or None (True in order)")
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
    def find(cls, decision: LayerDecision, converted: nn.Module, original: nn.Module) -> Optional["_Layer"]:
        """The layer `decision` converted, or None for a pair an earlier conversion made (the plan of a model converted
        twice names both conversions' pairs; against the first's result, only the second's have an original conv)."""
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
        if site is None and _is_pair(original, decision.module):
            return None  # made by an earlier conversion: `original` is that conversion's result, the pair is in both
        if site is None:
            raise ConvsepValueError(
                f"original has no convolution {decision.name!r}, which converted's plan names: pass the model convert was given"
            )
        return cls(decision.name, pair, site, decision)


def _is_pair(model: nn.Module, name: str) -> bool:
    try:
        return isinstance(model.get_submodule(name), _SeparableConvNd)
    except AttributeError:
        return False


def _log_earlier(decisions: list[LayerDecision], found: list[Optional[_Layer]]) -> None:
    earlier = ", ".join(decision.name for decision, layer in zip(decisions, found, strict=True) if layer is None)
    if not earlier:
        return
    if any(layer is not None for layer in found):
        log.info("not calibrated, since `original` holds them converted already (an earlier conversion): %s", earlier)
    elif distributed.is_main():
        warn_user(
            f"nothing calibrated: `original` holds every pair of converted already ({earlier}). Pass the model convert "
            "was given (for a model converted twice, the first conversion's result calibrates the second's pairs)"
        )

"""convert(model): every standard convolution becomes a depthwise + pointwise pair.

Module convolutions are swapped in the module tree, so the model keeps its class,
its methods and a predictable state_dict (`layer.conv.depthwise.weight`); shared
modules stay shared. Functional convolutions (`F.conv2d(x, self.weight)`) exist only
in the graph, so the smallest module calling them becomes an fx GraphModule that
calls a pair instead (see trace.py, which also copes with untraceable models).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from . import distributed
from .activations import InputMoments
from .aware import gather, resolve_choices
from .batches import rereadable
from .budget import allocate, cheapest_cost, options_from_errors, spectrum_errors
from .calibrate import calibrate
from .count import (
    break_even_rank,
    conv_macs,
    conv_params,
    kernel_elements,
    largest_saving_rank,
    positions,
    saves_macs,
    separable_macs,
    separable_params,
)
from .eager import require_eager
from .errors import ConvsepTypeError, ConvsepValueError
from .factorize import ChannelSVD, channel_svd, discarded_energy_fraction, full_rank, truncation_error
from .joint_fit import fit_layer
from .layers import SEPARABLE_FOR_DIMS, conv_layers
from .parametrized import PARAMETRIZED, deepcopy_model, folded_conv, parametrization
from .plan import ConversionPlan, LayerDecision, attach_plan, plan_of
from .probe import example_args, probe
from .ranks import RankOverrides, RankSpec, resolve_rank, validate_budget, validate_rank
from .report import report
from .select import LayerFilter, Patterns, conv_why_not, is_candidate, layer_why_not
from .speed import drop_slower_pairs, model_seconds
from .standin import plain_conv
from .trace import Discovery, FunctionalConv, discover, parameter, rewrite
from .version import __version__

log = logging.getLogger(__name__)

OBJECTIVES = ("macs", "latency")
LATENCY_RUNS = 7  # timed passes per comparison (median), after warm-up
LATENCY_MARGIN = 0.05  # a pair must be this much faster than its conv to be worth the change


@dataclass
class Candidate:
    """A convolution that passed selection, waiting for its rank."""

    decision: LayerDecision
    conv: _ConvNd  # the module itself, or a stand-in sharing a functional conv's parameters
    site: Optional[FunctionalConv] = None  # set for functional convs
    folded: Optional[_ConvNd] = None  # for a conv whose weight is computed: a plain conv holding its value
    svd: Optional[ChannelSVD] = None
    whitened: Optional[ChannelSVD] = None  # the activation-aware factorisation, when the data allowed one
    refit_errors: Optional[list[float]] = None  # predicted output error after calibration's refit, per rank
    refit_ranks: Optional[int] = None  # how many ranks to predict refit_errors for (None: every rank)
    pair: Optional[nn.Module] = None  # the replacement, once built
    moments: Optional[InputMoments] = None  # init="joint": the cross-channel input moments the pair is fitted on
    refit_follows: bool = False  # calibration will refit the pair's pointwise weights on the same data

    @property
    def kernel(self) -> _ConvNd:
        """The conv whose weight and bias the pair is built from."""
        return self.folded if self.folded is not None else self.conv

    def spectrum(self) -> ChannelSVD:
        if self.svd is None:
            self.svd = channel_svd(self.kernel.weight, self.conv.groups)
        return self.svd

    def factors(self, init: str) -> Optional[ChannelSVD]:
        """What the pair's weights come from: the whitened SVD for init='activation' (weight SVD where the data
        allowed none), the weight SVD for 'svd', nothing (random) otherwise."""
        if init == "activation" and self.whitened is not None:
            return self.whitened
        return self.spectrum() if init in ("svd", "activation", "joint") else None

    def allocation_errors(self, by: str) -> list[float]:
        """The squared relative error per rank that the budget trades: the output's (after calibration's refit when
        one follows, else of the whitened pair as converted), or the weights' where the data could not tell."""
        if by == "activations" and self.refit_errors is not None:
            return self.refit_errors
        return spectrum_errors(self.whitened.S if by == "activations" and self.whitened is not None else self.spectrum().S)

    def build_pair(self, svd: Optional[ChannelSVD] = None) -> nn.Module:
        """The pair at the decided rank: SVD factors when `svd` is given, else random init."""
        return SEPARABLE_FOR_DIMS[len(self.conv.kernel_size)]._build(self.kernel, self.decision.rank, svd)

    def fit_on_moments(self) -> None:
        """init="joint": fit the built pair on the conv's input moments (joint_fit.py), then let the moments go."""
        moments, self.moments = self.moments, None
        after, what = fit_layer(self.pair, self.conv, self.kernel, moments, self.decision.name, self.refit_follows)
        if after is None:
            self._not_fitted(what)
            return
        decision = self.decision
        decision.joint_fit = what
        decision.whitening, decision.predicted_output_error = "", None  # the whitened factors, if any, went unused
        # What calibration's refit of the pointwise weights leaves on the original model's inputs, with these filters.
        decision.predicted_refit_error = after
        weight = self.kernel.weight.detach().double()
        decision.relative_error = float((self.pair.weight.detach().double() - weight).norm() / weight.norm().clamp_min(1e-300))

    def _not_fitted(self, reason: str) -> None:
        """The pair stays as built from the weight SVD, or, when nothing refits it after and the data allowed one,
        becomes the whitened SVD's (what init="activation" would have built)."""
        self.decision.joint_fit = f"weight SVD: {reason}"
        if self.whitened is not None and not self.refit_follows:
            self.pair = self.build_pair(self.whitened)
            self.decision.joint_fit = f"whitened SVD: {reason}"
            _describe_factors(self.decision, self, self.whitened)


def convert(
    model: nn.Module,
    rank: RankSpec = 1,
    *,
    init: str = "auto",
    include: Patterns = None,
    exclude: Patterns = None,
    inplace: bool = False,
    ranks: Optional[dict[str, RankSpec]] = None,
    example_inputs: Any = None,
    verbose: bool = False,
    objective: str = "macs",
    budget: Optional[float] = None,
    budget_on: str = "macs",
    calibration_data: Any = None,
    calibration_batches: Optional[int] = None,
    calibration_sequential: bool = True,
    calibration_alternate: int = 0,
    calibration_refit_kept: Optional[bool] = None,
    parametrized: str = "fold",
    allocate_by: str = "auto",
    refit: bool = True,
) -> nn.Module:
    """Replace the standard convolutions of `model` with depthwise + pointwise pairs.

    rank: an int (depthwise filters per input channel, capped at each layer's full rank),
        "full" (exact), or a float in (0, 1) (the smallest rank keeping that share of each
        kernel's spectral energy). A rank other than "full" that would not save MACs leaves
        the layer as it is.
    init: "svd" (closed form from the kernels: the per-channel truncated SVD, least weight error),
        "activation" (needs calibration_data: per channel, the truncation that least changes the
        layer's output on the inputs it sees, from one pass of the original model over the data;
        see factorize.py), "joint" (needs calibration_data: the weight SVD's pair, then its depthwise
        filters and pointwise weights fitted together to the layer's outputs on the data, from the
        cross-channel moments of one pass of the original model; see joint_fit.py), "auto" (the
        default: "joint" when calibration_data is given with a budget or with refit=False, else
        "svd": after calibration at a fixed rank the weight SVD did better in our measurements), or
        "random" (PyTorch's default init).
    include, exclude: glob patterns on qualified names (one or a list), or a callable
        (name, module) -> bool; exclude wins. A pattern that matches nothing warns.
    inplace: change `model` itself; otherwise a converted copy is returned and `model` is untouched.
    ranks: per-layer overrides of `rank`, glob -> rank spec; an exact name wins over a glob,
        then the first glob that matches.
    example_inputs: a tensor or a tuple of tensors (the model's positional inputs), needed by
        objective="latency" and budget_on="macs" (one forward pass) and shown by verbose.
    verbose: print the before-and-after report on example_inputs (see convsep.report), or the
        plan's summary without them; with calibration_data, also each layer's calibration error.
    objective: "macs" (convert wherever the rank saves MACs) or "latency" (needs example_inputs:
        time each layer and its pair on this device and input shape, convert only where the pair
        is measured faster, then revert layers until the whole model is measured faster than the
        original; functional convs are not timed and stay as they are). Not with `budget`.
    budget: a share in (0, 1] of the whole model's cost that the converted model may keep;
        per-layer ranks, and which layers to leave as they are, are then chosen to minimise the
        sum of squared relative weight errors (see budget.py). Replaces `rank`; layers named in
        `ranks` keep their override and count at its cost.
    budget_on: what `budget` counts: "macs" (measured on example_inputs) or "params".
    calibration_data: an iterable of batches (tensors, or tuples whose first item is the input):
        after conversion, the pairs are refitted to reproduce the original layers' outputs on it
        (see convsep.calibrate).
    calibration_batches: use at most this many batches of calibration_data (default: all).
    calibration_sequential: calibrate's `sequential`: True (default) fits the pairs one after the
        other on their inputs in the converted model; False fits them all at once on their inputs
        in the original, from one forward of the original per batch (faster on deep models).
    calibration_alternate: calibrate's `alternate`: rounds of refitting the depthwise filters and
        then the pointwise weights again after the pointwise refit (default 0; 2 is worth it at
        aggressive budgets, see README; it costs more on layers with many channels and long kernels).
    calibration_refit_kept: calibrate's `refit_kept`: also refit the linear layers and convs left as
        they were that run after a converted one (a classifier head, a layer `exclude`d), on their inputs
        in the converted model (default None: True when calibrating in order; False leaves them as they were).
    parametrized: "fold" (default) converts convs whose weight is computed (weight_norm,
        spectral_norm, any torch.nn.utils.parametrize parametrization, old or new style) from
        the value their forward uses in eval mode; the pair holds plain weights, and the plan
        records what was folded (`decision.folded`). "keep" leaves such convs as they are.
    allocate_by: what the error `budget` minimises is measured on: "weights" (the share of each
        kernel's energy a rank drops), "activations" (needs calibration_data: the share of each
        layer's output energy the pair is predicted to lose on those inputs: after calibration's
        refit of the pointwise weights when it follows, which needs the inputs' cross-channel
        moments (see refit_error.py), else as converted), or "auto" (the default: "activations"
        when calibration_data is given, else "weights"). The plan records each converted layer's
        prediction (`predicted_refit_error`, `predicted_output_error`).
    refit: with calibration_data, refit the pairs on it after conversion (convsep.calibrate);
        False uses the data only for the activation-aware factorisation and allocation.

    Always use the returned model: when the root calls a functional conv it becomes a GraphModule.
    The decisions, with the reason for every layer kept as it was, are in `result.convsep_plan`.
    """
    require_eager(model)
    rank = validate_rank(rank)
    budget = validate_budget(budget, budget_on, example_inputs, rank)
    overrides = RankOverrides(ranks)
    init, allocate_by = resolve_choices(init, allocate_by, calibration_data, refit, budget)
    if parametrized not in PARAMETRIZED:
        raise ConvsepValueError(
            f"parametrized={parametrized!r} is not known: use one of {', '.join(map(repr, PARAMETRIZED))}"
        )
    selection = LayerFilter(include, exclude)
    if example_inputs is not None:
        example_args(example_inputs)  # a bad value fails now, not after the work
    if calibration_batches is not None and calibration_data is None:
        raise ConvsepValueError(
            f"calibration_batches={calibration_batches!r} needs calibration_data: pass the batches to calibrate on"
        )
    if not isinstance(calibration_sequential, bool):
        raise ConvsepTypeError(f"calibration_sequential={calibration_sequential!r} must be True or False")
    if isinstance(calibration_alternate, bool) or not isinstance(calibration_alternate, int) or calibration_alternate < 0:
        raise ConvsepValueError(
            f"calibration_alternate={calibration_alternate!r} must be an int >= 0 (rounds of depthwise + pointwise refits)"
        )
    if calibration_refit_kept is not None and not isinstance(calibration_refit_kept, bool):
        raise ConvsepTypeError(
            f"calibration_refit_kept={calibration_refit_kept!r} must be True, False or None (True in order)"
        )
    for name, value in (("calibration_alternate", calibration_alternate), ("calibration_refit_kept", calibration_refit_kept)):
        if value and (calibration_data is None or not refit):
            raise ConvsepValueError(f"{name}={value} needs calibration_data and refit=True: it shapes the refit")
    if calibration_refit_kept and not calibration_sequential:
        raise ConvsepValueError(
            "calibration_refit_kept=True needs calibration_sequential=True: fitted at once, every layer sees the "
            "original model's inputs, which the kept layers already fit"
        )
    if objective not in OBJECTIVES:
        raise ConvsepValueError(f"objective={objective!r} is not known: use one of {', '.join(map(repr, OBJECTIVES))}")
    if objective == "latency" and example_inputs is None:
        raise ConvsepValueError("objective='latency' needs example_inputs: the timings depend on the input shape")
    if objective == "latency" and budget is not None:
        raise ConvsepValueError(
            f"budget={budget} and objective='latency' cannot be combined: the latency pass reverts layers, "
            "which would break the budget; use one of them"
        )
    wants_report = verbose and example_inputs is not None
    # Calibration, the report and the latency pass compare against the original, which inplace changes.
    needs_original = wants_report or objective == "latency" or calibration_data is not None
    original = deepcopy_model(model) if inplace and needs_original else model
    work = model if inplace else deepcopy_model(model)

    found = discover(work)
    decisions, candidates = _consider_all(work, found, selection, parametrized=parametrized)
    selection.warn_unmatched()
    statistics = None
    # The pointwise weights are solved for, by calibration or by the joint fit: the allocation weighs what that leaves.
    solved = refit or init == "joint"
    # With init="joint" and nothing to refit after, the whitened factors serve the layers the joint fit cannot.
    whitened = init == "activation" or (allocate_by == "activations" and not solved) or (init == "joint" and not refit)
    refit_aware = allocate_by == "activations" and solved and budget is not None
    if candidates and (whitened or refit_aware or init == "joint"):
        with distributed.together():  # a user's generator may fail on one process only
            calibration_data = rereadable(calibration_data, calibration_batches)  # read twice: statistics, calibration
        if refit_aware:  # a budget never picks a rank that saves nothing (options_from_errors): predict only those,
            # which makes the largest system smaller (the factorisation costs its size cubed); a rank fixed by `ranks=`
            # may be any, so those layers get every rank.
            for candidate in candidates:
                if overrides.get(candidate.decision.name, None) is None:
                    c, k = candidate.conv, kernel_elements(candidate.conv.kernel_size)
                    candidate.refit_ranks = max(1, largest_saving_rank(c.out_channels, c.in_channels, k, c.groups))
        statistics = gather(work, candidates, calibration_data, calibration_batches, init, whitened, refit_aware)
        for candidate in candidates:
            candidate.refit_follows = refit
    budget_record = None
    if budget is None:
        for candidate in candidates:
            _assign_rank(candidate, overrides.get(candidate.decision.name, rank), init)
    else:
        budget_record = _assign_budget(work, candidates, overrides, init, budget, budget_on, example_inputs, allocate_by)
    overrides.warn_unmatched()
    chosen = [c for c in candidates if c.decision.converted]
    if objective == "latency":
        work = _faster_only(original, work, chosen, example_args(example_inputs), found, init)
    else:
        work = _apply(work, chosen, found, init)

    previous = plan_of(model)
    plan = ConversionPlan(
        rank=rank,
        init=init,
        path=_path_taken(found),
        untraceable=dict(found.untraceable),
        layers=(previous.converted if previous else []) + decisions,
        version=__version__,
        budget=budget_record,
        parametrized=parametrized,
        activations=statistics,
    )
    attach_plan(work, plan)
    log.info("%s", plan.summary())
    if calibration_data is not None and refit:
        work = calibrate(
            work, original, calibration_data, batches=calibration_batches, sequential=calibration_sequential,
            alternate=calibration_alternate, refit_kept=calibration_refit_kept, verbose=verbose,
        )  # fmt: skip
    if verbose:
        shown = report(original, work, example_inputs) if wants_report else plan.summary()
        if distributed.is_main():
            print(shown)
    return work


def rebuild(model: nn.Module, plan: ConversionPlan) -> nn.Module:
    """A copy of `model` with the architecture `plan` records: the same layers replaced at the same ranks.

    The pairs are freshly initialised (no SVD, since their weights are about to be loaded from a
    checkpoint); `model` itself is untouched. Layers whose weight is computed (weight norm) are
    folded, as convert folded them, whatever the plan's `parametrized` setting: the plan names
    only layers that were converted.
    """
    work = deepcopy_model(require_eager(model))
    wanted = {d.name: d for d in plan.converted}
    found = discover(work) if any(d.kind.startswith("F.") for d in wanted.values()) else Discovery()
    _, candidates = _consider_all(work, found, LayerFilter(include=list(wanted) or None), explicit_all=True)
    by_name = {c.decision.name: c for c in candidates}
    missing = [name for name in wanted if name not in by_name]
    if missing:
        raise ConvsepValueError(
            "the conversion plan names layers this model does not have as convertible convs: "
            f"{', '.join(missing[:5])}; was the checkpoint made from another architecture?"
        )
    chosen = []
    for name, recorded in wanted.items():
        candidate = by_name[name]
        candidate.decision = recorded
        chosen.append(candidate)
    work = _apply(work, chosen, found, init="random")
    attach_plan(work, plan)
    return work


def _consider_all(work, found, selection, explicit_all=False, parametrized="fold"):
    """A decision for every conv in the model, and the candidates among them that qualify."""
    decisions, candidates = [], []
    functional_weights = (parameter(work.get_submodule(site.owner), site.weight_target) for site in found.functional)
    weights_used_functionally = {id(p) for p in functional_weights if p is not None}
    for site in found.functional:
        decision, candidate = _consider_functional(work, site, selection)
        decisions.append(decision)
        candidates += [candidate] if candidate else []
    for name, module in conv_layers(work):
        if not is_candidate(module):
            continue
        decision, candidate = _consider_module(
            name, module, selection, weights_used_functionally, explicit_all, parametrized
        )
        decisions.append(decision)
        candidates += [candidate] if candidate else []
    return decisions, candidates


def _assign_rank(candidate: Candidate, spec: RankSpec, init: str) -> None:
    """Settle one candidate's rank, or record why converting it would not pay."""
    decision, conv = candidate.decision, candidate.conv
    needs_spectrum = init != "random" or isinstance(spec, float)  # an energy share is the kernel's energy
    S = candidate.spectrum().S if needs_spectrum else None
    r = resolve_rank(spec, S if S is not None else torch.empty(0, decision.full_rank))
    k = kernel_elements(conv.kernel_size)
    if spec != "full" and not saves_macs(conv.out_channels, conv.in_channels, k, conv.groups, r):
        decision.reason = (
            f"rank {r} would not save MACs here (the pair saves only below rank "
            f"{break_even_rank(conv.out_channels, conv.in_channels, k, conv.groups):.2f}); "
            "use rank='full' to convert anyway"
        )
        return
    _convert_at(candidate, r, init)


def _convert_at(candidate: Candidate, rank: int, init: str) -> None:
    decision = candidate.decision
    decision.converted = True
    decision.rank = rank
    _describe_factors(decision, candidate, candidate.factors(init))
    if candidate.refit_errors is not None:  # ... and what calibration's refit should leave of it
        decision.predicted_refit_error = candidate.refit_errors[min(rank, len(candidate.refit_errors)) - 1] ** 0.5


def _describe_factors(decision: LayerDecision, candidate: Candidate, factors: Optional[ChannelSVD]) -> None:
    """The pair's weight error at the decided rank, and for whitened factors the output error they should keep."""
    rank = decision.rank
    if factors is candidate.whitened and factors is not None:  # not the weights' best: measure its weight error
        decision.relative_error = truncation_error(candidate.kernel.weight, candidate.conv.groups, factors, rank)
        # the share of the output energy this pair should lose
        decision.predicted_output_error = discarded_energy_fraction(factors.S, rank) ** 0.5
    elif factors is not None:
        decision.relative_error = discarded_energy_fraction(factors.S, rank) ** 0.5


def _layer_costs(candidate: Candidate, budget_on: str, output_positions: dict[int, int]) -> tuple[int, int]:
    """(cost of the conv as it is, cost of its pair per unit of rank), biases left out (the same on both sides)."""
    conv = candidate.conv
    n, m, k, g = conv.out_channels, conv.in_channels, kernel_elements(conv.kernel_size), conv.groups
    if budget_on == "params":
        return conv_params(n, m, k, g, bias=False), separable_params(n, m, k, g, 1, bias=False)
    where = output_positions.get(id(candidate), 0)
    return conv_macs(n, m, k, g, where), separable_macs(n, m, k, g, 1, where)


def _measure_positions(work: nn.Module, example_inputs: Any, candidates: list[Candidate]) -> tuple[int, dict[int, int]]:
    """Whole-model MACs, and each candidate's output positions over all its calls, from one pass on example_inputs."""
    modules = [c.conv for c in candidates if c.site is None]
    weights = [c.conv.weight for c in candidates if c.site is not None]  # functional convs: known by their weight
    measured = probe(work, example_args(example_inputs), modules, weights)
    found = {}
    for candidate in candidates:
        key = id(candidate.conv) if candidate.site is None else id(candidate.conv.weight)
        dims = len(candidate.conv.kernel_size)
        found[id(candidate)] = sum(positions(call.output_shape, dims) for call in measured.calls.get(key, []))
    return measured.flops // 2, found


def _assign_budget(work, candidates, overrides, init, budget, budget_on, example_inputs, allocate_by) -> dict:
    """Ranks (or keep) for every candidate so that the whole model costs at most `budget` of what it costs now.

    Everything that is not a free candidate (other layers, convs left out by selection, layers
    with a rank override) counts at the cost it will have; the rest is allocated by budget.py.
    """
    if budget_on == "macs":
        total, where = _measure_positions(work, example_inputs, candidates)
    else:
        total, where = sum(p.numel() for p in work.parameters()), {}
    free, options, others = [], [], total
    for candidate in candidates:
        keep_cost, per_rank = _layer_costs(candidate, budget_on, where)
        spec = overrides.get(candidate.decision.name, None)
        if spec is not None:
            _assign_rank(candidate, spec, init)
            if candidate.decision.converted:
                others -= keep_cost - candidate.decision.rank * per_rank
            continue
        others -= keep_cost
        free.append(candidate)
        options.append(options_from_errors(candidate.allocation_errors(allocate_by), keep_cost, per_rank))
    what = "MACs" if budget_on == "macs" else "params"
    available = budget * total - others
    if total == 0 or cheapest_cost(options) > available:
        smallest = (others + cheapest_cost(options)) / total if total else 1.0
        raise ConvsepValueError(
            f"budget={budget} cannot be met: with every convertible layer at its cheapest (rank 1 where that "
            f"saves {what}) the model keeps {smallest:.2%} of its {what}, so the smallest reachable budget is "
            f"{math.ceil(smallest * 10_000) / 10_000:.4f}; layers left out by include/exclude or fixed by ranks= "
            "count at their own cost"
        )
    allocation = allocate(options, available)
    for candidate, layer, choice in zip(free, options, allocation.choices):
        if choice is not None:
            _convert_at(candidate, choice, init)
        elif not layer.rank_costs:
            conv = candidate.conv
            k = kernel_elements(conv.kernel_size)
            candidate.decision.reason = (
                f"no rank saves {what} here (the pair saves only below rank "
                f"{break_even_rank(conv.out_channels, conv.in_channels, k, conv.groups):.2f})"
                if layer.keep_cost
                else "it did not run on example_inputs, so converting it saves no MACs"
            )
        else:
            candidate.decision.reason = f"budget={budget} of {what} is spent with less error on other layers"
    converted = [c for c in candidates if c.decision.converted]
    return {
        "fraction": budget,
        "on": budget_on,
        "original": total,
        "reached": (others + allocation.cost) / total,
        "objective": "sum over layers of squared relative " + _objective(allocate_by, candidates),
        "allocated_by": allocate_by,
        "error": sum(c.allocation_errors(allocate_by)[c.decision.rank - 1] for c in converted),
    }


def _objective(allocate_by: str, candidates: list[Candidate]) -> str:
    if allocate_by == "weights":
        return "weight error"
    if any(c.refit_errors is not None for c in candidates):
        return "output error after calibration's refit (predicted from the inputs)"
    return "output error (predicted from the inputs)"


def _path_taken(found) -> str:
    """"fx": traced whole; "fx+module-tree": traced in parts; "module-tree": fx traced nothing."""
    if "" in found.traced and not found.untraceable:
        return "fx"
    return "fx+module-tree" if found.traced else "module-tree"


def _undecided(name: str, kind: str, conv: _ConvNd) -> LayerDecision:
    """The decision for a conv before it is considered: not converted, with its shape recorded."""
    return LayerDecision(
        name=name,
        kind=kind,
        converted=False,
        module=name,
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=tuple(conv.kernel_size),
        groups=conv.groups,
        bias=conv.bias is not None,
    )


def _consider_module(name, module, selection, weights_used_functionally, explicit_all=False, parametrized="fold"):
    explicit_reason, explicit = selection.why_not(name, module)
    decision = _undecided(name, type(module).__name__, module)
    reason = explicit_reason or layer_why_not(module, explicit or explicit_all, parametrized)
    computed_by = parametrization(module)  # then its weight is computed anew on each read: no functional conv uses it
    if reason is None and not computed_by and id(module.weight) in weights_used_functionally:
        reason = "its weight is also used by a functional conv elsewhere"
    decision, candidate = _qualify(decision, module, reason)
    if candidate and computed_by:
        candidate.folded = folded_conv(module)
        decision.folded = computed_by
    return decision, candidate


def _consider_functional(root, site: FunctionalConv, selection):
    owner = root.get_submodule(site.owner)
    weight = parameter(owner, site.weight_target)
    bias = parameter(owner, site.bias_target)
    name = _qualified(site.owner, site.weight_target or site.node.name)
    kind = f"F.conv{site.dims}d"
    constants = {k: v for k, v in site.args.items() if k not in ("input", "weight", "bias")}
    dynamic = [k for k, v in constants.items() if isinstance(v, torch.fx.Node)]
    if weight is None or dynamic or (site.args.get("bias") is not None and bias is None):
        if weight is None:
            why = "weight is computed in forward, not a parameter"
        elif dynamic:
            why = f"{', '.join(dynamic)} computed in forward"
        else:
            why = "bias is computed in forward, not a parameter"
        return LayerDecision(name=name, kind=kind, converted=False, reason=why, module=name), None
    conv = _stand_in(weight, bias, constants)
    decision = _undecided(name, kind, conv)
    decision.module = _qualified(site.owner, site.weight_target + "_separable")
    reason, _ = selection.why_not(name, conv)
    if isinstance(owner.get_submodule(site.weight_target.rpartition(".")[0]), _ConvNd):
        reason = reason or "its weight belongs to a conv module, which is considered on its own"
    reason = reason or conv_why_not(conv.in_channels, conv.kernel_size, conv.groups)
    decision, candidate = _qualify(decision, conv, reason)
    if candidate:
        candidate.site = site
    return decision, candidate


def _qualify(decision: LayerDecision, conv: _ConvNd, reason: Optional[str]):
    if reason:
        decision.reason = reason
        return decision, None
    weight_shape = (conv.out_channels, conv.in_channels // conv.groups, *conv.kernel_size)  # not conv.weight: it may be computed
    decision.full_rank = full_rank(weight_shape, conv.groups)
    return decision, Candidate(decision, conv)


def _stand_in(weight: nn.Parameter, bias: Optional[nn.Parameter], constants: dict) -> _ConvNd:
    """A conv module that computes what the functional call computes, sharing its parameters."""
    settings = ("stride", "padding", "dilation", "groups")
    return plain_conv(weight, bias, **{k: constants[k] for k in settings if k in constants})


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _apply(root: nn.Module, chosen: list[Candidate], found, init: str) -> nn.Module:
    """Build every pair, rewrite graphs for functional convs, then swap module convs in the tree."""
    swaps: dict[int, nn.Module] = {}
    by_owner: dict[str, dict] = {}
    for candidate in chosen:
        conv, site = candidate.conv, candidate.site
        candidate.pair = candidate.build_pair(candidate.factors(init))
        if candidate.moments is not None:
            candidate.fit_on_moments()  # may build the pair anew
        pair = candidate.pair
        if site is None:
            swaps[id(conv)] = pair
        else:
            by_owner.setdefault(site.owner, {})[site.node] = (site.weight_target + "_separable", pair)
    for owner, replacements in by_owner.items():
        module = root.get_submodule(owner)
        gm = rewrite(module, found.graphs[owner], replacements)
        if owner == "":
            root = gm
        else:
            swaps[id(module)] = gm
    return _swap(root, swaps)


def _faster_only(original: nn.Module, work: nn.Module, chosen: list[Candidate], args, found, init: str) -> nn.Module:
    """objective='latency': apply only the pairs measured faster, then revert until the whole model is faster."""
    for candidate in chosen:
        if candidate.site is not None:
            candidate.decision.converted = False
            candidate.decision.reason = "objective='latency' times module convs only; this functional conv stays"
    chosen = [c for c in chosen if c.site is None]

    # Timings differ from process to process: under torchrun rank 0 measures and decides for all, so
    # that every process builds the same model.
    with distributed.together():
        if distributed.is_main():
            work = _measured_faster(original, work, chosen, args, found, init)
    for candidate in chosen:
        if not candidate.decision.converted:  # kept for speed: no pair, so no error of one, nor a fit
            decision = candidate.decision
            decision.relative_error = decision.predicted_output_error = decision.predicted_refit_error = None
            decision.joint_fit = ""
    decided = distributed.broadcast_object([_latency_decision(c.decision) for c in chosen])
    if not distributed.is_main():
        for candidate, decision in zip(chosen, decided):
            (candidate.decision.converted, candidate.decision.reason, candidate.decision.relative_error,
             candidate.decision.predicted_output_error, candidate.decision.predicted_refit_error,
             candidate.decision.joint_fit) = decision  # fmt: skip
        work = _apply(work, [c for c in chosen if c.decision.converted], found, init)
    # Rank 0 drew random numbers for its timing inputs that the others did not: make the pairs agree.
    for candidate in chosen:
        if candidate.decision.converted and distributed.active():
            distributed.broadcast_module(candidate.pair)
    return work


def _latency_decision(decision: LayerDecision) -> tuple:
    return (decision.converted, decision.reason, decision.relative_error, decision.predicted_output_error,
            decision.predicted_refit_error, decision.joint_fit)  # fmt: skip


def _measured_faster(original: nn.Module, work: nn.Module, chosen: list[Candidate], args, found, init: str) -> nn.Module:
    # The timing pairs have the shapes and cost of the real ones; their weights do not matter.
    gains = drop_slower_pairs(chosen, work, args, Candidate.build_pair, LATENCY_RUNS, LATENCY_MARGIN)
    chosen = [c for c in chosen if c.decision.converted]
    work = _apply(work, chosen, found, init)
    least_gain_first = sorted(chosen, key=lambda c: gains[id(c)])
    while least_gain_first:
        before, after = model_seconds(original, work, args, LATENCY_RUNS)
        if after < before:
            break
        candidate = least_gain_first.pop(0)
        work = _swap(work, {id(candidate.pair): candidate.conv})
        candidate.decision.converted = False
        candidate.decision.relative_error = None
        candidate.decision.reason = (
            f"kept for speed: with it converted the whole model took {after * 1e3:.2f} ms "
            f"against {before * 1e3:.2f} ms for the original"
        )
    return work


def _swap(root: nn.Module, swaps: dict[int, nn.Module]) -> nn.Module:
    """Replace modules by identity wherever they are referenced, so shared modules stay shared."""
    if not swaps:
        return root
    if id(root) in swaps:
        return swaps[id(root)]
    for parent in root.modules():
        for child_name, child in parent._modules.items():
            if child is not None and id(child) in swaps:
                parent._modules[child_name] = swaps[id(child)]
    return root


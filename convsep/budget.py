"""Rank allocation under a cost budget: pure maths over per-layer spectra and costs.

Each layer may be kept as it is (its original cost, no error) or converted at a rank r
(a cost linear in r, an error set by its singular values). `allocate` picks one option
per layer so that the summed cost stays within what is available and the summed error
is as small as it can find.

The error of a layer converted at rank r is its squared relative weight error
    e(r) = ||W - W_r||_F^2 / ||W||_F^2 = (energy of the discarded singular values) / (total energy),
and the objective is the plain sum of e over layers. Why this weighting: a relative weight
error in one layer becomes, to first order, a relative output error of about the same size
in that layer (whatever its scale: the layers after a conv, BatchNorm in particular, see
relative changes), and independent perturbations from different layers add in variance
at the output, so the sum of squared relative errors estimates the whole model's relative
output MSE. Weighting by a layer's cost would mix up what a layer saves (the constraint)
with how much its error hurts (the objective); the allocation already trades one against
the other. The sum is additive over singular values, so one more rank in layer l lowers
the objective by exactly that rank's share of the layer's energy.

`allocate` takes the better of two answers to this multiple-choice knapsack:
- `greedy`, the classic one: per layer, the lower convex hull of its (cost, error) options;
  all hull segments sorted by error removed per unit of cost; take each segment that still
  fits, in that order; then spend what is left on any single-layer move that fits and lowers
  the error most. Its error is at most the optimum plus the gain of one hull segment (the one
  the continuous relaxation would take in part), but "keep" (error 0 at full cost) often lies
  off the hull, and there greedy can miss by more than rounding.
- `rounded_optimum`, a dynamic programme over layers with every cost rounded up to a multiple
  of available / 4096: exact for the rounded costs, always within budget, and off the true
  optimum only by the budget the rounding wastes (under one step per layer). Layers x options
  x 4096 vectorised steps: milliseconds even for a ResNet-50.
`brute_force` is the exact answer for small models, to measure both against.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

KEEP = None  # the choice "leave this layer as it is"


@dataclass(frozen=True)
class LayerOptions:
    """What one layer may become: kept (cost `keep_cost`, no error) or converted at rank r.

    rank_costs[r - 1] and rank_errors[r - 1] are the cost and error at rank r; only ranks that
    cost less than keeping the layer are worth listing.
    """

    keep_cost: float
    rank_costs: tuple[float, ...] = ()
    rank_errors: tuple[float, ...] = ()

    def choices(self) -> list[tuple[float, float, Optional[int]]]:
        """(cost, error, rank or KEEP) for every option."""
        ranked = [(c, e, r) for r, (c, e) in enumerate(zip(self.rank_costs, self.rank_errors), start=1)]
        return [(self.keep_cost, 0.0, KEEP)] + ranked

    def cost_of(self, choice: Optional[int]) -> float:
        return self.keep_cost if choice is KEEP else self.rank_costs[choice - 1]

    def error_of(self, choice: Optional[int]) -> float:
        return 0.0 if choice is KEEP else self.rank_errors[choice - 1]


def options_from_spectrum(S: torch.Tensor, keep_cost: float, cost_per_rank: float) -> LayerOptions:
    """Options of a layer whose channels have singular values S (M, q) and whose pair costs r * cost_per_rank.

    error(r) is the squared relative weight error, the share of energy in the singular values beyond r.
    """
    return options_from_errors(spectrum_errors(S), keep_cost, cost_per_rank)


def spectrum_errors(S: torch.Tensor) -> list[float]:
    """Squared relative error at ranks 1..q when every channel (row of S) keeps its r largest values."""
    energy = S.detach().double().square().sum(dim=0)  # (q,): what the j-th value of every channel holds
    total = float(energy.sum())
    kept_share = (energy.cumsum(0) / total).tolist() if total > 0 else [1.0] * energy.numel()
    return [max(0.0, 1.0 - share) for share in kept_share]


def options_from_errors(errors: Sequence[float], keep_cost: float, cost_per_rank: float) -> LayerOptions:
    """Options of a layer with error errors[r - 1] at rank r: the ranks that cost less than keeping it."""
    costs, kept = [], []
    for r, error in enumerate(errors, start=1):
        cost = r * cost_per_rank
        if cost >= keep_cost:
            break
        costs.append(cost)
        kept.append(error)
    return LayerOptions(keep_cost, tuple(costs), tuple(kept))


@dataclass
class Allocation:
    choices: list[Optional[int]]  # per layer: a rank, or KEEP (None)
    cost: float
    error: float


def cheapest_cost(layers: Sequence[LayerOptions]) -> float:
    """The least the layers can cost together (each at its cheapest option)."""
    return sum(min(c for c, _, _ in layer.choices()) for layer in layers)


def _summarise(layers: Sequence[LayerOptions], choices: list[Optional[int]]) -> Allocation:
    cost = sum(layer.cost_of(c) for layer, c in zip(layers, choices))
    error = sum(layer.error_of(c) for layer, c in zip(layers, choices))
    return Allocation(choices, cost, error)


def _lower_hull(choices: list[tuple[float, float, Optional[int]]]) -> list[tuple[float, float, Optional[int]]]:
    """The options on the lower convex hull of (cost, error), from the cheapest to the most accurate."""
    # Cheapest first; among equal costs the most accurate; then drop what a cheaper option beats.
    ordered = sorted(choices, key=lambda option: (option[0], option[1]))
    frontier: list[tuple[float, float, Optional[int]]] = []
    for option in ordered:
        if not frontier or option[1] < frontier[-1][1]:
            frontier.append(option)
    hull: list[tuple[float, float, Optional[int]]] = []
    for option in frontier:
        # Pop the last point while it lies on or above the segment from its predecessor to `option`.
        while len(hull) >= 2:
            (c0, e0, _), (c1, e1, _) = hull[-2], hull[-1]
            if (e1 - e0) * (option[0] - c0) >= (option[1] - e0) * (c1 - c0):
                hull.pop()
            else:
                break
        hull.append(option)
    return hull


def allocate(layers: Sequence[LayerOptions], available: float, resolution: int = 4096) -> Allocation:
    """One choice per layer: total cost <= available, total error as low as it finds.

    The better of the greedy (`greedy`) and of a dynamic programme over costs rounded up to
    `available / resolution` (`rounded_optimum`). Raises ValueError if even the cheapest option
    of every layer does not fit.
    """
    found = greedy(layers, available)
    rounded = rounded_optimum(layers, available, resolution)
    return rounded if rounded is not None and rounded.error < found.error else found


def greedy(layers: Sequence[LayerOptions], available: float) -> Allocation:
    """Hull segments by error removed per unit of cost, then the leftover on the best single moves."""
    hulls = [_lower_hull(layer.choices()) for layer in layers]
    position = [0] * len(layers)
    spent = sum(hull[0][0] for hull in hulls)
    if spent > available:
        raise ValueError(f"the cheapest options cost {spent:g}, more than the {available:g} available")
    segments = []
    for index, hull in enumerate(hulls):
        for step in range(len(hull) - 1):
            (c0, e0, _), (c1, e1, _) = hull[step], hull[step + 1]
            segments.append(((e0 - e1) / (c1 - c0), index, step))
    # Most error removed per unit of cost first; a layer's own segments stay in order (convexity).
    segments.sort(key=lambda segment: (-segment[0], segment[1], segment[2]))
    for _, index, step in segments:
        if position[index] != step:
            continue  # an earlier segment of this layer did not fit, so this one cannot follow it
        extra = hulls[index][step + 1][0] - hulls[index][step][0]
        if spent + extra <= available:
            position[index] = step + 1
            spent += extra
    choices = [hull[p][2] for hull, p in zip(hulls, position)]
    return _spend_leftover(layers, choices, available)


def _spend_leftover(layers: Sequence[LayerOptions], choices: list[Optional[int]], available: float) -> Allocation:
    """Move one layer at a time to whichever option (hull or not) lowers the error most and still fits."""
    current = _summarise(layers, choices)
    while True:
        best = None
        for index, layer in enumerate(layers):
            now_cost, now_error = layer.cost_of(choices[index]), layer.error_of(choices[index])
            for cost, error, choice in layer.choices():
                gain = now_error - error
                if gain > 0 and current.cost - now_cost + cost <= available and (best is None or gain > best[0]):
                    best = (gain, index, choice)
        if best is None:
            return current
        choices[best[1]] = best[2]
        current = _summarise(layers, choices)


def rounded_optimum(layers: Sequence[LayerOptions], available: float, resolution: int = 4096) -> Optional[Allocation]:
    """The exact optimum once every cost is rounded up to a multiple of available / resolution.

    Rounding up keeps the answer within budget; it can only miss the true optimum by the budget
    the rounding wastes (less than one step per layer). None when nothing fits after rounding.
    """
    if available <= 0 or not layers:
        return None
    step = available / resolution
    inf = float("inf")
    best = torch.full((resolution + 1,), inf, dtype=torch.float64)  # best[b]: least error using exactly b steps
    best[0] = 0.0
    picks = []
    for layer in layers:
        options = layer.choices()
        new = torch.full_like(best, inf)
        pick = torch.full((resolution + 1,), -1, dtype=torch.int64)
        for index, (cost, error, _) in enumerate(options):
            steps = math.ceil(cost / step - 1e-9) if cost > 0 else 0
            if steps > resolution:
                continue
            candidate = torch.full_like(best, inf)
            candidate[steps:] = best[: resolution + 1 - steps] + error
            better = candidate < new
            new = torch.where(better, candidate, new)
            pick = torch.where(better, torch.full_like(pick, index), pick)
        picks.append((pick, options))
        best = new
    if not torch.isfinite(best).any():
        return None
    used = int(torch.argmin(best))
    choices: list[Optional[int]] = []
    for pick, options in reversed(picks):
        index = int(pick[used])
        cost = options[index][0]
        used -= math.ceil(cost / step - 1e-9) if cost > 0 else 0
        choices.append(options[index][2])
    return _summarise(layers, choices[::-1])


def brute_force(layers: Sequence[LayerOptions], available: float, limit: int = 2_000_000) -> Allocation:
    """The exact optimum by trying every combination (for measuring the greedy on small models)."""
    options = [layer.choices() for layer in layers]
    combinations = math.prod(len(o) for o in options)
    if combinations > limit:
        raise ValueError(f"{combinations} combinations is more than the limit of {limit}")
    best: Optional[tuple[float, float, tuple]] = None
    for combination in itertools.product(*options):
        cost = sum(option[0] for option in combination)
        if cost > available:
            continue
        error = sum(option[1] for option in combination)
        if best is None or (error, cost) < (best[0], best[1]):
            best = (error, cost, combination)
    if best is None:
        raise ValueError(f"no combination fits in {available:g}")
    return _summarise(layers, [option[2] for option in best[2]])

"""The least squares that calibration solves for one pair, from sums over the data.

The SVD init minimises the error of the weights; what matters is the error of the
outputs on real inputs. With the depthwise filters fixed, a pair's output is linear in
its pointwise weights, so the pointwise weights (and bias) that best reproduce the
original layer's outputs are a least-squares solution: accumulate X^T X and X^T Y over
the calibration batches (X: the depthwise outputs, Y: the original outputs), then solve
one small system per group (the pointwise conv is block-diagonal across groups).
Optionally the depthwise filters are refitted the same way with the pointwise weights
fixed, alternating; every step lowers the layer's output error on the calibration data.
A kept nn.Linear or conv is refitted as the pointwise half of a pair (kept.py).

The ridge term pulls towards the current weights (the SVD init at first), not towards
zero: with little data, or directions the data never excites, the fit stays where the
closed form put it. Its strength is `ridge` times the mean diagonal of the system's
Gram matrix, so it does not depend on the scale of the activations.

Which inputs the sums are taken over, in which order the layers are fitted, and how the
processes of a distributed job agree: calibrate.py.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import distributed
from .activations import patches
from .errors import ConvsepValueError
from .kept import KeptLayer
from .layers import _SeparableConvNd
from .warn import warn_user

# Above this many unknowns per group the depthwise refit's normal matrix gets too large (4096^2 float64 = 134 MB).
MAX_DEPTHWISE_UNKNOWNS = 4096
# Feature elements handled at once while accumulating, to bound memory on large activations.
_CHUNK_ELEMENTS = 1 << 22
# The patch sums are taken at every s-th position when the data has this many positions per column of the sums
# to spare (see LayerStats.sampling_step).
ROWS_PER_COLUMN = 64


class LayerStats:
    """Sums over the calibration data that determine the least-squares fits of one pair.

    features: the depthwise outputs (pointwise refit only), or the depthwise conv's input
    patches (for alternating: the depthwise outputs are linear in them, so both refits
    follow from the same sums without another pass over the data). Per group g:
    gram = sum F F^T, cross = sum F Y^T, feature_sum = sum F, target_sum = sum Y.

    The patch sums cost (M/g K)^2 per position and group, about K times the conv itself (a 3x3 conv: 9x). When the
    data holds many more positions than they need, they are taken at every s-th output position only, each call
    starting one further on (see sampling_step); `batches`, the batches per pass, tells how many there will be.
    """

    def __init__(self, pair: _SeparableConvNd, patches: bool, on_original_inputs: bool = False,
                 batches: Optional[int] = None) -> None:  # fmt: skip
        self.pair, self.patches, self.batches = pair, patches, batches
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
        self.count = 0  # output positions summed over (samples x positions, sampled)
        self.target_energy = 0.0  # sum of Y^2 over those positions
        self.all_target_energy = 0.0  # ... and over every position (what initial_error is relative to)
        self.calls = 0
        # sum of (pair(X_original) - Y)^2 before the refit; None when X is X_original (the fit's own "before")
        self.initial_error: Optional[float] = None if on_original_inputs else 0.0

    def sampling_step(self, positions: int) -> int:
        """Every how many output positions a call of `positions` (samples x positions) is summed over: 1 unless the
        patches are summed and every pass brings more than ROWS_PER_COLUMN positions per column of the sums; then as
        sparsely as that allows, but no sparser than needed to bring their cost to about the conv's."""
        if not self.patches or not self.batches:
            return 1
        width = self.gram.shape[-1]
        by_data = positions * self.batches // (ROWS_PER_COLUMN * width)
        by_cost = math.ceil(self.groups * width / self.pair.out_channels)
        return max(1, min(by_data, by_cost))

    def _features(self, x: Tensor, every: int, phase: int) -> Tensor:
        # The depthwise outputs, or every input channel's patches at the depthwise conv's output positions
        # (positions possibly flattened: only their count and order matter here).
        return patches(x, self.pair.depthwise, every, phase) if self.patches else self.pair.depthwise(x)

    def add(self, x: Tensor, y: Tensor, name: str) -> None:
        if isinstance(self.pair, KeptLayer):
            x, y = self.pair.arrange(x, y)
        elif x.dim() == self.pair.depthwise.weight.dim() - 1:  # an unbatched call
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        per_sample = x[:1].numel() * (self.kernel if self.patches else self.pair.rank)
        step = max(1, _CHUNK_ELEMENTS // max(per_sample, 1))
        energy = float(y.detach().float().square().sum(dtype=torch.float64))  # float(): half precision would overflow
        self.all_target_energy += energy
        # Along the last dimension, within the row (as patches() reads it): a step past the row's end takes one
        # position per row, so the phases rotate over the row.
        every = min(self.sampling_step(y.numel() // max(y.shape[1], 1)), max(y.shape[-1], 1))
        phase = self.calls % every
        self.calls += 1
        for start in range(0, x.shape[0], step):
            features = self._features(x[start : start + step], every, phase)
            target = y[start : start + step]
            sampled = target if every == 1 else target[..., phase::every]
            # Each sampled position stands for the ones skipped in its call: calls of other sizes (a smaller last
            # batch, a shared layer on two scales) weigh in by their positions, as without sampling.
            weight = target[0, 0].numel() / max(sampled[0, 0].numel(), 1)
            target = sampled
            if features[0, 0].numel() != target[0, 0].numel() or target.shape[1] != self.pair.out_channels:
                raise ConvsepValueError(
                    f"layer {name!r}: the original layer's outputs {tuple(target.shape)} do not match the pair's "
                    f"{self.pair.out_channels} channels at {features[0, 0].numel()} positions"
                )
            # Products in the model's dtype (float32 sums over one chunk are accurate enough and twice
            # as fast as float64), accumulated over chunks and batches in float64.
            f = _by_group(features.detach(), self.groups)  # (groups, features per group, positions)
            t = _by_group(target.detach().to(f.dtype), self.groups)
            self.gram += torch.bmm(f, f.transpose(1, 2)).double() * weight
            self.cross += torch.bmm(f, t.transpose(1, 2)).double() * weight
            self.feature_sum += f.sum(dim=2).double() * weight
            self.target_sum += t.sum(dim=2).double() * weight
            self.count += round(f.shape[-1] * weight)
            if every > 1:  # else the call's energy, summed once above
                self.target_energy += float(t.square().sum(dtype=torch.float64)) * weight
        if every == 1:
            self.target_energy += energy

    def finite(self) -> bool:
        """Whether every sum is finite: one NaN or inf in the data poisons them all, and then the fit."""
        sums = (self.gram, self.cross, self.feature_sum, self.target_sum)
        return math.isfinite(self.target_energy) and all(bool(torch.isfinite(t).all()) for t in sums)

    def sum_over_processes(self) -> None:
        """Add up the sums of every process of a distributed job (nothing to do in one process)."""
        if not distributed.active():
            return
        scalars = torch.tensor(
            [self.count, self.target_energy, self.initial_error or 0.0, self.all_target_energy],
            dtype=torch.float64, device=self.gram.device,
        )  # fmt: skip
        distributed.all_sum([self.gram, self.cross, self.feature_sum, self.target_sum, scalars])
        self.count, self.target_energy, self.all_target_energy = int(scalars[0]), float(scalars[1]), float(scalars[3])
        if self.initial_error is not None:
            self.initial_error = float(scalars[2])


def _by_group(x: Tensor, groups: int) -> Tensor:
    """(batch, channels, *positions) -> (groups, channels per group, batch x positions)."""
    return (
        x.reshape(x.shape[0], groups, x.shape[1] // groups, -1)
        .permute(1, 2, 0, 3)
        .reshape(groups, x.shape[1] // groups, -1)
    )


def _depthwise_factors(pair: _SeparableConvNd) -> Tensor:
    """The depthwise filters as (groups, in per group, rank, kernel elements), in float64."""
    g, r = pair.groups, pair.rank
    return pair.depthwise.weight.detach().double().reshape(g, pair.in_channels // g, r, -1)


def _pointwise_system(pair: _SeparableConvNd, stats: LayerStats) -> tuple[Tensor, Tensor, Tensor]:
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
    system, right = a + lam * eye, b + lam * current
    # A sum of outer products plus the ridge is positive definite: Cholesky costs half of LU. Rounding can still
    # defeat it on a nearly singular system (ridge=0, an input the data never excites): LU then.
    factor, info = torch.linalg.cholesky_ex(system)
    if bool((info > 0).any()):
        return torch.linalg.solve(system, right)
    return torch.cholesky_solve(right, factor)


def _residual(a: Tensor, b: Tensor, theta: Tensor, stats: LayerStats) -> float:
    """Relative output error ||Y_hat - Y|| / ||Y|| on the data, from the sums alone."""
    squared = stats.target_energy - 2 * float((theta * b).sum()) + float((theta * (a @ theta)).sum())
    return relative_error(squared, stats.target_energy)


def relative_error(squared_error: float, energy: float) -> float:
    """sqrt(squared error / energy of the target); a target that is zero everywhere (a pruned layer) is met
    exactly by zero outputs (0.0) and missed infinitely by any other."""
    squared_error = max(squared_error, 0.0)  # from sums, rounding can take an exact fit below zero
    if energy > 0:
        return math.sqrt(squared_error / energy)
    return 0.0 if squared_error == 0 else math.inf


def _refit_pointwise(pair: _SeparableConvNd, stats: LayerStats, ridge: float) -> tuple[float, float]:
    a, b, current = _pointwise_system(pair, stats)
    # Inputs per output: the pair's depthwise outputs, or a kept layer's features.
    width = pair.pointwise.weight[0].numel()
    theta = _ridge_solve(a, b, current, ridge, width)
    with torch.no_grad():
        weight = pair.pointwise.weight
        weight.copy_(theta[:, :width].transpose(1, 2).reshape(weight.shape))
        if pair.pointwise.bias is not None:
            pair.pointwise.bias.copy_(theta[:, width].reshape(-1))
    return _residual(a, b, current, stats), _residual(a, b, theta, stats)


def _refit_depthwise(pair: _SeparableConvNd, stats: LayerStats, ridge: float) -> None:
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


def alternate_round(pair: _SeparableConvNd, stats: LayerStats, ridge: float) -> float:
    """One round of alternation: the depthwise filters, then the pointwise weights; the relative error after."""
    _refit_depthwise(pair, stats, ridge)
    return _refit_pointwise(pair, stats, ridge)[1]


def depthwise_unknowns(pair: _SeparableConvNd) -> int:
    """The unknowns per group of a pair's depthwise refit: its filters' weights."""
    return pair.in_channels // pair.groups * pair.rank * math.prod(pair.kernel_size)


def refits_depthwise(pair: _SeparableConvNd, alternate: int) -> bool:
    """Whether `fit` will refit the pair's depthwise filters, and so needs the patch sums (the costly ones)."""
    return alternate > 0 and depthwise_unknowns(pair) <= MAX_DEPTHWISE_UNKNOWNS


def fit(pair: _SeparableConvNd, stats: LayerStats, ridge: float, alternate: int, name: str) -> tuple[float, float]:
    """Pointwise refit, then `alternate` rounds of depthwise + pointwise; (error before, error after)."""
    if stats.count == 0:
        return float("nan"), float("nan")
    if not stats.finite():
        raise ConvsepValueError(
            f"calibrating {name!r}: its inputs or the original layer's outputs on the calibration data hold NaN or "
            "inf, so its fit would be NaN: the layer was left as it was. Look for NaN/inf in the calibration data"
        )
    before, after = _refit_pointwise(pair, stats, ridge)
    if alternate and not refits_depthwise(pair, alternate):
        warn_user(
            f"layer {name!r}: refitting its depthwise filters means {depthwise_unknowns(pair)} unknowns per group "
            f"(more than {MAX_DEPTHWISE_UNKNOWNS}); only its pointwise weights were refitted",
        )
        return before, after
    for _ in range(alternate):
        after = alternate_round(pair, stats, ridge)
    return before, after

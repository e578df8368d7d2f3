"""A pair's depthwise filters and pointwise weights fitted together on its original layer's input moments.

Calibration refits the pointwise weights on the converted model's inputs and keeps the depthwise
filters the SVD gave; `alternate=` refits those too, but its patch sums cost about K forwards of
the conv per round of data. The refit-aware allocation has already gathered, in one pass of the
original model, the very sums that least squares needs: the conv computes y = W x + b from its
patches x, so over the sampled positions

    sum x x^T = S,   sum x = f,   sum x y^T = S W^T + f b^T,   sum y = W f + n b,
    sum ||y||^2 = tr(W S W^T) + 2 b.W f + n ||b||^2

and calibration's alternating least squares (least_squares.fit: pointwise refit, then rounds of
depthwise + pointwise) runs on them without another pass over the data. Starting from the weight
SVD, each step lowers the layer's output error on the original inputs, so the pair leaves
calibration better filters to refit its pointwise weights on (in order, on the converted model's
inputs, as before).

It needs the whole cross-channel moment of each group (block = the group's channels) and at most
least_squares.MAX_DEPTHWISE_UNKNOWNS filter weights per group; other layers keep the SVD pair, with
the reason.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.nn.modules.conv import _ConvNd

from .activations import InputMoments, sampling_step
from .count import conv_macs_per_position, kernel_elements
from .layers import _SeparableConvNd
from .least_squares import MAX_DEPTHWISE_UNKNOWNS, LayerStats, alternate_round, depthwise_unknowns, fit

# Rounds of (depthwise, pointwise) refits on the moments. Alternating least squares creeps: on small_cnn 32 rounds
# recovered 0.13-0.28 points more than 8 after calibration (a one-off run of calibrate(sequential=False, alternate=)
# on three trainings), so it runs until a round lowers the relative output error by less than JOINT_TOLERANCE, at
# most JOINT_ROUNDS, and no more rounds than cost about the conv itself over the data (rounds_affordable): a round's
# solve is the same whatever the data, so on a few small images a 3,456-unknown system costs many forwards (ResNet-18
# on 128 images of 64x64, in a one-off timing: 90 forwards of the original for 32 rounds).
JOINT_ROUNDS = 32
JOINT_TOLERANCE = 1e-3
EXACT = 1e-6  # a relative output error below this is rounding (a pair at full rank): no round can gain anything
SAMPLES_PER_COLUMN = 4  # the fewest sampled patches per column of a group's moments that the fit trusts (as kept.py)
JOINT_RIDGE = 1e-3  # calibrate's default: the pull towards the current weights, relative to each system's diagonal


def moment_stats(pair: _SeparableConvNd, weight: Tensor, bias: Optional[Tensor], moments: InputMoments) -> LayerStats:
    """The sums calibration's least squares reads (with patches), for the outputs y = W x + b of the conv whose
    input `moments` these are: taken from them, not from a pass over the data."""
    stats = LayerStats(pair, patches=True)
    moments.flush()  # rows not yet summed (a layer that saw few positions) are summed now
    second, first = moments.sums()
    g = pair.groups
    w = weight.detach().double().reshape(g, weight.shape[0] // g, -1)  # (g, N/g, M/g K): channel-major, then tap
    f = first.reshape(g, -1)
    stats.gram.copy_(second.reshape(stats.gram.shape))  # one block per group
    torch.bmm(stats.gram, w.mT, out=stats.cross)
    stats.feature_sum.copy_(f)
    stats.target_sum.copy_((w @ f.unsqueeze(-1)).squeeze(-1))
    stats.count = moments.count
    energy = float((w.mT * stats.cross).sum())
    if bias is not None:
        b = bias.detach().double().reshape(g, -1)
        stats.cross += f.unsqueeze(-1) * b.unsqueeze(1)
        energy += float(2 * (b * stats.target_sum).sum() + moments.count * b.square().sum())
        stats.target_sum += moments.count * b
    stats.target_energy = stats.all_target_energy = energy
    return stats


def why_not_joint(pair: _SeparableConvNd, moments: InputMoments) -> Optional[str]:
    """Why the pair cannot be fitted on these moments, or None."""
    width = pair.in_channels // pair.groups * math.prod(pair.kernel_size)
    if moments.count < SAMPLES_PER_COLUMN * width:
        # With fewer sampled patches than the moments have columns the fit follows those patches, not the layer:
        # worse than the weight SVD on other inputs, and its error reported far too low (a review's measurement).
        return (
            f"{moments.count} input patches were sampled, fewer than {SAMPLES_PER_COLUMN} per column of its "
            f"{width}-wide moments: more calibration data would allow it"
        )
    if moments.block != pair.in_channels // pair.groups:
        return (
            f"its input moments were taken in blocks of {moments.block} channels, not whole groups of "
            f"{pair.in_channels // pair.groups}"
        )
    if depthwise_unknowns(pair) > MAX_DEPTHWISE_UNKNOWNS:
        return f"its depthwise filters are {depthwise_unknowns(pair)} unknowns per group (more than {MAX_DEPTHWISE_UNKNOWNS})"
    return None


def rounds_affordable(pair: _SeparableConvNd, conv_macs: float) -> int:
    """How many rounds cost at most `conv_macs` multiply-adds (the conv over the data): each is a Cholesky factor and
    solve of the depthwise system per group, and the pointwise one."""
    unknowns, pointwise = depthwise_unknowns(pair), pair.in_channels // pair.groups * pair.rank + 1
    per_round = pair.groups * (unknowns**3 / 3 + 2 * unknowns**2 + pointwise**3 / 3 + pointwise**2 * pair.out_channels)
    return min(JOINT_ROUNDS, int(conv_macs // per_round))


def fit_layer(pair: _SeparableConvNd, conv: _ConvNd, kernel: _ConvNd, moments: InputMoments, name: str,
              refit_follows: bool) -> tuple[Optional[float], str]:  # fmt: skip
    """Fit the pair built for `conv` (whose weight and bias `kernel` holds) on its input moments, as many rounds as
    pay: (relative output error after, what was done), or (None, why it was not fitted: the pair is unchanged).
    With calibration to follow (`refit_follows`), a layer that affords no round is left to it."""
    reason = why_not_joint(pair, moments)
    if reason is not None:
        return None, reason
    seen = moments.count * sampling_step(conv, moments.block)  # about every output position of the data
    k = kernel_elements(conv.kernel_size)
    affordable = rounds_affordable(pair, seen * conv_macs_per_position(conv.out_channels, conv.in_channels, k, conv.groups))
    if affordable == 0 and refit_follows:  # it would only solve the pointwise weights, as calibration will
        return None, "one round would cost more than the conv over the data"
    _, after, rounds = fit_jointly(pair, kernel.weight, kernel.bias, moments, name, JOINT_RIDGE, affordable)
    capped = "" if rounds < affordable or affordable == JOINT_ROUNDS else "; more would cost more than the conv over the data"
    return after, f"fitted on the input moments ({rounds} rounds{capped})"


def fit_jointly(pair: _SeparableConvNd, weight: Tensor, bias: Optional[Tensor], moments: InputMoments, name: str,
                ridge: float, rounds: int = JOINT_ROUNDS) -> tuple[float, float, int]:  # fmt: skip
    """Fit the pair's filters and pointwise weights (and bias) in place to the conv's outputs on the inputs the moments
    describe; (relative output error as built, after, rounds run). The caller checks why_not_joint first."""
    stats = moment_stats(pair, weight, bias, moments)
    before, after = fit(pair, stats, ridge, 0, name)  # the pointwise weights for the SVD's filters
    for done in range(rounds):
        previous = after
        after = alternate_round(pair, stats, ridge)
        if not EXACT < previous < math.inf or previous - after < JOINT_TOLERANCE * previous:  # exact, or nothing to fit
            return before, after, done + 1
    return before, after, rounds

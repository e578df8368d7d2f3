"""Closed-form parameter and MAC counts of a convolution and of its separable replacement.

MACs are multiply-accumulates per output position and per sample; FLOPs = 2 x MACs;
bias adds are not counted (torch's FlopCounterMode convention).
"""

from __future__ import annotations

import math


def conv_params(out_channels: int, in_channels: int, kernel: int, groups: int, bias: bool) -> int:
    return out_channels * (in_channels // groups) * kernel + (out_channels if bias else 0)


def separable_params(out_channels: int, in_channels: int, kernel: int, groups: int, rank: int, bias: bool) -> int:
    hidden = in_channels * rank
    return hidden * kernel + out_channels * (hidden // groups) + (out_channels if bias else 0)


def conv_macs_per_position(out_channels: int, in_channels: int, kernel: int, groups: int) -> int:
    return out_channels * (in_channels // groups) * kernel


def separable_macs_per_position(out_channels: int, in_channels: int, kernel: int, groups: int, rank: int) -> int:
    return in_channels * rank * kernel + out_channels * (in_channels // groups) * rank


def break_even_rank(out_channels: int, in_channels: int, kernel: int, groups: int) -> float:
    """The rank at which the pair costs as many MACs as the original: N/g * K / (N/g + K)."""
    out_per_group = out_channels // groups
    return out_per_group * kernel / (out_per_group + kernel)


def saves_macs(out_channels: int, in_channels: int, kernel: int, groups: int, rank: int) -> bool:
    return separable_macs_per_position(out_channels, in_channels, kernel, groups, rank) < conv_macs_per_position(
        out_channels, in_channels, kernel, groups
    )


def largest_saving_rank(out_channels: int, in_channels: int, kernel: int, groups: int) -> int:
    """The largest rank whose pair costs fewer MACs (and so fewer params) than the conv; 0 when none does."""
    rank = math.ceil(break_even_rank(out_channels, in_channels, kernel, groups)) - 1
    while rank > 0 and not saves_macs(out_channels, in_channels, kernel, groups, rank):  # the float rounded up
        rank -= 1
    return rank


def kernel_elements(kernel_size) -> int:
    return math.prod(kernel_size)


# Per-layer counts of a layer as it ran. FlopCounterMode counts a convolution as
# 2 x (weight elements) x (output positions), or x (input positions) when transposed,
# where a position is one sample at one spatial location; these agree with it exactly.


def positions(shape, spatial_dims: int) -> int:
    """Samples x spatial locations of an activation (N, C, *spatial), or (C, *spatial) unbatched."""
    channel_axis = len(shape) - spatial_dims - 1
    return math.prod(shape[:channel_axis]) * math.prod(shape[channel_axis + 1 :])


def conv_macs(out_channels: int, in_channels: int, kernel: int, groups: int, positions: int) -> int:
    """MACs of a convolution over `positions` output positions (input positions if transposed:
    the weight has the same elements, N*M/g*K, and each meets every input position once)."""
    return conv_macs_per_position(out_channels, in_channels, kernel, groups) * positions


def separable_macs(out_channels: int, in_channels: int, kernel: int, groups: int, rank: int, positions: int) -> int:
    return separable_macs_per_position(out_channels, in_channels, kernel, groups, rank) * positions

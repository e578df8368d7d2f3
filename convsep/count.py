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


def kernel_elements(kernel_size) -> int:
    return math.prod(kernel_size)

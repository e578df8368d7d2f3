"""SeparableConv1d/2d/3d: a depthwise convolution followed by a pointwise (1x1) one.

The depthwise half carries the original stride, padding, dilation and padding mode
with a depth multiplier of `rank`; the pointwise half mixes channels within the
original groups and carries the original bias. `from_conv` builds the pair from a
trained convolution (see factorize.py for the maths).
"""

from __future__ import annotations

from typing import ClassVar, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from .factorize import channel_svd, factors_from_svd, full_rank

INITS = ("svd", "random")


class _SeparableConvNd(nn.Module):
    dims: ClassVar[int]
    conv_type: ClassVar[type[_ConvNd]]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        rank: int = 1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int (the depth multiplier), got {rank!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        self.rank = rank
        self.groups = groups
        hidden = in_channels * rank
        self.depthwise = self.conv_type(
            in_channels, hidden, kernel_size, stride, padding, dilation,
            groups=in_channels, bias=False, padding_mode=padding_mode, device=device, dtype=dtype,
        )  # fmt: skip
        self.pointwise = self.conv_type(hidden, out_channels, 1, groups=groups, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))

    @property
    def in_channels(self) -> int:
        return self.depthwise.in_channels

    @property
    def out_channels(self) -> int:
        return self.pointwise.out_channels

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.depthwise.kernel_size

    def extra_repr(self) -> str:
        return f"rank={self.rank}, groups={self.groups}"

    @classmethod
    def from_conv(cls, conv: _ConvNd, rank: int | str = 1, init: str = "svd") -> "_SeparableConvNd":
        """The depthwise + pointwise pair that replaces `conv`.

        rank: the depth multiplier, capped at the layer's full rank min(out/groups, prod(kernel));
        "full" for that cap, where the pair computes exactly what `conv` computes.
        init: "svd" (closed form from conv's kernel) or "random" (PyTorch's default init).
        The new modules keep conv's dtype, device, requires_grad and train/eval mode.
        """
        if not isinstance(conv, cls.conv_type):
            raise TypeError(f"{cls.__name__}.from_conv expects an nn.{cls.conv_type.__name__}, got {type(conv).__name__}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        weight = conv.weight
        cap = full_rank(weight.shape, conv.groups)
        if rank == "full":
            rank = cap
        elif isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int or 'full', got {rank!r}")
        svd = channel_svd(weight, conv.groups) if init == "svd" else None
        return cls._build(conv, min(rank, cap), svd)

    @classmethod
    def _build(cls, conv: _ConvNd, rank: int, svd=None) -> "_SeparableConvNd":
        """The pair at an already resolved rank; SVD factors when `svd` is given, else random init."""
        weight = conv.weight
        pair = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, rank, device=weight.device, dtype=weight.dtype,
        )  # fmt: skip
        if svd is not None:
            factors = factors_from_svd(svd, rank, weight.shape, conv.groups, weight.dtype)
            with torch.no_grad():
                pair.depthwise.weight.copy_(factors.depthwise)
                pair.pointwise.weight.copy_(factors.pointwise)
                if conv.bias is not None:
                    pair.pointwise.bias.copy_(conv.bias)
        pair.depthwise.weight.requires_grad_(weight.requires_grad)
        pair.pointwise.weight.requires_grad_(weight.requires_grad)
        if conv.bias is not None:
            pair.pointwise.bias.requires_grad_(conv.bias.requires_grad)
        return pair.train(conv.training)


class SeparableConv1d(_SeparableConvNd):
    dims = 1
    conv_type = nn.Conv1d


class SeparableConv2d(_SeparableConvNd):
    dims = 2
    conv_type = nn.Conv2d


class SeparableConv3d(_SeparableConvNd):
    dims = 3
    conv_type = nn.Conv3d


SEPARABLE_FOR_DIMS: dict[int, type[_SeparableConvNd]] = {1: SeparableConv1d, 2: SeparableConv2d, 3: SeparableConv3d}


def conv_layers(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every convolution and every pair in the tree, once each, not looking inside pairs."""
    pairs: list[str] = []
    for name, module in root.named_modules():
        if any(name.startswith(p + ".") for p in pairs):
            continue
        if isinstance(module, _SeparableConvNd):
            pairs.append(name)
        if isinstance(module, (_ConvNd, _SeparableConvNd)):
            yield name, module

"""SeparableConv1d/2d/3d: a depthwise convolution followed by a pointwise (1x1) one.

The depthwise half carries the original stride, padding, dilation and padding mode
with a depth multiplier of `rank`; the pointwise half mixes channels within the
original groups and carries the original bias. `from_conv` builds the pair from a
trained convolution (see factorize.py for the maths).

Model code reads conv attributes at run time (`self.conv1.stride[0]`,
`self.proj.weight.dtype`, `self.conv._conv_forward(x, w, b)`), so the pair answers
each of them as the conv it replaced would, read-only: a write would change nothing
the pair computes, so it raises instead of being silently ignored.
"""

from __future__ import annotations

from typing import ClassVar, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from .errors import ConvsepTypeError, ConvsepValueError, ReadOnlyAttributeError, error_summary
from .factorize import channel_svd, compose, factors_from_svd, full_rank
from .parametrized import folded_conv, parametrization

INITS = ("svd", "random")

# The conv attributes the pair answers, and where each one's value lives (for the error on a write).
CONV_ATTRIBUTES = {
    "in_channels": "depthwise.in_channels",
    "out_channels": "pointwise.out_channels",
    "kernel_size": "depthwise.kernel_size",
    "stride": "depthwise.stride",
    "padding": "depthwise.padding",
    "dilation": "depthwise.dilation",
    "padding_mode": "depthwise.padding_mode",
    "_reversed_padding_repeated_twice": "depthwise._reversed_padding_repeated_twice",
    "groups": "pointwise.groups",
    "transposed": "the pair's structure (a pair is never transposed)",
    "output_padding": "the pair's structure (only transposed convs pad their output)",
    "weight": "depthwise.weight and pointwise.weight (composed on every read)",
    "bias": "pointwise.bias",
}


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
        name = type(self).__name__
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConvsepValueError(f"{name}: rank must be a positive int (the depth multiplier), got {rank!r}")
        for what, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConvsepValueError(f"{name}: {what} must be a positive int, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ConvsepValueError(
                f"{name}: in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        self.rank = rank
        hidden = in_channels * rank
        try:  # torch checks the rest (kernel_size, stride, padding, padding_mode, ...): its errors, as ours
            self.depthwise = self.conv_type(
                in_channels, hidden, kernel_size, stride, padding, dilation,
                groups=in_channels, bias=False, padding_mode=padding_mode, device=device, dtype=dtype,
            )  # fmt: skip
            self.pointwise = self.conv_type(hidden, out_channels, 1, groups=groups, bias=bias, device=device, dtype=dtype)
        except (ValueError, TypeError, RuntimeError) as error:
            raise ConvsepValueError(f"{name}: {error_summary(error)}") from None

    def forward(self, input: Tensor) -> Tensor:  # the conv's own name: a model may call conv(input=x)
        return self.pointwise(self.depthwise(input))

    # --- what the conv it replaced would answer --------------------------------------------

    @property
    def in_channels(self) -> int:
        return self.depthwise.in_channels

    @property
    def out_channels(self) -> int:
        return self.pointwise.out_channels

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.depthwise.kernel_size

    @property
    def stride(self) -> tuple[int, ...]:
        return self.depthwise.stride

    @property
    def padding(self):
        return self.depthwise.padding  # a tuple, or the string 'same' / 'valid', as given to the conv

    @property
    def dilation(self) -> tuple[int, ...]:
        return self.depthwise.dilation

    @property
    def padding_mode(self) -> str:
        return self.depthwise.padding_mode

    @property
    def _reversed_padding_repeated_twice(self) -> list[int]:  # what nn.ConvNd._conv_forward pads with
        return self.depthwise._reversed_padding_repeated_twice

    @property
    def groups(self) -> int:
        return self.pointwise.groups  # the original conv's groups: the pointwise half keeps them

    @property
    def transposed(self) -> bool:
        return False

    @property
    def output_padding(self) -> tuple[int, ...]:
        return (0,) * self.dims

    @property
    def bias(self) -> Optional[nn.Parameter]:
        """The original conv's bias, trained along with the pair: the pointwise half's bias Parameter itself."""
        return self.pointwise.bias

    @property
    def weight(self) -> Tensor:
        """The dense (N, M/groups, *k) kernel the pair computes with, composed from its two halves.

        Read-only and not a Parameter: it is recomputed on every read (one einsum of the
        factors, O(N * M/groups * rank * K) multiply-adds, as much as one output position of
        the conv) and carries gradients to both halves, so `.dtype`, `.device` and `.shape`
        are right and `self._conv_forward(x, self.weight, self.bias)` computes the pair's function.
        """
        return compose(self.depthwise.weight, self.pointwise.weight, self.groups, self.rank)

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """What nn.ConvNd._conv_forward does with these settings: a dense conv of `input` with `weight`.

        With `self.weight` and `self.bias` it computes what the pair computes (as one dense
        conv, so at the original conv's cost); models that pass a weight of their own (weight
        standardisation, LoRA) get the conv they asked for.
        """
        return self.conv_type._conv_forward(self, input, weight, bias)

    def __setattr__(self, name: str, value) -> None:
        if name in CONV_ATTRIBUTES:
            raise ReadOnlyAttributeError(
                f"{type(self).__name__}.{name} is read-only: the pair answers it as the conv it replaced would, "
                f"from {CONV_ATTRIBUTES[name]}"
            )
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name in CONV_ATTRIBUTES:
            raise ReadOnlyAttributeError(f"{type(self).__name__}.{name} is read-only and cannot be deleted")
        super().__delattr__(name)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, groups={self.groups}"

    @classmethod
    def from_conv(cls, conv: _ConvNd, rank: int | str = 1, init: str = "svd") -> "_SeparableConvNd":
        """The depthwise + pointwise pair that replaces `conv`.

        rank: the depth multiplier, capped at the layer's full rank min(out/groups, prod(kernel));
        "full" for that cap, where the pair computes exactly what `conv` computes.
        init: "svd" (closed form from conv's kernel) or "random" (PyTorch's default init).
        A conv whose weight is computed (weight_norm, spectral_norm, ...) is folded: the pair
        holds the value it computes in eval mode, without the parametrization.
        The new modules keep conv's dtype, device, requires_grad and train/eval mode.
        """
        if not isinstance(conv, cls.conv_type):
            raise ConvsepTypeError(f"{cls.__name__}.from_conv expects an nn.{cls.conv_type.__name__}, got {type(conv).__name__}")
        if init not in INITS:
            raise ConvsepValueError(f"{cls.__name__}.from_conv: init must be one of {INITS}, got {init!r}")
        if parametrization(conv):  # weight norm, spectral norm: build from the weight it computes, read without side effects
            conv = folded_conv(conv)
        weight = conv.weight
        cap = full_rank(weight.shape, conv.groups)
        if rank == "full":
            rank = cap
        elif isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConvsepValueError(f"{cls.__name__}.from_conv: rank must be a positive int or 'full', got {rank!r}")
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

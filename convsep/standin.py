"""Plain conv modules that stand in for a convolution a pair is built from.

A functional conv (`F.conv2d(x, self.weight, ...)`) has no module, and a weight-normed conv's
module computes its weight; the pair is built from a plain nn.ConvNd holding the weight and
bias it should reproduce, with the call's settings. It lives on the meta device but for the
parameters it is given, so it costs nothing.
"""

from __future__ import annotations

from typing import Optional

from torch import nn
from torch.nn.modules.conv import _ConvNd

STANDARD_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def plain_conv(weight: nn.Parameter, bias: Optional[nn.Parameter], **settings) -> _ConvNd:
    """A standard conv holding these parameters (shared, not copied), with the given settings
    (stride, padding, dilation, groups, padding_mode)."""
    groups = settings.get("groups", 1)
    conv = STANDARD_CONVS[weight.dim() - 3](
        weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), bias=bias is not None, device="meta", **settings
    )
    conv.weight = weight
    if bias is not None:
        conv.bias = bias
    return conv

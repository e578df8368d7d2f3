"""The layers a conversion kept that run after converted ones: linear in their weights, so calibration can refit them too.

Once earlier layers are converted, a kept nn.Linear or standard conv sees inputs that differ a little
from the original's; refitting its weights on those inputs against the original layer's outputs makes up
for part of the difference (a classifier head re-fitted on the converted model's features, a kept conv
after converted ones). Seen from calibration, such a layer is the pointwise half of a pair whose
"depthwise outputs" are its own inputs: a linear layer's features, a conv's patches (each input
channel's receptive field, channel-major then tap, the order of the conv's weight), so the same
least squares refits it (least_squares.py).

Only layers whose weight is a plain parameter that no other layer shares are refitted: a computed
weight (weight norm, any parametrization) or a tied one is not calibration's to overwrite, and neither
is a layer the converted model shares with the original (the user's model must not change).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterator

from torch import Tensor, nn

from .activations import patches

# Exact types: a subclass may compute its output otherwise, and then the least squares would not describe it.
REFITTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class KeptLayer:
    """A kept nn.Linear or conv, with the interface calibration's least squares reads off a pair."""

    def __init__(self, module: nn.Module) -> None:
        self.pointwise = self.module = module
        self.is_linear = isinstance(module, nn.Linear)
        self.groups = 1 if self.is_linear else module.groups
        self.kernel_size = (1,) if self.is_linear else module.kernel_size
        # Features per input channel: one for a linear layer, the kernel's taps for a conv.
        self.rank = 1 if self.is_linear else math.prod(module.kernel_size)
        self.in_channels = module.in_features if self.is_linear else module.in_channels
        self.out_channels = module.out_features if self.is_linear else module.out_channels

    def arrange(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(input, output) of one call as (batch, channels, *positions): a linear layer's rows become the batch."""
        if self.is_linear:
            return x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        if x.dim() == self.module.weight.dim() - 1:  # an unbatched call
            return x.unsqueeze(0), y.unsqueeze(0)
        return x, y

    def depthwise(self, x: Tensor) -> Tensor:
        """What the weights multiply: the inputs themselves, or the conv's patches."""
        return x if self.is_linear else patches(x, self.module)


def kept_layers(converted: nn.Module, original: nn.Module) -> Iterator[tuple[str, KeptLayer, nn.Module]]:
    """(name, layer in converted, the same layer in original) for every layer calibration may refit."""
    uses = Counter(id(p) for _, p in converted.named_parameters(remove_duplicate=False))
    originals = {id(p) for p in original.parameters()}
    for name, module in converted.named_modules():
        if type(module) not in REFITTABLE:
            continue
        try:
            source = original.get_submodule(name)  # not there for a pair's own convs
        except AttributeError:
            continue
        # A parametrized layer (weight_norm, ...) has another class; the old weight_norm recomputes the weight
        # before each call from parameters of other names: the weight is computed, not calibration's to overwrite.
        if not isinstance(module.weight, nn.Parameter) or any(
            uses[id(p)] > 1 or id(p) in originals for p in module.parameters(recurse=False)
        ):
            continue  # or tied to another layer's, or the original model's own (refitting it would change the original)
        yield name, KeptLayer(module), source

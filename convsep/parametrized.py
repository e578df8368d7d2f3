"""Convolutions whose weight is computed from other tensors: weight norm, spectral norm, any parametrization.

For a conversion the effective weight is an ordinary kernel, so such a conv is folded:
its pair is built from the value its forward would use, and the parametrization is not
carried over (the pair holds plain weights). Both forms torch has are read:
- `torch.nn.utils.parametrize` (what `parametrizations.weight_norm` / `spectral_norm` use):
  the value comes from a copy of the parametrization in eval mode, because spectral norm's
  power iteration would otherwise update its `_u` / `_v` buffers in the model;
- the older forward-pre-hooks of `torch.nn.utils.weight_norm` / `spectral_norm`: their own
  `compute_weight`, without the power iteration. These keep the computed weight as a plain
  non-leaf tensor attribute, which `copy.deepcopy` refuses; `deepcopy_model` copes with it.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .standin import plain_conv

PARAMETRIZED = ("fold", "keep")
_NAMES = {"_WeightNorm": "weight_norm", "WeightNorm": "weight_norm", "_SpectralNorm": "spectral_norm", "SpectralNorm": "spectral_norm"}


def _hooks(module: nn.Module) -> dict[str, object]:
    """The old-style weight_norm / spectral_norm hooks of `module`, by the tensor they compute."""
    return {h.name: h for h in module._forward_pre_hooks.values() if isinstance(h, (WeightNorm, SpectralNorm))}


def parametrization(module: nn.Module) -> str:
    """What computes the module's tensors: 'weight_norm', 'spectral_norm' or a class name ('+' between several); '' for none."""
    found = [type(hook).__name__ for hook in _hooks(module).values()]
    if parametrize.is_parametrized(module):
        found += [type(p).__name__ for plist in module.parametrizations.values() for p in plist]
    return "+".join(dict.fromkeys(_NAMES.get(name, name) for name in found))


def effective(module: nn.Module, name: str) -> Optional[Tensor]:
    """The value of `module.<name>` that its forward in eval mode uses, computed without changing the module."""
    hook = _hooks(module).get(name)
    if isinstance(hook, SpectralNorm):
        return hook.compute_weight(module, do_power_iteration=False)
    if isinstance(hook, WeightNorm):
        return hook.compute_weight(module)
    if parametrize.is_parametrized(module, name):
        return copy.deepcopy(module.parametrizations[name]).eval()()
    return getattr(module, name)


def folded_conv(conv: _ConvNd) -> _ConvNd:
    """A plain conv with `conv`'s settings holding its effective weight and bias, to build the pair from.

    The weight requires grad when the tensors it is computed from do, so the pair trains as the conv did.
    """
    with torch.enable_grad():  # only to learn whether the value depends on trainable tensors
        weight, bias = effective(conv, "weight"), effective(conv, "bias")
    as_parameter = lambda t: None if t is None else nn.Parameter(t.detach(), requires_grad=t.requires_grad)  # noqa: E731
    return plain_conv(
        as_parameter(weight), as_parameter(bias), stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, padding_mode=conv.padding_mode,
    )  # fmt: skip


def deepcopy_model(model: nn.Module) -> nn.Module:
    """copy.deepcopy, also for models with old-style weight_norm / spectral_norm hooks.

    Their computed weight is a non-leaf tensor, which deepcopy refuses; the copy gets it
    detached (its hook recomputes it before every forward anyway).
    """
    memo: dict[int, object] = {}
    for module in model.modules():
        for name in _hooks(module):
            value = module.__dict__.get(name)
            if isinstance(value, Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)

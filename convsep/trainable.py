"""What fine-tuning trains and how: which parameters (all, the pairs', or a callable's choice), the optimiser and
its weight-decay groups (none on depthwise filters, biases and norms), and what stays frozen meanwhile."""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

from .errors import ConvsepValueError
from .layers import _SeparableConvNd

OPTIMIZERS = ("adamw", "sgd")
TRAINABLE = ("all", "separable")
DEFAULT_WEIGHT_DECAY = {"adamw": 1e-2, "sgd": 1e-4}
TrainableSpec = Union[str, Callable[[str, nn.Parameter], bool]]


def trainable_parameters(model: nn.Module, trainable: TrainableSpec) -> list[tuple[str, nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if callable(trainable):
        chosen = [(n, p) for n, p in named if trainable(n, p)]
    elif trainable == "all":
        chosen = named
    elif trainable == "separable":
        in_pairs = {id(p) for m in model.modules() if isinstance(m, _SeparableConvNd) for p in m.parameters()}
        if not in_pairs:
            raise ConvsepValueError(
                "trainable='separable' but the model has no SeparableConv layers: convert it first, or use trainable='all'"
            )
        chosen = [(n, p) for n, p in named if id(p) in in_pairs]
    else:
        raise ConvsepValueError(
            f"trainable={trainable!r} is not known: use one of {', '.join(map(repr, TRAINABLE))} "
            "or a callable (name, parameter) -> bool"
        )
    if not chosen:
        raise ConvsepValueError(f"trainable={trainable!r} selects no parameter that requires grad: nothing to train")
    return chosen


def parameter_groups(model: nn.Module, named: list[tuple[str, nn.Parameter]], decay: float) -> list[dict]:
    """Two optimiser groups: weight decay on matrices and dense kernels; none on depthwise filters, biases, norms."""
    depthwise = {id(m.depthwise.weight) for m in model.modules() if isinstance(m, _SeparableConvNd)}
    depthwise |= {
        id(m.weight) for m in model.modules() if isinstance(m, _ConvNd) and m.groups == m.in_channels and m.groups > 1
    }
    no_decay = [p for _, p in named if p.dim() <= 1 or id(p) in depthwise]
    decayed = [p for _, p in named if not (p.dim() <= 1 or id(p) in depthwise)]
    groups = [{"params": decayed, "weight_decay": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(name: str, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=lr)


def freeze_all_but(model: nn.Module, params: list[nn.Parameter]) -> list[nn.Parameter]:
    """Turn off requires_grad outside `params` (saves their gradients); the caller turns it back on."""
    keep = {id(p) for p in params}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
    for p in frozen:
        p.requires_grad_(False)
    return frozen


def keep_statistics_of_frozen_norms(model: nn.Module, trained: set[int], trainable: TrainableSpec) -> None:
    """With a partial `trainable`, norm layers none of whose parameters train keep their running statistics."""
    if trainable == "all":
        return
    for module in model.modules():
        if isinstance(module, _NormBase) and not any(id(p) in trained for p in module.parameters(recurse=False)):
            module.eval()

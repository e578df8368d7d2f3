"""Activation-aware conversion: which factorisation and which allocation the calibration data allows.

`resolve_choices` settles init="auto" / allocate_by="auto" by what measured best on a trained model
(benchmarks/rank_policies.py: activation-aware before any refit, the weight SVD when calibration
follows); `whiten` gives each candidate layer its whitened SVD (factorize.whitened_channel_svd) from
the input moments of one pass over the data (activations.py), or says why the layer keeps the
weight SVD. The candidates are convert's: anything with .decision, .conv, .kernel, .site, .whitened.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .activations import input_moments
from .errors import ConvsepValueError
from .factorize import whitened_channel_svd

CONVERT_INITS = ("auto", "svd", "activation", "random")
ALLOCATE_BY = ("auto", "weights", "activations")
ACTIVATION_RIDGE = 1e-3  # relative to the layer's mean input energy per patch element: keeps Sigma_c invertible


def resolve_choices(init: str, allocate_by: str, data: Any, refit: bool) -> tuple[str, str]:
    """init and allocate_by with "auto" resolved by what measured best (benchmarks/rank_policies.py): activation-aware
    when the data serves the conversion alone; the weight SVD and weight error when calibration refits the pairs."""
    if init not in CONVERT_INITS:
        raise ConvsepValueError(f"init={init!r} is not known: use one of {', '.join(map(repr, CONVERT_INITS))}")
    if allocate_by not in ALLOCATE_BY:
        raise ConvsepValueError(f"allocate_by={allocate_by!r} is not known: use one of {', '.join(map(repr, ALLOCATE_BY))}")
    for name, value, needs in (("init", init, "activation"), ("allocate_by", allocate_by, "activations")):
        if value == needs and data is None:
            raise ConvsepValueError(f"{name}={value!r} needs calibration_data: the inputs the layers see")
    aware = data is not None and not refit
    if init == "auto":
        init = "activation" if aware else "svd"
    if allocate_by == "auto":
        allocate_by = "activations" if aware else "weights"
    return init, allocate_by


def whiten(work: nn.Module, candidates: list, data: Any, batches: Optional[int]) -> dict:
    """Each module conv's input moments from one pass of the (not yet converted) model, and its whitened SVD.

    Layers the data cannot speak for keep the weight SVD, with the reason in their decision.
    """
    convs = {c.decision.name: c.conv for c in candidates if c.site is None}
    moments = input_moments(work, convs, data, batches)
    for candidate in candidates:
        decision = candidate.decision
        if candidate.site is not None:
            decision.whitening = "weight SVD: activation statistics are gathered for module convs only"
            continue
        covariance = moments[decision.name].covariance()
        if covariance is None:
            decision.whitening = "weight SVD: the calibration data never reached this layer"
        elif not bool(torch.isfinite(covariance).all()):
            decision.whitening = "weight SVD: its inputs on the calibration data are not finite"
        elif float(covariance.diagonal(dim1=1, dim2=2).sum()) == 0:
            decision.whitening = "weight SVD: its inputs on the calibration data are all zero"
        else:
            try:
                candidate.whitened = whitened_channel_svd(
                    candidate.kernel.weight, candidate.conv.groups, covariance, ACTIVATION_RIDGE
                )
                decision.whitening = "activation"
            except torch.linalg.LinAlgError:
                decision.whitening = "weight SVD: its input covariance is not positive definite, even with the ridge"
    positions = max((m.count for m in moments.values()), default=0)
    return {"ridge": ACTIVATION_RIDGE, "positions_seen": positions}

"""Activation-aware conversion: which factorisation and which allocation the calibration data allows.

`resolve_choices` settles init="auto" / allocate_by="auto" by what measured best on a trained model
(benchmarks/rank_policies.py): with data, ranks go where the predicted output error is lowest and
each pair is fitted on its inputs' moments (joint_fit.py). `gather` makes one pass over the data for
the input moments and gives each candidate layer what they allow: its whitened SVD
(factorize.whitened_channel_svd), its output error after the pointwise refit at every rank
(refit_error.py), the moments themselves for the joint fit; where the data cannot speak for a
layer, the weight SVD and weight error, with the reason. The candidates are
convert's: anything with .decision, .conv, .kernel, .site, .whitened, .refit_errors, .refit_ranks, .factors().
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .activations import input_moments
from .errors import ConvsepValueError
from .factorize import whitened_channel_svd
from .refit_error import predicted_refit_errors

CONVERT_INITS = ("auto", "svd", "activation", "joint", "random")
ALLOCATE_BY = ("auto", "weights", "activations")
ACTIVATION_RIDGE = 1e-3  # relative to the layer's mean input energy per patch element: keeps Sigma_c invertible


def resolve_choices(init: str, allocate_by: str, data: Any, refit: bool, budget: Optional[float]) -> tuple[str, str]:
    """init and allocate_by with "auto" resolved by what measured best (benchmarks/rank_policies.py): with data, ranks
    by the output error, and pairs fitted jointly on the input moments where those are gathered anyway (a budget) or
    the data serves the conversion alone (far better than the per-channel whitening there); the weight SVD when
    calibration follows a fixed rank (there the joint fit, after calibration, did worse); without data, the weight
    SVD and weight error."""
    if init not in CONVERT_INITS:
        raise ConvsepValueError(f"init={init!r} is not known: use one of {', '.join(map(repr, CONVERT_INITS))}")
    if allocate_by not in ALLOCATE_BY:
        raise ConvsepValueError(f"allocate_by={allocate_by!r} is not known: use one of {', '.join(map(repr, ALLOCATE_BY))}")
    for name, value, needs in (("init", init, ("activation", "joint")), ("allocate_by", allocate_by, ("activations",))):
        if value in needs and data is None:
            raise ConvsepValueError(f"{name}={value!r} needs calibration_data: the inputs the layers see")
    if init == "auto":
        init = "joint" if data is not None and (budget is not None or not refit) else "svd"
    if allocate_by == "auto":
        allocate_by = "activations" if data is not None else "weights"
    return init, allocate_by


def gather(work: nn.Module, candidates: list, data: Any, batches: Optional[int], init: str, whitened: bool,
           refit_aware: bool) -> dict:  # fmt: skip
    """One pass of the (not yet converted) model over the data: each module conv's input moments, and from them its
    whitened SVD (`whitened`) and its output errors after the refit (`refit_aware`, for the allocation); for
    init="joint" the moments themselves (`candidate.moments`: the pair is fitted on them once built, joint_fit.py).

    Layers the data cannot speak for keep the weight SVD and weight error, with the reason in their decision.
    """
    convs = {c.decision.name: c.conv for c in candidates if c.site is None}
    joint = init == "joint"
    moments = input_moments(work, convs, data, batches, cross_channel=refit_aware or joint)
    for candidate in candidates:
        decision = candidate.decision
        reason = None if candidate.site is None else "activation statistics are gathered for module convs only"
        covariance = moments[decision.name].channel_covariance() if reason is None else None
        if reason is None and covariance is None:
            reason = "the calibration data never reached this layer"
        elif reason is None and not bool(torch.isfinite(covariance).all()):
            reason = "its inputs on the calibration data are not finite"
        elif reason is None and float(covariance.diagonal(dim1=1, dim2=2).sum()) == 0:
            reason = "its inputs on the calibration data are all zero"
        if reason is None and whitened:
            try:
                candidate.whitened = whitened_channel_svd(
                    candidate.kernel.weight, candidate.conv.groups, covariance, ACTIVATION_RIDGE
                )
            except torch.linalg.LinAlgError:
                reason = "its input covariance is not positive definite, even with the ridge"
        if joint:
            if reason is None:
                candidate.moments = moments[decision.name]
            else:
                decision.joint_fit = f"weight SVD: {reason}"
        if whitened:
            decision.whitening = "activation" if reason is None else f"weight SVD: {reason}"
        if refit_aware:
            if reason is None:
                layer = moments[decision.name]
                basis = (candidate.factors(init) or candidate.spectrum()).Vh  # random init: the SVD's span
                candidate.refit_errors = predicted_refit_errors(
                    candidate.kernel.weight, candidate.kernel.bias, candidate.conv.groups, basis, layer,
                    min(basis.shape[1], candidate.refit_ranks or basis.shape[1]), ACTIVATION_RIDGE,
                )  # fmt: skip
            else:
                decision.allocation = f"weight error: {reason}"
    positions = max((m.count for m in moments.values()), default=0)
    return {"ridge": ACTIVATION_RIDGE, "positions_seen": positions}

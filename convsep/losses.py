"""The loss of a fine-tuning batch: distillation from the teacher's outputs, the targets, or the user's callable.

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, targets)

for classifier outputs (2-d logits with at least two classes), MSE terms for any other output; a batch without
targets uses the first term alone, without a teacher the second alone (finetune.py's docstring says why).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Union

import torch.nn.functional as F
from torch import Tensor

from .errors import ConvsepTypeError, ConvsepValueError, InputShapeError
from .probe import describe_inputs

log = logging.getLogger(__name__)

LOSSES = ("auto", "kl", "mse")
LossFn = Callable[[Any, Optional[Any], Optional[Tensor]], Tensor]


def distillation_loss(student: Tensor, teacher: Tensor, kind: str = "kl", temperature: float = 2.0) -> Tensor:
    """How far the student's outputs are from the teacher's: T^2 * KL at temperature T ("kl"), or MSE ("mse").

    KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch (the mean over samples of the
    sum over classes, which is what KL means; "mean" over every element would divide by the class count).
    """
    if kind == "mse":
        return F.mse_loss(student, teacher)
    log_p_student = F.log_softmax(student / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2


def target_loss(student: Tensor, targets: Tensor, kind: str = "kl") -> Tensor:
    """The supervised term: cross-entropy against class indices or probabilities ("kl"), or MSE ("mse")."""
    if kind == "mse":
        return F.mse_loss(student, targets.to(student.dtype))
    return F.cross_entropy(student, targets)


class Objective:
    """The loss of one batch, from the student's outputs, the teacher's (or None) and the targets (or None)."""

    def __init__(self, loss: Union[str, LossFn], temperature: float, alpha: float) -> None:
        self.custom = loss if callable(loss) else None
        self.kind = None if callable(loss) or loss == "auto" else loss
        self.temperature = temperature
        self.alpha = alpha

    def wants_teacher(self, has_targets: bool) -> bool:
        return self.custom is not None or not has_targets or self.alpha > 0

    def __call__(self, out: Any, teacher_out: Any, targets: Optional[Tensor], where: str) -> Tensor:
        if self.custom is not None:
            value = self.custom(out, teacher_out, targets)
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise ConvsepTypeError(f"loss callable must return a scalar tensor, got {describe_inputs(value)}")
            return value.reshape(())
        if not isinstance(out, Tensor):
            raise ConvsepTypeError(
                f"the model returns {type(out).__name__}, not a tensor: pass "
                "loss=callable(student_out, teacher_out, targets) -> scalar tensor"
            )
        if teacher_out is None and targets is None:
            raise ConvsepValueError(
                f"{where} carries no targets and no teacher was given: pass teacher=the original model, "
                "or batches (inputs, targets)"
            )
        if self.kind is None:
            self.kind = "kl" if out.is_floating_point() and out.dim() == 2 and out.shape[1] >= 2 else "mse"
            log.info("loss='auto': %r for outputs of shape %s", self.kind, tuple(out.shape))
        soft = hard = None
        if teacher_out is not None:
            if not isinstance(teacher_out, Tensor) or teacher_out.shape != out.shape:
                raise ConvsepValueError(
                    f"{where}: the teacher's output is {describe_inputs(teacher_out)} but the student's is "
                    f"{describe_inputs(out)}: the teacher must be the model the student was converted from"
                )
            soft = distillation_loss(out, teacher_out.to(out.dtype), self.kind, self.temperature)
        if targets is not None and (soft is None or self.alpha < 1):
            check_targets(out, targets, self.kind, where)
            hard = target_loss(out, targets, self.kind)
        if soft is None:
            return hard
        if hard is None:
            return soft
        return self.alpha * soft + (1 - self.alpha) * hard


def check_targets(out: Tensor, targets: Tensor, kind: str, where: str) -> None:
    if not isinstance(targets, Tensor):
        raise ConvsepTypeError(f"{where}: targets must be a tensor, got {type(targets).__name__}")
    class_indices = kind == "kl" and not targets.is_floating_point()
    expected = tuple(out.shape[:1]) if class_indices else tuple(out.shape)
    if tuple(targets.shape) != expected:
        what = "class indices" if class_indices else "targets"
        raise InputShapeError(
            f"{where}: {what} of shape {tuple(targets.shape)} do not fit the model's output of shape "
            f"{tuple(out.shape)}: expected shape {expected}"
        )
    if class_indices and targets.numel():
        low, high, classes = int(targets.min()), int(targets.max()), out.shape[1]
        if low < 0 or high >= classes:
            raise ConvsepValueError(
                f"{where}: class index {low if low < 0 else high} is outside [0, {classes}) "
                f"for a model with {classes} outputs"
            )

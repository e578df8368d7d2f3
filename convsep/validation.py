"""Validation during fine-tuning: the objective on held-out batches, the history, and the best state seen.

A model calibration has already brought close to its original can only lose from a bad run of
training, and the training loss alone cannot tell. So fine-tuning evaluates the objective (the
distillation loss; accuracy too when the batches carry class labels) on validation batches before
the first step, after every epoch and every `val_every` steps, and keeps a copy of the state with
the lowest validation loss: the starting state counts, so the result is never worse on validation
than what the caller gave.

Under torchrun each process evaluates its own shard; the sums (loss x samples, correct, samples)
are added over the processes before dividing, so every process sees the same numbers and keeps
the same state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from . import distributed
from .plan import plan_of

HISTORY_ATTRIBUTE = "convsep_finetune"  # where the history lives on a model without a conversion plan

# (batch, where) -> (loss of the batch, student's output, targets or None); `where` names the batch in errors
LossOfBatch = Callable[[Any, str], tuple[Tensor, Any, Optional[Tensor]]]


@dataclass
class Evaluation:
    loss: float  # mean over samples
    accuracy: Optional[float]  # fraction of labelled samples whose top class is the label; None without labels
    samples: int


def evaluate(batches: Iterable, loss_of: LossOfBatch) -> Evaluation:
    """The objective over every validation batch (of every process), weighted by batch size."""
    loss_sum, correct, samples, labelled = 0.0, 0, 0, 0
    with distributed.together():  # a batch that does not fit on one process stops every process
        for index, batch in enumerate(batches, 1):
            value, out, targets = loss_of(batch, f"validation batch {index}")
            count = _samples(out)
            loss_sum, samples = loss_sum + float(value) * count, samples + count
            if _classes(out, targets):
                labels = targets if not targets.is_floating_point() else targets.argmax(1)
                correct, labelled = correct + int((out.argmax(1) == labels).sum()), labelled + count
    totals = torch.tensor([loss_sum, correct, samples, labelled], dtype=torch.float64)
    distributed.all_sum([totals])
    loss_sum, correct, samples, labelled = totals.tolist()
    if samples == 0:
        return Evaluation(math.nan, None, 0)
    return Evaluation(loss_sum / samples, correct / labelled if labelled else None, int(samples))


def _samples(out: Any) -> int:
    return int(out.shape[0]) if isinstance(out, Tensor) and out.dim() else 1


def _classes(out: Any, targets: Any) -> bool:
    """Whether accuracy means something: 2-d logits and labels (class indices or one probability row each)."""
    if not isinstance(out, Tensor) or not isinstance(targets, Tensor) or out.dim() != 2 or out.shape[1] < 2:
        return False
    return targets.shape == out.shape[:1] or (targets.is_floating_point() and targets.shape == out.shape)


class History:
    """Every evaluation (step, epoch, train loss, validation loss / accuracy, lr) and the best state seen."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.best_loss = math.inf
        self.best_step: Optional[int] = None
        self.best_state: Optional[dict[str, Tensor]] = None

    def add(self, model: nn.Module, evaluation: Evaluation, **record: Any) -> dict:
        """Record an evaluation; keep a copy of the model's state if its loss is the lowest yet (strictly)."""
        row = {**record, "val_loss": evaluation.loss, "val_accuracy": evaluation.accuracy}
        row["best"] = evaluation.loss < self.best_loss  # NaN never is: nothing non-finite is kept
        if row["best"]:
            self.best_loss, self.best_step = evaluation.loss, record["step"]
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.records.append(row)
        return row

    def restore_best(self, model: nn.Module) -> bool:
        """Load the best state into `model` unless it already holds it; whether it loaded."""
        if self.best_state is None or (self.records and self.records[-1]["best"]):
            return False
        model.load_state_dict(self.best_state)
        return True

    def summary(self) -> dict:
        return {"history": [dict(r) for r in self.records], "best_step": self.best_step, "best_val_loss": self.best_loss}

    def state_dict(self) -> dict:
        return {**self.summary(), "best_state": self.best_state}

    def load_state_dict(self, state: dict) -> None:
        self.records = [dict(r) for r in state["history"]]
        self.best_step, self.best_loss, self.best_state = state["best_step"], state["best_val_loss"], state["best_state"]


def attach(model: nn.Module, record: dict) -> None:
    """Keep the fine-tuning record on the model's conversion plan (saved with its checkpoints), else on the model."""
    plan = plan_of(model)
    if plan is not None:
        plan.finetune = record
    else:
        setattr(model, HISTORY_ATTRIBUTE, record)


def format_row(row: dict) -> str:
    accuracy = f", accuracy {row['val_accuracy']:.2%}" if row.get("val_accuracy") is not None else ""
    train = f"train loss {row['train_loss']:.4f}, " if row.get("train_loss") is not None else ""
    best = " (best)" if row["best"] else ""
    return f"step {row['step']} (epoch {row['epoch']}): {train}validation loss {row['val_loss']:.4f}{accuracy}, lr {row['lr']:.3g}{best}"

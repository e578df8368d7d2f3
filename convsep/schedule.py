"""The learning-rate schedule of fine-tuning: a linear warmup, then a cosine decay to 0.

A converted model starts close to its teacher; a full-size first step of Adam (whose first
updates are about lr per weight, whatever the gradient's size) can throw it away before the
moments are estimated. A short warmup (timm and most recipes use one) lets the optimiser learn
the gradients' scale at a small lr first. The factor of the lr at step s (0-based) of `total`:

    (s + 1) / (w + 1)                                      for s < w   (w warmup steps)
    0.5 * (1 + cos(pi * (s - w) / (total - w)))            after

`lower()` scales it down for the rest of the run: fine-tuning does so after a non-finite step.
The state (steps taken, scale) is a small dict, saved with a training checkpoint.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def warmup_steps(total: Optional[int], warmup: float) -> int:
    """The number of warmup steps: the fraction `warmup` of `total`, at least 1 when warmup > 0 (0 when unknown)."""
    if not total or warmup <= 0:
        return 0
    return min(total - 1, max(1, round(warmup * total)))


def lr_factor(step: int, total: Optional[int], warmup: int) -> float:
    """The lr of step `step` (0-based) as a fraction of the peak; constant 1 when `total` is unknown."""
    if not total:
        return 1.0
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, total - warmup) / (total - warmup)))


class Schedule:
    """Sets the optimiser's lr before each step: peak * lr_factor(step) * scale."""

    def __init__(self, optimizer: torch.optim.Optimizer, peak: float, total: Optional[int], warmup: float) -> None:
        self.optimizer, self.peak, self.total = optimizer, peak, total
        self.warmup = warmup_steps(total, warmup)
        self.step_count, self.scale = 0, 1.0
        self.apply()

    @property
    def lr(self) -> float:
        return self.peak * lr_factor(self.step_count, self.total, self.warmup) * self.scale

    def apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def step(self) -> None:
        self.step_count += 1
        self.apply()

    def lower(self, factor: float) -> None:
        self.scale *= factor
        self.apply()

    def state_dict(self) -> dict:
        return {"step": self.step_count, "scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.step_count, self.scale = int(state["step"]), float(state["scale"])
        self.apply()

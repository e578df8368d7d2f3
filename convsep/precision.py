"""Mixed precision for fine-tuning: autocast to bfloat16 or float16, with a gradient scaler for float16.

bfloat16 keeps float32's exponent range, so its gradients need no scaling, and CPUs with AVX-512
BF16 or AMX run its matrix products faster; float16 needs a GradScaler (its small gradients
underflow) and is for CUDA. Weights, optimiser state and the loss stay in float32.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

from .errors import ConvsepValueError

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check(autocast: Optional[str]) -> None:
    if autocast is not None and autocast not in AUTOCAST:
        raise ConvsepValueError(f"autocast={autocast!r} is not known: use 'bf16', 'fp16' or None")


class Precision:
    """The forward pass's context (autocast or nothing) and the gradient scaler (float16 only, else None)."""

    def __init__(self, autocast: Optional[str], device: torch.device) -> None:
        self.dtype = AUTOCAST[autocast] if autocast is not None else None
        if autocast == "fp16" and device.type != "cuda":
            raise ConvsepValueError(
                f"autocast='fp16' needs a CUDA device (training on {device}): use autocast='bf16' on CPUs"
            )
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler("cuda") if autocast == "fp16" else None

    def forward(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def as_float(self, out: Any) -> Any:
        """Outputs computed in low precision, back in float32 for the loss (log-softmax and KL lose digits in bf16)."""
        if self.dtype is not None and isinstance(out, torch.Tensor) and out.dtype == self.dtype:
            return out.float()
        return out

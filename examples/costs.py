"""MACs (in total and in convolutions) and parameters of a model, for the Fashion-MNIST example and benchmark.

Measured by torch's FlopCounterMode on one sample, MACs = FLOPs / 2 (convsep's convention: bias adds
are not counted). `convsep.report` gives the same totals per layer; this keeps the example and the
benchmark independent of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class Costs:
    macs: int  # per sample, whole model
    conv_macs: int  # per sample, convolutions only
    params: int


@torch.no_grad()
def costs(model: nn.Module, example: Tensor) -> Costs:
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(example[:1])
    model.train(was_training)
    per_op = counter.get_flop_counts().get("Global", {})
    conv_flops = sum(count for op, count in per_op.items() if "convolution" in str(op))
    return Costs(counter.get_total_flops() // 2, conv_flops // 2, sum(p.numel() for p in model.parameters()))

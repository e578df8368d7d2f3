"""Where a model and its inputs live: calibration and fine-tuning run on one device.

The caller's reference model (the original, the teacher) is never moved: when it lives
elsewhere, a copy is moved instead.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConvsepValueError, error_summary
from .parametrized import deepcopy_model


def parse_device(device: Any) -> torch.device:
    """torch.device(device), checked to exist on this machine (a clear error instead of a failure mid-run)."""
    try:
        # Allocating raises for a device type or index this build or machine lacks, and names the concrete
        # device ('cuda' -> 'cuda:0', 'cpu:0' -> 'cpu'), so models already there are recognised as there.
        parsed = torch.empty(0, device=torch.device(device)).device
        if parsed.type == "meta":
            raise RuntimeError("meta tensors hold no data to train or calibrate on")
    except (RuntimeError, TypeError, AssertionError) as error:  # torch's errors for unknown/unavailable devices
        reason = error_summary(error).split(". ")[0]  # some (a missing backend) run to a page
        raise ConvsepValueError(
            f"device={device!r} is not a device this machine has ({reason}); pass e.g. 'cpu' or 'cuda:0'"
        ) from None
    return parsed


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model without either."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """The model itself if all of it is on `device`, else a moved copy (the caller's model never moves)."""
    if all(t.device == device for t in itertools.chain(model.parameters(), model.buffers())):
        return model
    return deepcopy_model(model).to(device)


def to_device(inputs: Any, device: torch.device) -> Any:
    """Tensors, and tuples or lists of them (nested), on `device`; anything else as it is."""
    if isinstance(inputs, Tensor):
        # Asynchronous only towards a GPU: a non-blocking copy to the CPU could be read before it lands.
        return inputs.to(device, non_blocking=device.type == "cuda")
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(x, device) for x in inputs)
    return inputs

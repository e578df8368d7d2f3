"""What a batch is: a tensor of inputs, or a tuple/list (inputs, targets, ...).

Calibration needs only inputs; fine-tuning uses targets when a batch carries them.
Inputs may themselves be a tuple of tensors for models with several inputs: write
such a batch as ((x1, x2), targets).
"""

from __future__ import annotations

import itertools
from typing import Any, Optional

import torch

from .errors import ConvsepTypeError


def split_batch(batch: Any, where: str = "a batch") -> tuple[Any, Optional[torch.Tensor]]:
    """(inputs, targets or None) of one batch; `where` names the batch in the error for one that is neither."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    hint = "; map it to a tuple first" if isinstance(batch, dict) else ""
    got = "an empty " + type(batch).__name__ if isinstance(batch, (tuple, list)) else type(batch).__name__
    raise ConvsepTypeError(f"{where}: a batch is a tensor or a tuple (inputs, targets), got {got}{hint}")


def as_args(inputs: Any) -> tuple:
    """Positional arguments for model(*args): a tensor is one argument, a tuple of tensors several."""
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def rereadable(data: Any, limit: Optional[int] = None) -> Any:
    """Data that can be iterated more than once: a one-shot iterator (a generator) is read into a list,
    at most `limit` batches of it; anything else (a list, a DataLoader, not iterable at all) as it is."""
    try:
        iterator = iter(data)
    except TypeError:
        return data  # the caller says what is wrong with it
    return list(itertools.islice(iterator, limit)) if iterator is data else data


def input_of(args: tuple, kwargs: dict) -> Any:
    """A layer call's input: the first positional argument, or the keyword torch's layers name it (`input`)."""
    return args[0] if args else kwargs.get("input")

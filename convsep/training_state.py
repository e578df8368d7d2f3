"""Training checkpoints: everything a killed fine-tuning run needs to continue to the same result.

A run that stops (a pre-empted job, a lost session) should not start over. The state written
here holds the model, the optimiser, the schedule, the gradient scaler, the position in the data
(epoch, batches taken in it, steps), the random number generators (of every process: at the start
of the current epoch, which decides a shuffling DataLoader's order, and now, which decides dropout
and later epochs), the history with the best state, and a fingerprint of the model. Resuming
replays the current epoch's order without computing and restores the generators, so the rest of
the run is the one that was interrupted (bit for bit on CPU with deterministic data).

Rank 0 writes, atomically (convsep.files); every process reads the same file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Optional, Union

import torch

from . import distributed
from .errors import CheckpointError, CheckpointNotFoundError
from .files import write_atomically

FORMAT = 1
PathLike = Union[str, os.PathLike]


def rng_state() -> dict:
    """This process's generators: torch (CPU and every GPU) and Python's random."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(state: Any) -> tuple:
    """random.setstate wants tuples; a checkpoint read with weights_only may give lists."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


class Position:
    """Where a run is: the epoch under way, batches taken in it, steps taken, and the random generators'
    state when the epoch began (which decides a shuffling DataLoader's order), for a training checkpoint."""

    def __init__(self) -> None:
        self.epoch, self.index, self.step = 1, 0, 0
        self.epoch_of_last_step = 1
        self.rng_at_epoch_start: Optional[dict] = None

    def rng(self) -> dict:
        return {"epoch_start": self.rng_at_epoch_start, "now": rng_state()}

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "step": self.step, "epoch_of_last_step": self.epoch_of_last_step}

    def load(self, state: dict, rngs: list[dict]) -> None:
        self.epoch, self.index, self.step = state["epoch"], state["index"], state["step"]
        self.epoch_of_last_step = state["epoch_of_last_step"]
        mine = rngs[distributed.rank()] if len(rngs) == distributed.world_size() else rngs[0]
        self.rng_at_epoch_start = mine["epoch_start"]
        set_rng_state(mine["now"])


def save(path: PathLike, state: dict) -> None:
    """Write the training state (rank 0 only; the others' generators were gathered into `state` by the caller)."""
    if distributed.is_main():
        payload = {"convsep_training_state": FORMAT, **state}
        write_atomically(path, lambda tmp: torch.save(payload, tmp))


def load(path: PathLike, fingerprint: str) -> dict:
    """The training state in `path`, checked to belong to a model of this `fingerprint` (structure and plan)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"the training state {str(path)!r} to resume from does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged or foreign file: pickle, zip and torch errors alike
        raise CheckpointError(f"{path} is not a convsep training state ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or state.get("convsep_training_state") != FORMAT:
        raise CheckpointError(f"{path} is not a convsep training state (written by finetune with a state path)")
    if state["fingerprint"] != fingerprint:
        raise CheckpointError(
            f"{path} is the training state of another model or conversion plan (its parameters, their shapes or "
            "the converted layers and ranks differ from the model given): nothing was loaded"
        )
    return state

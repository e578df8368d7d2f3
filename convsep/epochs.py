"""The batches of a fine-tuning run: whole epochs or exactly so many steps, resumable mid-epoch, and agreed on by
every process of a distributed job (an epoch ends everywhere when one process runs out)."""

from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator, Optional

from . import distributed, training_state
from .warn import warn_user

log = logging.getLogger(__name__)

_END = object()
END_OF_EPOCH = object()  # what run_batches yields between epochs: time to validate and save


def run_batches(data: Iterable, epochs: int, steps: Optional[int], position: training_state.Position) -> Iterator[Any]:
    """The batches of `epochs` passes over data (or of exactly `steps` steps, cycling over it), with
    END_OF_EPOCH after each pass; from `position`, so a resumed run replays the batches it had taken.

    With several processes, an epoch ends on all of them as soon as one has no batch left.
    """
    while steps is not None or position.epoch <= epochs:
        skip = position.index  # > 0 only for the first epoch of a resumed run
        if skip and position.rng_at_epoch_start is not None:
            now = training_state.rng_state()
            training_state.set_rng_state(position.rng_at_epoch_start)  # the same shuffled order as before
        else:
            now, position.rng_at_epoch_start = None, training_state.rng_state()
        yielded = 0
        with distributed.together():
            batches = iter(data)
        while True:
            with distributed.together():
                batch = next(batches, _END)
            if not distributed.everywhere(batch is not _END):
                if batch is not _END:
                    log.warning(
                        "rank %d: another process ran out of batches, so epoch %d ended after %d steps; this "
                        "process's remaining batches were not used (give every process as many batches)",
                        distributed.rank(), position.epoch, yielded,
                    )  # fmt: skip
                break
            yielded += 1
            if yielded <= skip:
                continue  # trained on before the run was interrupted
            if now is not None:
                training_state.set_rng_state(now)
                now = None
            position.index, position.epoch_of_last_step = yielded, position.epoch
            yield batch
            if steps is not None and position.step >= steps:
                return
        if now is not None:
            training_state.set_rng_state(now)
        if yielded == 0:
            if position.epoch > 1:
                warn_user(
                    f"data yielded no batches in epoch {position.epoch}: stopped after {position.step} steps. A one-shot "
                    "iterator or generator can be read only once; pass a list or a re-iterable (such as a DataLoader) "
                    "to train longer",
                )
            return
        position.epoch, position.index = position.epoch + 1, 0
        yield END_OF_EPOCH


def total_steps(data: Iterable, epochs: int, steps: Optional[int]) -> tuple[Optional[int], str]:
    """Steps of the whole run (for the schedule), with several processes of the shortest shard; None when
    they are not known, with why ("" for empty data: the run ends in a "yielded no batches" error)."""
    if steps is not None:
        return steps, ""
    try:
        per_epoch = len(data)  # type: ignore[arg-type]
    except TypeError:
        per_epoch = -1  # unknown
    shortest, longest = distributed.global_min(per_epoch), -distributed.global_min(-per_epoch)
    if shortest != longest and shortest >= 0 and distributed.is_main():
        warn_user(
            f"the processes' shards hold {shortest} to {longest} batches: every process trains {shortest} steps "
            "per epoch (the shortest shard) and the rest is not used",
        )
    if shortest < 0:
        return (
            None,
            "data has no len()" if not distributed.active() else "the data of at least one process has no len()",
        )
    return (epochs * shortest if shortest > 0 else None), ""

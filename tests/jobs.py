"""What each process of a distributed test runs (see multiprocess.py); the tests compare the results.

Every process builds the same seeded model and the same seeded batches, then keeps its shard:
batch i goes to rank i mod world size, as the CLI shards. Results are written to the folder as
rank<N>.pt (state_dicts, plans) or rank<N>.json (errors), for the test to read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import convsep
from helpers import DiesAfter, Killed


def net() -> nn.Module:
    """Small, no batch norm (so one process on the global batch is the same computation), grouped conv and biases."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(8, 6, 3, stride=2), nn.Flatten(), nn.Linear(6 * 3 * 3, 4),
    ).double()  # fmt: skip


def batches(count: int = 6, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(size, 3, 8, 8, generator=generator, dtype=torch.float64), torch.randint(0, 4, (size,), generator=generator))
        for _ in range(count)
    ]


def shard(items: list) -> list:
    return items[dist.get_rank() :: dist.get_world_size()]


def save(folder: str, result) -> None:
    torch.save(result, Path(folder) / f"rank{dist.get_rank()}.pt")


def record_error(folder: str, run) -> None:
    """Run `run()`; write the error it raised (type, message) or None, so the test can compare the ranks."""
    try:
        run()
        outcome = None
    except Exception as error:
        outcome = {"type": type(error).__name__, "message": str(error), "convsep": isinstance(error, convsep.ConvsepError)}
    (Path(folder) / f"rank{dist.get_rank()}.json").write_text(json.dumps(outcome))


# --- calibrate -----------------------------------------------------------------------------------


def calibrate_unequal_shards(folder: str) -> None:
    """Five batches of different sizes: rank 0 gets three, rank 1 two."""
    model = net()
    data = [x[: 2 + i % 3] for i, (x, _) in enumerate(batches(5))]
    converted = convsep.convert(model, rank=1)
    convsep.calibrate(converted, model, shard(data), alternate=1)
    save(folder, {"state": converted.state_dict(), "calibration": converted.convsep_plan.calibration})


def calibrate_kept_unequal_shards(folder: str) -> None:
    """As calibrate_unequal_shards, with the middle conv kept and refitted (the head has too few samples)."""
    model = net()
    data = [x[: 2 + i % 3] for i, (x, _) in enumerate(batches(5))]
    converted = convsep.convert(model, rank=1, exclude=["2"])
    convsep.calibrate(converted, model, shard(data), alternate=1, refit_kept=True)
    save(folder, {"state": converted.state_dict(), "calibration": converted.convsep_plan.calibration})


def calibrate_at_once_unequal_shards(folder: str) -> None:
    """As calibrate_unequal_shards, every pair fitted at once on the original's inputs."""
    model = net()
    data = [x[: 2 + i % 3] for i, (x, _) in enumerate(batches(5))]
    converted = convsep.convert(model, rank=1)
    convsep.calibrate(converted, model, shard(data), alternate=1, sequential=False)
    save(folder, {"state": converted.state_dict(), "calibration": converted.convsep_plan.calibration})


def calibrate_empty_shard(folder: str, sequential: bool = True) -> None:
    model = net()
    data = [x for x, _ in batches(3)] if dist.get_rank() == 0 else []
    converted = convsep.convert(model, rank=1)
    convsep.calibrate(converted, model, data, sequential=sequential)
    save(folder, {"state": converted.state_dict(), "calibration": converted.convsep_plan.calibration})


def calibrate_at_once_empty_shard(folder: str) -> None:
    calibrate_empty_shard(folder, sequential=False)


def calibrate_bad_batch_on_rank_1(folder: str) -> None:
    model = net()
    data = [x for x, _ in batches(2)]
    if dist.get_rank() == 1:
        data[1] = torch.randn(2, 5, 8, 8, dtype=torch.float64)  # five channels: the model takes three
    converted = convsep.convert(model, rank=1)
    record_error(folder, lambda: convsep.calibrate(converted, model, data))


def calibrate_different_models(folder: str) -> None:
    model = net()
    converted = convsep.convert(model, rank=1 + dist.get_rank())  # rank 1 was handed another conversion
    record_error(folder, lambda: convsep.calibrate(converted, model, [x for x, _ in batches(2)]))


# --- finetune ------------------------------------------------------------------------------------


def _student_and_teacher():
    teacher = net()
    return convsep.convert(teacher, rank=2), teacher


def finetune_sharded(folder: str) -> None:
    """Six batches of four, two epochs: every step sees two batches (one per rank)."""
    student, teacher = _student_and_teacher()
    convsep.finetune(student, shard(batches(6)), teacher=teacher, epochs=2, lr=1e-2, verbose=False)
    save(folder, {"state": student.state_dict()})


def finetune_sharded_killed_then_resumed(folder: str) -> None:
    """finetune_sharded, killed on both ranks in its second epoch after a checkpoint at step 2 of it (steps of 3
    per epoch, save_every=5), then resumed in the same processes from the file rank 0 wrote."""
    state = Path(folder) / "state.pt"
    student, teacher = _student_and_teacher()
    try:
        convsep.finetune(student, DiesAfter(shard(batches(6)), 5), teacher=teacher, epochs=2, lr=1e-2,
                         verbose=False, save_state=state, save_every=5)  # fmt: skip
    except Killed:
        pass
    else:
        raise AssertionError("the run was not killed")
    student, teacher = _student_and_teacher()
    with torch.no_grad():  # what the state holds must win: weights, optimiser, schedule, position, generators
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    convsep.finetune(student, shard(batches(6)), teacher=teacher, epochs=2, lr=1e-2, verbose=False, resume=state)
    save(folder, {"state": student.state_dict()})


def finetune_different_models(folder: str) -> None:
    """Rank 1 was handed another conversion of the teacher: no process may train."""
    teacher = net()
    student = convsep.convert(teacher, rank=2 + dist.get_rank())
    record_error(folder, lambda: convsep.finetune(student, shard(batches(4)), teacher=teacher, verbose=False))


def validation_batches() -> list:
    """Four batches the training batches do not include."""
    return batches(10)[6:]


VALIDATED = {"epochs": 2, "lr": 1e-2, "alpha": 1.0, "warmup": 0.0, "val_every": 1}  # the best state is step 3 of 6


def finetune_validated(folder: str) -> None:
    """Validation every step on sharded validation batches: every rank must keep the same best state."""
    student, teacher = _student_and_teacher()
    convsep.finetune(student, shard(batches(6)), teacher=teacher, val_data=shard(validation_batches()), verbose=False,
                     **VALIDATED)  # fmt: skip
    save(folder, {"state": student.state_dict(), "finetune": student.convsep_plan.finetune})


def finetune_unequal_shards(folder: str) -> None:
    """Seven batches: rank 0 gets four, rank 1 three; every rank trains three steps."""
    student, teacher = _student_and_teacher()
    convsep.finetune(student, shard(batches(7)), teacher=teacher, lr=1e-2, verbose=False)
    save(folder, {"state": student.state_dict()})


def finetune_with_batch_norm(folder: str) -> None:
    """Batch norm: each rank normalises with its own batch statistics; all end with rank 0's running ones."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(288, 4))
    teacher = teacher.double().eval()
    student = convsep.convert(teacher, rank=2)
    convsep.finetune(student, shard(batches(4)), teacher=teacher, lr=1e-2, verbose=False)
    save(folder, {"state": student.state_dict()})


def finetune_nan_on_rank_1(folder: str) -> None:
    student, teacher = _student_and_teacher()
    data = shard(batches(6))
    if dist.get_rank() == 1:
        x, y = data[1]
        data[1] = (torch.full_like(x, float("nan")), y)
    # no second chance: the step is not undone and retried, training stops there
    record_error(folder, lambda: convsep.finetune(student, data, teacher=teacher, nonfinite_retries=0, verbose=False))
    save(folder, {"state": student.state_dict()})


def finetune_nan_on_rank_1_undone(folder: str) -> None:
    """A NaN in rank 1's second batch: every rank undoes step 2, halves the lr and goes on."""
    student, teacher = _student_and_teacher()
    convsep.finetune(student, shard(batches_with_a_nan()), teacher=teacher, lr=1e-2, verbose=False)
    save(folder, {"state": student.state_dict()})


def batches_with_a_nan() -> list:
    data = batches(6)
    data[3] = (torch.full_like(data[3][0], float("nan")), data[3][1])  # rank 1's second batch
    return data


def finetune_bad_batch_on_rank_0(folder: str) -> None:
    student, teacher = _student_and_teacher()
    data = shard(batches(4))
    if dist.get_rank() == 0:
        data[1] = (torch.randn(4, 2, 8, 8, dtype=torch.float64), data[1][1])
    record_error(folder, lambda: convsep.finetune(student, data, teacher=teacher, verbose=False))


# --- convert and report --------------------------------------------------------------------------


def convert_for_latency(folder: str) -> None:
    """Each rank times the layers; the plan must still be the same everywhere (rank 0's timings)."""
    model = net().float()
    x = torch.randn(2, 3, 8, 8)
    converted = convsep.convert(model, rank=1, objective="latency", example_inputs=x)
    timed = convsep.report(model, converted, x, latency=True, latency_runs=2)
    save(folder, {"plan": converted.convsep_plan.to_json(), "latency": timed.totals["latency_after_ms"]})


# --- data for the CLI under torchrun (--calibrate-with / --data jobs.py:<name>) -------------------


def calibration_batches() -> list[torch.Tensor]:
    return [x[: 2 + i % 3] for i, (x, _) in enumerate(batches(5))]


def more_calibration_batches() -> list[torch.Tensor]:
    """Enough sampled patches for the joint fit of the grouped conv (4 per column of its 36-wide moments)."""
    return [x for x, _ in batches(7, size=8)]


def training_batches() -> list:
    return batches(6)


def merged_training_batches() -> list:
    """What one process trains on to match two: each step's two batches (i, i + 1), concatenated."""
    data = batches(6)
    return [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(data[0::2], data[1::2])]


def training_batches_bad_at_3() -> list:
    """Batch 3 goes to rank 1 (3 mod 2), as its second batch: five channels where the model takes three."""
    data = batches(6)
    data[3] = (torch.randn(4, 5, 8, 8, dtype=torch.float64), data[3][1])
    return data

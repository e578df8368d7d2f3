"""Training checkpoints: what the file holds and when it is written, resuming from the awkward places,
and the files that are refused (missing, damaged, pickled code, another model or plan)."""

import re
import sys

import pytest
import torch
from torch import nn

import convsep
from convsep import training_state
from helpers import DiesAfter, Killed, assert_bitwise_equal, snapshot


def whole(message: str) -> str:
    return "^" + re.escape(message) + "$"


class DiesAtTaking(DiesAfter):
    """DiesAfter, where the request that finds an epoch's end also counts as asking for a batch."""

    def __iter__(self):
        yield from super().__iter__()
        if self.left == 0:
            raise Killed


def setup(converted: bool = True):
    """A float64 net with batch norm and dropout (random on every step), its conversion, a shuffling DataLoader."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(),
                            nn.Linear(288, 4)).double().eval()  # fmt: skip
    x, y = torch.randn(32, 3, 8, 8, dtype=torch.float64), torch.randint(0, 4, (32,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True)
    student = convsep.convert(teacher, rank=1) if converted else teacher
    return student, (teacher if converted else None), loader, [(x[:16], y[:16])]


def run(state, data=None, converted=True, **options):
    student, teacher, loader, val = setup(converted)
    torch.manual_seed(1)
    convsep.finetune(student, loader if data is None else data(loader), teacher=teacher, epochs=2, lr=1e-2, val_data=val,
                     verbose=False, save_state=state, **options)  # fmt: skip
    return student


def killed_then_resumed(tmp_path, killed_at: int, converted=True, edit_state=None, **options):
    with pytest.raises(Killed):
        run(tmp_path / "state.pt", data=lambda loader: DiesAtTaking(loader, killed_at), converted=converted, **options)
    if edit_state is not None:
        edit_state(tmp_path / "state.pt")
    torch.manual_seed(123)  # whatever the generators hold now, the checkpoint's state is what counts
    return run(tmp_path / "state.pt", converted=converted, resume=tmp_path / "state.pt", **options)


def test_the_training_state_holds_what_a_run_needs_to_continue(tmp_path):
    run(tmp_path / "state.pt")  # 4 batches an epoch, 2 epochs: the last write is after epoch 2
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert set(state) == {"convsep_training_state", "fingerprint", "model", "optimizer", "schedule", "scaler", "history",
                          "position", "rng", "run"}  # fmt: skip
    assert state["scaler"] is None  # float32 training has no gradient scaler
    assert state["schedule"] == {"step": 8, "scale": 1.0}
    assert state["position"] == {"epoch": 3, "index": 0, "step": 8, "epoch_of_last_step": 2}
    assert state["run"] == {"rollbacks": 0, "applied": 8, "since": [0.0, 0.0]}  # train loss since the last evaluation
    assert len(state["rng"]) == 1 and set(state["rng"][0]) == {"epoch_start", "now"}


def test_save_every_writes_after_every_so_many_steps_and_after_each_epoch(tmp_path, monkeypatch):
    written, save = [], training_state.save
    monkeypatch.setattr(training_state, "save", lambda path, state: (written.append(state["position"]), save(path, state)))
    run(tmp_path / "state.pt", save_every=3)
    assert [(p["step"], p["epoch"], p["index"]) for p in written] == [(3, 1, 3), (4, 2, 0), (6, 2, 2), (8, 3, 0)]


def test_a_run_killed_after_its_last_step_of_an_epoch_was_saved_resumes_to_the_same_end(tmp_path):
    """Saved at step 4 (save_every), killed when asking for a 5th batch of epoch 1: the resumed run replays the
    epoch's 4 batches, ends the epoch (validation, its history row) and goes on as the uninterrupted one."""
    whole_run = run(tmp_path / "whole.pt", save_every=4)
    resumed = killed_then_resumed(tmp_path, killed_at=4, save_every=4)
    assert_bitwise_equal(snapshot(whole_run), resumed)
    assert resumed.convsep_plan.finetune["history"] == whole_run.convsep_plan.finetune["history"]


def test_resuming_in_one_process_the_state_of_several_continues_with_rank_0s_generators(tmp_path):
    whole_run = run(tmp_path / "whole.pt")

    def as_if_written_by_two_processes(path):
        state = torch.load(path, weights_only=True)
        torch.manual_seed(99)
        state["rng"].append({"epoch_start": training_state.rng_state(), "now": training_state.rng_state()})
        torch.save(state, path)

    resumed = killed_then_resumed(tmp_path, killed_at=5, edit_state=as_if_written_by_two_processes)
    assert_bitwise_equal(snapshot(whole_run), resumed)


def test_a_model_without_a_conversion_plan_is_saved_and_resumed(tmp_path):
    whole_run = run(tmp_path / "whole.pt", converted=False)
    resumed = killed_then_resumed(tmp_path, killed_at=5, converted=False)
    assert_bitwise_equal(snapshot(whole_run), resumed)


def another_model_message(path) -> str:
    return (f"{path} is the training state of another model or conversion plan (its parameters, their shapes or the "
            "converted layers and ranks differ from the model given): nothing was loaded")  # fmt: skip


def test_resuming_a_model_with_other_parameters_is_refused(tmp_path):
    path = tmp_path / "state.pt"
    convsep.finetune(nn.Linear(3, 2), [torch.ones(2, 3)], loss=lambda out, t, y: out.sum(), save_state=path, verbose=False)
    with pytest.raises(convsep.CheckpointError, match=whole(another_model_message(path))):
        convsep.finetune(nn.Linear(3, 4), [torch.ones(2, 3)], loss=lambda out, t, y: out.sum(), resume=path, verbose=False)


def test_resuming_the_same_parameters_under_another_conversion_plan_is_refused(tmp_path):
    path = tmp_path / "state.pt"
    run(path)
    student, teacher, loader, _ = setup()
    del student.convsep_plan  # the same layers and shapes, built by hand rather than converted
    with pytest.raises(convsep.CheckpointError, match=whole(another_model_message(path))):
        convsep.finetune(student, loader, teacher=teacher, resume=path, verbose=False)


def resume_from(path):
    convsep.finetune(nn.Linear(3, 2), [torch.ones(2, 3)], loss=lambda out, t, y: out.sum(), resume=path, verbose=False)


def test_resuming_from_a_missing_file_names_it(tmp_path):
    path = tmp_path / "missing.pt"
    with pytest.raises(convsep.CheckpointNotFoundError, match=whole(f"the training state {str(path)!r} to resume from does not exist")):
        resume_from(path)


def test_resuming_from_a_damaged_file_names_it_and_the_error(tmp_path):
    path = tmp_path / "damaged.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(convsep.CheckpointError, match="^" + re.escape(f"{path} is not a convsep training state (UnpicklingError: ")):
        resume_from(path)


def test_resuming_from_a_file_that_is_not_a_training_state_says_so(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(convsep.CheckpointError, match=whole(
        f"{path} is not a convsep training state (written by finetune with a state path)"
    )):
        resume_from(path)


RAN = []


def code_in_the_file():
    RAN.append(True)


class Pickled:
    def __reduce__(self):
        return code_in_the_file, ()


def test_a_training_state_is_read_without_running_code_pickled_in_it(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"convsep_training_state": training_state.FORMAT, "payload": Pickled()}, path)
    assert sys.modules[Pickled.__module__] is not None  # unpickling could find the function
    with pytest.raises(convsep.CheckpointError, match="^" + re.escape(f"{path} is not a convsep training state (UnpicklingError: ")):
        resume_from(path)
    assert RAN == []

"""Fine-tuning behaviour the mutation run (issue #17) found untested: the train loss carried in a training
state and resuming a state written without it; a conversion that converted nothing resuming its original's
state; reading a state weights-only whatever the environment says; a GPU run's state (CUDA tensors, a
float16 gradient scaler) resumed on the CPU; accuracy against probability rows."""

import re

import pytest
import torch
from helpers import assert_bitwise_equal, snapshot
from torch import nn

import convsep
from convsep import training_state
from convsep.finetune import _structure
from convsep.plan import plan_of
from convsep.validation import evaluate


def loss_is_the_target(out, teacher_out, targets):
    """The loss of a batch is its target (a number), with a zero gradient: the values a run sees are known exactly."""
    return out.sum() * 0 + targets.sum()


def numbered_batches(*losses: float) -> list:
    return [(torch.ones(2, 3), torch.tensor([loss])) for loss in losses]


# --- the train loss since the last evaluation, in the training state -----------------------------


def test_without_validation_the_training_state_carries_the_sum_of_every_train_loss_so_far(tmp_path):
    path = tmp_path / "state.pt"
    convsep.finetune(nn.Linear(3, 2), numbered_batches(0.25, 0.5, 2.0), loss=loss_is_the_target, save_state=path,
                     verbose=False)  # fmt: skip
    state = torch.load(path, weights_only=True)
    assert state["run"] == {"rollbacks": 0, "applied": 3, "since": [2.75, 3.0]}  # nothing evaluated: nothing reset


def test_a_training_state_written_without_the_train_loss_so_far_resumes_counting_from_the_resume(tmp_path):
    """A state that lacks run["since"] (written before it was kept) resumes as if no step had been trained since
    the last evaluation: the next history row's train loss is the mean over the steps after the resume."""
    path, data, val = tmp_path / "state.pt", numbered_batches(1.0, 2.0, 3.0, 4.0), numbered_batches(9.0)
    options = dict(loss=loss_is_the_target, val_data=val, verbose=False)
    convsep.finetune(nn.Linear(3, 2), data, steps=2, save_state=path, save_every=2, **options)
    state = torch.load(path, weights_only=True)
    assert state["run"].pop("since") == [3.0, 2.0]  # steps 1 and 2, since the evaluation at step 0
    torch.save(state, path)
    model = convsep.finetune(nn.Linear(3, 2), data, steps=4, resume=path, **options)
    assert [(r["step"], r["train_loss"]) for r in model.convsep_finetune["history"]] == [
        (0, None),
        (4, (3.0 + 4.0) / 2),
    ]


def test_a_conversion_that_converted_nothing_resumes_the_state_of_the_model_it_came_from(tmp_path):
    """The fingerprint names the converted layers: a plan without any is no different from no plan."""
    path, data = tmp_path / "state.pt", numbered_batches(1.0, 2.0)
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(3, 2))
    convsep.finetune(original, data, loss=loss_is_the_target, save_state=path, verbose=False)
    converted = convsep.convert(original)
    assert plan_of(converted) is not None and plan_of(converted).converted == []  # a Linear: nothing to convert
    model = convsep.finetune(
        converted, data, epochs=2, loss=loss_is_the_target, resume=path, val_data=data, verbose=False
    )
    assert model.convsep_plan.finetune["steps"] == 4  # epoch 1 came from the state, epoch 2 was trained


# --- reading a training state --------------------------------------------------------------------

RAN = []


def code_in_the_file():
    RAN.append(True)
    return "ran"


class Pickled:
    def __reduce__(self):
        return code_in_the_file, ()


def test_a_training_state_is_read_weights_only_even_when_the_environment_lets_torch_unpickle(tmp_path, monkeypatch):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turns torch.load's default to full unpickling: only an explicit
    weights_only=True keeps code in the file from running."""
    model = nn.Linear(3, 2)
    path = tmp_path / "pickled.pt"
    torch.save(
        {"convsep_training_state": training_state.FORMAT, "fingerprint": _structure(model), "run": Pickled()}, path
    )
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(
        convsep.CheckpointError, match="^" + re.escape(f"{path} is not a convsep training state (UnpicklingError: ")
    ):
        training_state.load(path, _structure(model))
    assert RAN == []


def written_on_a_gpu(path, state) -> None:
    """Save `state` as a CUDA run does: every tensor tagged with the device it lived on ("cuda:0")."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, path)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="a CPU-only machine: where a GPU's training state must still load"
)
def test_a_training_state_written_on_a_gpu_loads_onto_the_cpu(tmp_path):
    path = tmp_path / "state.pt"
    convsep.finetune(nn.Linear(3, 2), numbered_batches(1.0), loss=loss_is_the_target, save_state=path, verbose=False)
    state = torch.load(path, weights_only=True)
    written_on_a_gpu(path, state)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(path, weights_only=True)  # as written: on a device this machine does not have
    loaded = training_state.load(path, _structure(nn.Linear(3, 2)))
    assert loaded["model"].keys() == state["model"].keys()
    for name, value in state["model"].items():
        assert loaded["model"][name].device.type == "cpu" and torch.equal(loaded["model"][name], value), name


def test_a_training_state_with_a_float16_gradient_scaler_resumes_without_one(tmp_path):
    """A CUDA run in float16 saves its GradScaler; resumed in float32 (here, on the CPU) there is no scaler to
    load it into, and the run goes on as from the same state without one."""
    path, with_scaler, data = tmp_path / "state.pt", tmp_path / "with_scaler.pt", numbered_batches(1.0, 2.0)
    convsep.finetune(nn.Linear(3, 2), data, loss=loss_is_the_target, save_state=path, verbose=False)
    state = torch.load(path, weights_only=True)
    assert state["scaler"] is None
    state["scaler"] = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                       "_growth_tracker": 0}  # fmt: skip  # torch.amp.GradScaler("cuda").state_dict() after a step
    torch.save(state, with_scaler)
    resumed = [convsep.finetune(nn.Linear(3, 2), data, epochs=2, loss=loss_is_the_target, resume=state_path,
                                verbose=False) for state_path in (path, with_scaler)]  # fmt: skip
    assert_bitwise_equal(snapshot(resumed[0]), resumed[1])


# --- validation accuracy -------------------------------------------------------------------------


def test_accuracy_against_probability_rows_takes_the_top_class_of_each_row():
    logits = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [3.0, 0.0, 0.0]])  # top classes 1, 2, 0
    probabilities = torch.tensor([[0.2, 0.7, 0.1], [0.1, 0.3, 0.6], [0.5, 0.3, 0.2]])  # top classes 1, 2, 0
    evaluation = evaluate([(torch.tensor(1.0), logits, probabilities)], lambda batch, where: batch)
    assert evaluation.accuracy == 1.0

"""finetune's arguments: every bad one is refused with the message that names it, every edge of the
allowed ranges is accepted. The messages are asserted whole: they are what a user reads."""

import math
import re

import pytest
import torch
from torch import nn

import convsep


def whole(message: str) -> str:
    """A `match=` pattern for exactly this message."""
    return "^" + re.escape(message) + "$"


def square(out, teacher_out, targets):
    return out.square().mean()


class OldStyleSequence:
    """Batches through __getitem__ alone (Python's old iteration protocol): no __iter__, no __len__."""

    def __init__(self, batches):
        self.batches = batches

    def __getitem__(self, index):
        return self.batches[index]


BATCH = torch.ones(2, 3)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"model": "net"}, convsep.ConvsepTypeError, "model must be a torch.nn.Module, got str"),
    ({"teacher": "net"}, convsep.ConvsepTypeError, "teacher must be a torch.nn.Module or None, got str"),
    ({"data": 5}, convsep.ConvsepTypeError, "data must be an iterable of batches (a list, a DataLoader, ...), got int"),
    ({"data": lambda: [BATCH]}, convsep.ConvsepTypeError,
     "data must be an iterable of batches (a list, a DataLoader, ...), got function (did you mean to call it?)"),
    ({"epochs": 0}, convsep.ConvsepValueError, "epochs must be a positive int, got 0"),
    ({"epochs": True}, convsep.ConvsepValueError, "epochs must be a positive int, got True"),
    ({"steps": 0}, convsep.ConvsepValueError, "steps must be a positive int, got 0"),
    ({"warmup": 1.0}, convsep.ConvsepValueError, "warmup must be a fraction of the steps in [0, 1), got 1.0"),
    ({"warmup": 1.5}, convsep.ConvsepValueError, "warmup must be a fraction of the steps in [0, 1), got 1.5"),
    ({"warmup": "0.1"}, convsep.ConvsepValueError, "warmup must be a fraction of the steps in [0, 1), got '0.1'"),
    ({"lr": math.nan}, convsep.ConvsepValueError, "lr must be a positive finite number, got nan"),
    ({"lr": math.inf}, convsep.ConvsepValueError, "lr must be a positive finite number, got inf"),
    ({"lr": True}, convsep.ConvsepValueError, "lr must be a positive finite number, got True"),
    ({"lr": None}, convsep.ConvsepValueError, "lr must be a positive finite number, got None"),
    ({"temperature": 0}, convsep.ConvsepValueError, "temperature must be a positive finite number, got 0"),
    ({"clip_grad_norm": -1.0}, convsep.ConvsepValueError, "clip_grad_norm must be a positive finite number, got -1.0"),
    ({"alpha": 1.5}, convsep.ConvsepValueError, "alpha must be in [0, 1] (the weight of the teacher's term), got 1.5"),
    ({"alpha": True}, convsep.ConvsepValueError, "alpha must be in [0, 1] (the weight of the teacher's term), got True"),
    ({"weight_decay": -1.0}, convsep.ConvsepValueError, "weight_decay must be a non-negative number or None, got -1.0"),
    ({"weight_decay": math.inf}, convsep.ConvsepValueError, "weight_decay must be a non-negative number or None, got inf"),
    ({"loss": "hinge"}, convsep.ConvsepValueError, "loss='hinge' is not known: use one of 'auto', 'kl', 'mse' or a callable"),
    ({"optimizer": "lbfgs"}, convsep.ConvsepValueError, "optimizer='lbfgs' is not known: use one of 'adamw', 'sgd'"),
    ({"trainable": "some"}, convsep.ConvsepValueError,
     "trainable='some' is not known: use one of 'all', 'separable' or a callable (name, parameter) -> bool"),
    ({"trainable": "separable"}, convsep.ConvsepValueError,
     "trainable='separable' but the model has no SeparableConv layers: convert it first, or use trainable='all'"),
    ({"val_data": torch.ones(2, 3)}, convsep.ConvsepTypeError,
     "val_data must be an iterable of batches (a list, a DataLoader, ...), got Tensor"),
    ({"val_data": [BATCH], "val_every": 0}, convsep.ConvsepValueError, "val_every must be an int >= 1, got 0"),
    ({"val_data": [BATCH], "val_every": 2.5}, convsep.ConvsepValueError, "val_every must be an int >= 1, got 2.5"),
    ({"val_data": [BATCH], "val_every": True}, convsep.ConvsepValueError, "val_every must be an int >= 1, got True"),
    ({"save_state": "s.pt", "save_every": 0}, convsep.ConvsepValueError, "save_every must be an int >= 1, got 0"),
    ({"nonfinite_retries": -1}, convsep.ConvsepValueError, "nonfinite_retries must be an int >= 0, got -1"),
    ({"nonfinite_retries": None}, convsep.ConvsepValueError, "nonfinite_retries must be an int >= 0, got None"),
    ({"val_every": 5}, convsep.ConvsepValueError, "val_every=5 needs val_data: the batches to validate on"),
    ({"save_every": 2}, convsep.ConvsepValueError, "save_every=2 needs save_state: the path of the training checkpoint"),
])  # fmt: skip
def test_a_bad_argument_is_refused_with_a_message_naming_it(kwargs, error, message):
    arguments = {"model": nn.Linear(3, 2), "data": [BATCH], "loss": square, "verbose": False, **kwargs}
    with pytest.raises(error, match=whole(message)):
        convsep.finetune(arguments.pop("model"), arguments.pop("data"), **arguments)


def test_trainable_selecting_nothing_is_refused():
    def nothing(name, parameter):
        return False

    with pytest.raises(convsep.ConvsepValueError, match=whole(
        f"trainable={nothing!r} selects no parameter that requires grad: nothing to train"
    )):
        convsep.finetune(nn.Linear(3, 2), [BATCH], loss=square, trainable=nothing, verbose=False)


def test_a_teacher_that_is_the_model_is_refused():
    model = nn.Linear(3, 2)
    with pytest.raises(convsep.ConvsepValueError, match=whole(
        "teacher is the model being fine-tuned: pass the original model (convert returns a copy unless inplace=True)"
    )):
        convsep.finetune(model, [BATCH], teacher=model, verbose=False)


def test_a_teacher_sharing_parameters_with_the_model_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    teacher = nn.Sequential(model[0], nn.Linear(4, 2))  # shares the first layer's weight and bias
    with pytest.raises(convsep.ConvsepValueError, match=whole(
        "the teacher shares 2 parameter(s) with the model, so training would change the teacher: "
        "pass an independent copy of the original (convsep.convert without inplace=True gives one)"
    )):
        convsep.finetune(model, [BATCH], teacher=teacher, verbose=False)


@pytest.mark.parametrize("kwargs", [
    {"alpha": 0.0, "teacher": nn.Linear(3, 2)},
    {"alpha": 1.0, "teacher": nn.Linear(3, 2)},
    {"warmup": 0.0},
    {"steps": 1},
    {"clip_grad_norm": None},
    {"nonfinite_retries": 0},
    {"val_data": [(BATCH, torch.tensor([0, 1]))], "val_every": 1},
    {"val_data": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(BATCH, torch.tensor([0, 1])), batch_size=2)},
    {"val_data": OldStyleSequence([(BATCH, torch.tensor([0, 1]))])},
    {"data": OldStyleSequence([(BATCH, torch.tensor([0, 1]))])},
], ids=["alpha_0", "alpha_1", "warmup_0", "steps_1", "clip_none", "retries_0", "val_every_1", "val_dataloader",
        "val_sequence", "data_sequence"])  # fmt: skip
def test_the_edges_of_the_allowed_values_are_accepted(kwargs):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    before = model.weight.detach().clone()
    arguments = {"data": [(BATCH, torch.tensor([0, 1]))], "verbose": False, **kwargs}
    convsep.finetune(model, arguments.pop("data"), **arguments)
    assert not torch.equal(model.weight, before)  # it trained

"""What finetune says when training cannot go on: bad batches, bad targets, a model or teacher that
fails, a loss that is not finite. Each message is asserted whole, with the batch and step it names."""

import re
import warnings

import pytest
import torch
from torch import nn

import convsep
from helpers import assert_bitwise_equal, snapshot


def whole(message: str) -> str:
    return "^" + re.escape(message) + "$"


def square(out, teacher_out, targets):
    return out.square().mean()


class Fails(nn.Linear):
    """A layer with parameters whose forward rejects every input."""

    def __init__(self):
        super().__init__(3, 2)

    def forward(self, x):
        raise ValueError("no")


NAN = torch.full((2, 3), float("nan"))
GOOD = torch.ones(2, 3)


@pytest.mark.parametrize("data, kind", [([], "list"), (iter([]), "list_iterator"), ((x for x in []), "generator")])
def test_data_that_yields_nothing_is_one_error_without_a_warning(data, kind):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "one-shot iterator" warning for the first epoch
        with pytest.raises(convsep.ConvsepValueError, match=whole(
            f"data yielded no batches ({kind} was empty here): pass an iterable of input tensors or (inputs, targets) tuples"
        )):
            convsep.finetune(nn.Linear(3, 2), data, loss=square, verbose=False)


def test_a_one_shot_generator_warns_that_it_gave_one_epoch():
    generator = (torch.randn(2, 3) for _ in range(3))
    with pytest.warns(UserWarning, match=whole(
        "data yielded no batches in epoch 2: stopped after 3 steps. A one-shot iterator or generator can be read only "
        "once; pass a list or a re-iterable (such as a DataLoader) to train longer"
    )):
        convsep.finetune(nn.Linear(3, 2), generator, epochs=2, loss=square, verbose=False)


def test_the_one_shot_warning_points_at_the_callers_line():
    generator = (torch.randn(2, 3) for _ in range(3))
    with pytest.warns(UserWarning, match="one-shot") as record:
        convsep.finetune(nn.Linear(3, 2), generator, epochs=2, loss=square, verbose=False)
    assert [w.filename for w in record] == [__file__]


def test_every_step_non_finite_says_how_many_steps_and_what_to_do():
    with pytest.raises(convsep.NonFiniteLossError, match=whole(
        "every one of the 2 steps had a NaN or infinite loss or gradient: the model was not changed. "
        "Look for NaN/inf in the data, or lower lr"
    )):
        convsep.finetune(nn.Linear(3, 2), [NAN, NAN], loss=square, verbose=False)


def test_a_nan_loss_at_the_first_step_names_the_step_of_the_total_and_keeps_the_weights_from_before():
    with pytest.raises(convsep.NonFiniteLossError, match=whole(
        "fine-tuning stopped at step 1 of 2 (epoch 1): the loss is nan. The model keeps its weights from before "
        "fine-tuning. Lower lr (now 0.001), clip gradients, or look for NaN/inf in the data"
    )):
        convsep.finetune(nn.Linear(3, 2), [NAN, GOOD], loss=square, warmup=0.0, nonfinite_retries=0, verbose=False)


def test_a_nan_loss_after_a_good_step_keeps_the_weights_of_that_step_and_data_without_len_gives_no_total():
    with pytest.raises(convsep.NonFiniteLossError, match=whole(
        "fine-tuning stopped at step 2 (epoch 1): the loss is nan. The model keeps the weights of the last finite "
        "step. Lower lr (now 0.001), clip gradients, or look for NaN/inf in the data"
    )):
        convsep.finetune(nn.Linear(3, 2), (b for b in [GOOD, NAN]), loss=square, nonfinite_retries=0, verbose=False)


def test_giving_up_after_undone_steps_only_says_the_weights_are_from_before_fine_tuning():
    """Bug fixed: with every earlier step undone, no step was finite; the message said "the last finite step"."""
    model = nn.Linear(3, 2)
    nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    before = snapshot(model)
    root = lambda out, teacher_out, targets: out.abs().sqrt().sum()  # noqa: E731  (0 at 0; its gradient is not finite)
    with pytest.raises(convsep.NonFiniteLossError, match=whole(
        "fine-tuning stopped at step 2 of 2 (epoch 2): the gradient norm is nan (1 earlier step(s) undone already). "
        "The model keeps its weights from before fine-tuning. Lower lr (now 0.00025), clip gradients, or look for "
        "NaN/inf in the data"
    )):
        convsep.finetune(model, [GOOD], epochs=2, loss=root, warmup=0.0, nonfinite_retries=1, verbose=False)
    assert_bitwise_equal(before, model)
    assert all(p.grad is None for p in model.parameters())  # the undone step's NaN gradients are gone too


def test_the_default_is_three_retries():
    with pytest.raises(convsep.NonFiniteLossError, match=r"^fine-tuning stopped at step 5 of 5 \(epoch 1\): the loss is "
                       r"nan \(3 earlier step\(s\) undone already\)\. The model keeps the weights of the last finite step\."):
        convsep.finetune(nn.Linear(3, 2), [GOOD, NAN, NAN, NAN, NAN], loss=square, verbose=False)


def test_a_model_that_fails_on_a_batch_is_named_with_the_inputs_and_its_error():
    with pytest.raises(convsep.InputShapeError, match=whole(
        "batch 1: the model cannot run on inputs (2, 3) float32: ValueError: no"
    )):
        convsep.finetune(Fails(), [GOOD], teacher=nn.Linear(3, 2), verbose=False)


def test_a_teacher_that_fails_on_a_batch_is_named_as_the_teacher():
    with pytest.raises(convsep.InputShapeError, match=whole(
        "batch 1: the teacher cannot run on inputs (2, 3) float32: ValueError: no"
    )):
        convsep.finetune(nn.Linear(3, 2), [GOOD], teacher=Fails(), verbose=False)


def test_a_teacher_whose_output_does_not_match_names_the_batch_and_both_shapes():
    with pytest.raises(convsep.ConvsepValueError, match=whole(
        "batch 1: the teacher's output is (2, 5) float32 but the student's is (2, 2) float32: the teacher must be "
        "the model the student was converted from"
    )):
        convsep.finetune(nn.Linear(3, 2), [GOOD], teacher=nn.Linear(3, 5), verbose=False)


def test_a_batch_without_targets_and_no_teacher_is_named():
    with pytest.raises(convsep.ConvsepValueError, match=whole(
        "batch 1 carries no targets and no teacher was given: pass teacher=the original model, or batches (inputs, targets)"
    )):
        convsep.finetune(nn.Linear(3, 2), [GOOD], verbose=False)


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x):
        return self.linear(x), self.linear(x)


def test_a_model_returning_a_tuple_needs_a_loss_callable():
    with pytest.raises(convsep.ConvsepTypeError, match=whole(
        "the model returns tuple, not a tensor: pass loss=callable(student_out, teacher_out, targets) -> scalar tensor"
    )):
        convsep.finetune(TwoOutputs(), [(GOOD, torch.tensor([0, 1]))], verbose=False)


@pytest.mark.parametrize("returned, described", [(lambda out: 1.0, "a float"), (lambda out: out[0, 0].repeat(3), "(3,) float32")])
def test_a_loss_callable_must_return_a_scalar_tensor(returned, described):
    with pytest.raises(convsep.ConvsepTypeError, match=whole(f"loss callable must return a scalar tensor, got {described}")):
        convsep.finetune(nn.Linear(3, 2), [GOOD], loss=lambda out, teacher_out, targets: returned(out), verbose=False)


X4 = torch.ones(4, 3)


@pytest.mark.parametrize("targets, message", [
    (torch.zeros(3, dtype=torch.long),
     "batch 1: class indices of shape (3,) do not fit the model's output of shape (4, 4): expected shape (4,)"),
    (torch.full((4, 3), 0.25),
     "batch 1: targets of shape (4, 3) do not fit the model's output of shape (4, 4): expected shape (4, 4)"),
    (torch.tensor([0, 1, 4, 2]), "batch 1: class index 4 is outside [0, 4) for a model with 4 outputs"),
    (torch.tensor([0, 5, -1, 2]), "batch 1: class index -1 is outside [0, 4) for a model with 4 outputs"),
])  # fmt: skip
def test_targets_that_do_not_fit_the_output_are_named(targets, message):
    error = convsep.InputShapeError if "shape" in message else convsep.ConvsepValueError
    with pytest.raises(error, match=whole(message)):
        convsep.finetune(nn.Linear(3, 4), [(X4, targets)], verbose=False)


def test_targets_that_are_not_a_tensor_are_named():
    from convsep.losses import Objective

    with pytest.raises(convsep.ConvsepTypeError, match=whole("batch 1: targets must be a tensor, got list")):
        Objective("auto", 2.0, 0.5)(torch.zeros(4, 4), None, [0, 1, 2, 3], "batch 1")


def test_empty_data_with_a_len_is_not_logged_as_data_without_one(caplog):
    with caplog.at_level("INFO", logger="convsep.finetune"):
        with pytest.raises(convsep.ConvsepValueError, match="data yielded no batches"):
            convsep.finetune(nn.Linear(3, 2), [], loss=square, verbose=False)
    assert not [r for r in caplog.records if "len()" in r.getMessage()], caplog.text


def test_data_without_a_len_is_logged_as_such(caplog):
    with caplog.at_level("INFO", logger="convsep.finetune"):
        convsep.finetune(nn.Linear(3, 2), (torch.randn(2, 3) for _ in range(2)), loss=square, verbose=False)
    assert "data has no len() and steps is None: training at a constant lr of" in caplog.text

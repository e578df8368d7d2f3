"""Validation during fine-tuning: the evaluation's numbers, the history and its rows, the best state
kept, and what a run prints, logs and shows on its progress bar."""

import logging
import math
import sys

import pytest
import torch
from torch import nn

import convsep
from convsep.validation import History, evaluate, format_row


def batch_loss(value: float, out, targets=None):
    """A validation batch whose loss is `value` (in float64) for outputs `out`."""
    return torch.tensor(value, dtype=torch.float64), out, targets


def evaluate_batches(*batches):
    return evaluate(batches, lambda batch, where: batch)


def test_the_validation_loss_is_the_mean_over_samples_summed_in_float64():
    evaluation = evaluate_batches(batch_loss(0.1, torch.zeros(3, 2)), batch_loss(0.3, torch.zeros(5, 2)))
    assert evaluation.loss == (0.1 * 3 + 0.3 * 5) / 8
    assert (evaluation.samples, evaluation.accuracy) == (8, None)


def test_one_validation_sample_gives_its_loss():
    evaluation = evaluate_batches(batch_loss(0.7, torch.zeros(1, 2)))
    assert (evaluation.loss, evaluation.samples) == (0.7, 1)


def test_no_validation_batches_give_a_nan_loss_and_no_samples():
    evaluation = evaluate_batches()
    assert math.isnan(evaluation.loss) and evaluation.accuracy is None and evaluation.samples == 0


def test_outputs_without_a_batch_dimension_count_as_one_sample_each():
    evaluation = evaluate_batches(batch_loss(1.0, torch.tensor(5.0)), batch_loss(3.0, (torch.zeros(4, 2), torch.zeros(4))))
    assert (evaluation.loss, evaluation.samples) == (2.0, 2)


LOGITS = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [2.0, 0.0, 0.0]])  # top classes 0, 1, 2, 0


@pytest.mark.parametrize("labels", [torch.tensor([0, 1, 1, 2]), nn.functional.one_hot(torch.tensor([0, 1, 1, 2]), 3).double()],
                         ids=["indices", "probabilities"])  # fmt: skip
def test_accuracy_is_the_fraction_of_samples_whose_top_class_is_the_label(labels):
    assert evaluate_batches(batch_loss(1.0, LOGITS, labels)).accuracy == 2 / 4


def test_two_logits_are_a_classifier_too():
    out = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert evaluate_batches(batch_loss(1.0, out, torch.tensor([0, 0]))).accuracy == 1 / 2


@pytest.mark.parametrize("out, targets", [
    (torch.zeros(4, 1), torch.zeros(4, 1)),  # one output column: a regression
    (LOGITS, torch.ones(4, 3, dtype=torch.long)),  # integer targets of the output's shape: not one label a sample
    (LOGITS, None),
], ids=["one_column", "integer_rows", "no_targets"])  # fmt: skip
def test_there_is_no_accuracy_without_class_labels(out, targets):
    assert evaluate_batches(batch_loss(1.0, out, targets)).accuracy is None


def evaluation(loss: float):
    from convsep.validation import Evaluation

    return Evaluation(loss, None, 4)


def test_a_new_history_has_no_best_state():
    assert History().summary() == {"history": [], "best_step": None, "best_val_loss": math.inf}


def test_a_tie_keeps_the_earlier_state():
    history, model = History(), nn.Linear(3, 2)
    history.add(model, evaluation(1.0), step=0)
    row = history.add(model, evaluation(1.0), step=5)
    assert not row["best"] and history.best_step == 0


def test_restore_best_loads_the_state_with_the_lowest_loss_unless_the_model_holds_it():
    history, model = History(), nn.Linear(3, 2)
    states = []
    for step, loss in enumerate([3.0, 1.0, 2.0]):
        nn.init.constant_(model.weight, float(step))
        states.append(model.weight.detach().clone())
        history.add(model, evaluation(loss), step=step)
    assert history.restore_best(model) is True
    assert torch.equal(model.weight, states[1])
    history.add(model, evaluation(0.5), step=3)  # the state now held is the best
    nn.init.constant_(model.weight, 9.0)
    assert history.restore_best(model) is False and bool((model.weight == 9.0).all())


@pytest.mark.parametrize("row, text", [
    ({"step": 0, "epoch": 1, "train_loss": None, "val_loss": 1.23456, "val_accuracy": None, "lr": 0.001, "best": True},
     "step 0 (epoch 1): validation loss 1.2346, lr 0.001 (best)"),
    ({"step": 5, "epoch": 2, "train_loss": 0.5, "val_loss": 2.0, "val_accuracy": 0.25, "lr": 1e-4, "best": False},
     "step 5 (epoch 2): train loss 0.5000, validation loss 2.0000, accuracy 25.00%, lr 0.0001"),
])  # fmt: skip
def test_a_history_row_reads(row, text):
    assert format_row(row) == text


# --- through finetune ----------------------------------------------------------------------------

X = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
TRAIN = [(X, torch.zeros(4, dtype=torch.long))] * 3  # trains towards class 0 ...
VAL = [(X, torch.ones(4, dtype=torch.long))]  # ... which validation calls wrong: every step makes it worse


def test_the_history_holds_the_mean_train_loss_since_the_last_evaluation_and_the_runs_counts():
    torch.manual_seed(0)
    losses = []

    def record(out, teacher_out, targets):
        value = nn.functional.cross_entropy(out, targets)
        losses.append(float(value.detach()))
        return value

    model = convsep.finetune(nn.Linear(3, 2), TRAIN + [TRAIN[0]], loss=record, val_data=VAL, val_every=2, verbose=False)
    del losses[:1]  # the first evaluation, before training
    trained = [losses[0], losses[1], losses[3], losses[4]]  # the evaluation at step 2 sits between
    record_ = model.convsep_finetune
    assert [(r["step"], r["train_loss"]) for r in record_["history"]] == [
        (0, None), (2, (trained[0] + trained[1]) / 2), (4, (trained[2] + trained[3]) / 2)]
    assert (record_["steps"], record_["rollbacks"]) == (4, 0)


def test_validation_batches_that_yield_nothing_keep_no_state_and_the_trained_model():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    before = model.weight.detach().clone()
    convsep.finetune(model, TRAIN, val_data=[], verbose=False)
    record = model.convsep_finetune
    assert record["best_step"] is None and all(math.isnan(r["val_loss"]) for r in record["history"])
    assert not torch.equal(model.weight, before)


def test_verbose_is_the_default_and_prints_every_history_row_then_the_state_kept(capsys):
    torch.manual_seed(0)
    model = convsep.finetune(nn.Linear(3, 2), TRAIN, val_data=VAL, lr=0.1)
    record = model.convsep_finetune
    assert record["best_step"] == 0
    rows = [format_row(r) for r in record["history"]]
    kept = f"kept the state of step 0: its validation loss {record['best_val_loss']:.4f} is the lowest"
    assert capsys.readouterr().out.splitlines() == rows + [kept]


def test_verbose_false_prints_nothing(capsys):
    convsep.finetune(nn.Linear(3, 2), TRAIN, val_data=VAL, lr=0.1, verbose=False)
    assert capsys.readouterr().out == ""


def test_the_log_of_a_run_holds_the_loss_chosen_the_history_each_undone_step_and_the_state_kept(caplog):
    torch.manual_seed(0)
    nan = (torch.full((4, 3), float("nan")), TRAIN[0][1])
    with caplog.at_level(logging.INFO, logger="convsep"):
        model = convsep.finetune(nn.Linear(3, 2), [TRAIN[0], nan, TRAIN[0]], val_data=VAL, lr=0.1, warmup=0.0, verbose=False)
    record = model.convsep_finetune
    start, end = (format_row(r) for r in record["history"])
    fine_tuning = ("convsep.finetune", "convsep.losses")
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.name in fine_tuning] == [
        ("INFO", "loss='auto': 'kl' for outputs of shape (4, 2)"),
        ("INFO", start),
        ("WARNING", "fine-tuning stopped at step 2 of 3 (epoch 1): the loss is nan. Undone and skipped (1 of 3 allowed); "
                    "the lr is now 0.5 of the schedule"),
        ("INFO", end),
        ("INFO", f"kept the state of step 0 (lowest validation loss {record['best_val_loss']:.4f})"),
        ("INFO", "fine-tuned 3 steps (1 undone)"),
    ]  # fmt: skip
    assert record["rollbacks"] == 1


def test_data_without_len_is_logged_as_training_at_a_constant_lr(caplog):
    with caplog.at_level(logging.INFO, logger="convsep.finetune"):
        convsep.finetune(nn.Linear(3, 2), (b for b in TRAIN), lr=0.1, verbose=False)
    assert "data has no len() and steps is None: training at a constant lr of 0.1" in caplog.messages


class FakeBar:
    """Stands in for the tqdm bar a terminal would show."""

    def __init__(self, total, verbose, desc, unit):
        self.opened = (total, verbose, desc, unit)
        self.updates, self.postfixes, self.written, self.closed = [], [], [], False

    def update(self, n):
        self.updates.append(n)

    def set_postfix(self, **values):
        self.postfixes.append(values)

    def write(self, text):
        self.written.append(text)

    def close(self):
        self.closed = True


def test_on_a_terminal_the_bar_counts_the_steps_shows_loss_and_epoch_and_carries_the_history(monkeypatch):
    bars = []
    finetune_module = sys.modules["convsep.finetune"]  # convsep.finetune is the function
    monkeypatch.setattr(finetune_module, "progress_bar", lambda *args: bars.append(FakeBar(*args)) or bars[-1])
    losses = []

    def record(out, teacher_out, targets):
        value = nn.functional.cross_entropy(out, targets)
        losses.append(float(value.detach()))
        return value

    torch.manual_seed(0)
    model = convsep.finetune(nn.Linear(3, 2), TRAIN[:2], epochs=2, loss=record, val_data=VAL, verbose=True)
    (bar,) = bars
    trained = [loss for i, loss in enumerate(losses) if i not in (0, 3, 6)]  # evaluations before and after each epoch
    assert bar.opened == (4, True, "finetune", "step")
    assert bar.updates == [1, 1, 1, 1]
    # refresh=False: the postfix does not redraw the bar by itself; the update(1) right after redraws it once
    assert bar.postfixes == [{"loss": f"{loss:.4f}", "epoch": epoch, "refresh": False} for loss, epoch in zip(trained, [1, 1, 2, 2])]
    assert bar.written == [format_row(r) for r in model.convsep_finetune["history"]] and bar.closed

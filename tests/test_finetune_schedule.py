"""The learning rate of every fine-tuning step against the closed form of convsep/schedule.py, and the
optimiser's settings that decide how far a step moves the weights."""

import math

import pytest
import torch
from torch import nn

import convsep
from convsep.schedule import Schedule


def square(out, teacher_out, targets):
    return out.square().mean()


def lrs_of_the_steps(monkeypatch, data, optimizer=torch.optim.AdamW, **kwargs) -> list[float]:
    """The lr the optimiser holds at each step it takes during one finetune call."""
    seen, step = [], optimizer.step

    def spy(self, *args, **kw):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kw)

    monkeypatch.setattr(optimizer, "step", spy)
    convsep.finetune(nn.Linear(3, 2), data, loss=square, verbose=False, **kwargs)
    return seen


def closed_form(peak: float, total: int, warmup_steps: int) -> list[float]:
    """(s + 1) / (w + 1) for s < w, then 0.5 * (1 + cos(pi * (s - w) / (total - w))), times the peak."""
    w = warmup_steps
    return [peak * ((s + 1) / (w + 1) if s < w else 0.5 * (1 + math.cos(math.pi * (s - w) / (total - w)))) for s in range(total)]


@pytest.mark.parametrize("steps, warmup, warmup_steps", [
    (10, 0.1, 1),  # 10% of 10
    (10, 0.01, 1),  # any warmup > 0 is at least one step
    (2, 0.9, 1),  # and at most all steps but the last
    (4, 0.0, 0),  # none: the first step is at the peak
])  # fmt: skip
def test_the_lr_of_every_step_is_the_closed_form(monkeypatch, steps, warmup, warmup_steps):
    lrs = lrs_of_the_steps(monkeypatch, [torch.randn(2, 3)], steps=steps, lr=0.1, warmup=warmup)
    assert lrs == pytest.approx(closed_form(0.1, steps, warmup_steps), rel=1e-12, abs=1e-15)


def test_the_schedule_of_epochs_counts_the_batches_of_every_epoch(monkeypatch):
    lrs = lrs_of_the_steps(monkeypatch, [torch.randn(2, 3)], epochs=3, lr=0.1, warmup=0.0)  # one batch an epoch
    assert lrs == pytest.approx(closed_form(0.1, 3, 0), rel=1e-12)


def test_data_without_len_trains_at_the_peak_lr_throughout(monkeypatch):
    lrs = lrs_of_the_steps(monkeypatch, (torch.randn(2, 3) for _ in range(3)), lr=0.1)
    assert lrs == [0.1, 0.1, 0.1]


def test_each_undone_step_halves_the_lr_again(monkeypatch):
    nan, good = torch.full((2, 3), float("nan")), torch.ones(2, 3)
    lrs = lrs_of_the_steps(monkeypatch, [good, nan, nan, good, good], lr=0.1, warmup=0.0)
    expected = closed_form(0.1, 5, 0)
    assert lrs == pytest.approx([expected[0], expected[3] / 4, expected[4] / 4], rel=1e-12)


def test_the_lr_stays_at_zero_past_the_end_of_the_schedule():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = Schedule(optimizer, 1.0, total=4, warmup=0.5)  # 2 warmup steps, 2 of cosine
    for _ in range(6):  # more steps than planned (data longer than its len() said)
        schedule.step()
    assert schedule.lr == 0.0 and optimizer.param_groups[0]["lr"] == 0.0


def linear_with_weights(weight: float = 0.0) -> nn.Linear:
    model = nn.Linear(3, 1)
    nn.init.constant_(model.weight, weight), nn.init.zeros_(model.bias)
    return model


def test_sgd_steps_with_momentum_0_9():
    """A constant gradient g: SGD with momentum 0.9 moves by lr * g, then lr * 1.9 * g."""
    model = linear_with_weights()
    total = lambda out, teacher_out, targets: out.sum()  # noqa: E731  (gradient of the weight: the input, 1 per entry)
    convsep.finetune(model, (torch.ones(1, 3) for _ in range(2)), loss=total, optimizer="sgd", lr=0.1, weight_decay=0.0,
                     clip_grad_norm=None, verbose=False)  # fmt: skip
    torch.testing.assert_close(model.weight, torch.full((1, 3), -0.1 * (1 + 1.9)), rtol=1e-6, atol=0)


def test_clip_grad_norm_none_leaves_the_gradient_as_it_is():
    model = linear_with_weights()
    huge = lambda out, teacher_out, targets: 1e3 * out.sum()  # noqa: E731  (gradient: 1e3 per weight)
    convsep.finetune(model, [torch.ones(1, 3)], loss=huge, optimizer="sgd", lr=0.1, weight_decay=0.0, clip_grad_norm=None,
                     warmup=0.0, verbose=False)  # fmt: skip
    torch.testing.assert_close(model.weight, torch.full((1, 3), -0.1 * 1e3), rtol=1e-6, atol=0)

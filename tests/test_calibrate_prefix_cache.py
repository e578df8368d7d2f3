"""In-order calibration serves the converted model's module outputs that the last fit did not change
(prefix_cache.ConvertedPrefix): the same fits, bit for bit, as running the converted model's prefix in full for every
layer, with the modules before the last fitted layer run once per batch, and never more kept than the budget allows."""

import logging
import sys

import pytest
import torch
from helpers import Alternating
from torch import nn
from zoo import ARCHITECTURES

import convsep
from convsep import prefix_cache

calibrate_module = sys.modules["convsep.calibrate"]  # `convsep.calibrate` is the function


class Counted(nn.Module):
    """Its input plus a constant, counting its calls; `drift` adds the call count too (an output that is not a
    function of the input alone)."""

    def __init__(self, drift=False):
        super().__init__()
        self.calls, self.drift = 0, drift

    def forward(self, x):
        self.calls += 1
        return x + (self.calls if self.drift else 1.0)


def chain(first=None):
    """first, then four convs one after the other (each fit changes the next one's inputs)."""
    torch.manual_seed(0)
    convs = [nn.Conv2d(3 if i == 0 else 6, 6, 3, padding=1) for i in range(4)]
    return nn.Sequential(first or Counted(), convs[0], nn.ReLU(), convs[1], nn.ReLU(), convs[2], nn.ReLU(), convs[3])


def _data(count=3, shape=(4, 3, 8, 8)):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=generator) for _ in range(count)]


def calibrate(model, data, budget=None, **kwargs):
    """Calibrate a rank-1 conversion of `model`, with `budget` bytes for the cache (None: calibrate's own)."""
    converted = convsep.convert(model, rank=1)
    for module in converted.modules():  # count calibration's calls only
        if isinstance(module, Counted):
            module.calls = 0
    if budget is None:
        return convsep.calibrate(converted, model, data, **kwargs)
    original = calibrate_module.ConvertedPrefix
    calibrate_module.ConvertedPrefix = lambda model, _budget: original(model, budget)
    try:
        return convsep.calibrate(converted, model, data, **kwargs)
    finally:
        calibrate_module.ConvertedPrefix = original


def assert_same_fits(a, b):
    assert list(a.state_dict()) == list(b.state_dict())
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name
    assert a.convsep_plan.calibration == b.convsep_plan.calibration


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_zoo_model_gets_the_fits_of_running_the_converted_model_in_full(name):
    factory, shape = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = factory().eval()
    data = [torch.randn(*shape) for _ in range(2)]
    assert_same_fits(calibrate(model, data, refit_kept=True), calibrate(model, data, budget=0, refit_kept=True))


def test_alternating_gets_the_same_fits_too():
    model = chain().eval()
    assert_same_fits(calibrate(model, _data(), alternate=2), calibrate(model, _data(), budget=0, alternate=2))


def counted_calls(model, data, budget=None):
    """How often the converted model's copy of Counted ran in calibration."""
    return calibrate(model, data, budget)[0].calls


def test_what_ran_before_the_last_fitted_layer_runs_once_per_batch():
    model = chain().eval()
    # Without the cache: the order-finding forward, then a pass per layer over the 3 batches. With it: pass 1 runs
    # it on every batch, pass 2 once more to check it against what it would serve, passes 3 and 4 serve it.
    assert counted_calls(model, _data(), budget=0) == 1 + 4 * 3
    assert counted_calls(model, _data()) == 1 + 3 + 1


def test_nothing_is_kept_past_the_budget():
    # Counted's output per batch: 4 x 3 x 8 x 8 floats = 3,072 bytes, the first conv's 6,144. A budget for the first
    # two batches of Counted's output only: the third batch runs it in passes 2 to 4, and nothing else is served.
    model = chain().eval()
    assert counted_calls(model, _data(), budget=2 * 3072) == 1 + 3 + (1 + 1) + 1 + 1


class Sliced(Counted):
    """Its output is a view of a tensor eight times larger, which keeping the output keeps alive."""

    def forward(self, x):
        self.calls += 1
        return torch.cat([x + 1.0] * 8, dim=1)[:, :3]


@pytest.mark.parametrize("budget, calls", [(3 * 3072, 1 + 4 * 3), (1 << 20, 1 + 3 + 1)])
def test_a_view_counts_as_its_whole_storage(budget, calls):
    # Three batches of a 3,072-byte view of 24,576 bytes: a budget for the views alone keeps none of them.
    assert counted_calls(chain(Sliced()).eval(), _data(), budget=budget) == calls


class SideEffect(nn.Module):
    """Calls an in-place ReLU for its effect on `y` alone, between three convs."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.a(x)
        self.relu(y)  # served while fitting c, it must still change y
        return self.c(self.b(y))


class DirectForward(nn.Module):
    """Calls a child's forward() itself, bypassing module(...) and its hooks (fx cannot trace it, so the call stays)."""

    def __init__(self):
        super().__init__()
        self.first, self.counted = nn.Conv2d(3, 6, 3, padding=1), Counted()
        self.second, self.third = nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        y = self.counted(self.first(x))
        if float(y.abs().sum()) >= 0:  # data-dependent: the root is not traced
            y = self.counted.forward(x=y)
        return self.third(self.second(y))


class Odd(nn.Module):
    """Module calls the cache must serve as they ran: an output that cannot be kept (before one that can), a keyword
    input, an in-place change by the caller to a served output that later layers read, and a tuple with non-tensor
    items."""

    class Both(nn.Module):
        def forward(self, x):
            return x, -x, None, 2

    class Opaque(nn.Module):
        def forward(self, x):
            return {"value": x, "where": [object()]}

    def __init__(self):
        super().__init__()
        self.both, self.opaque, self.counted = Odd.Both(), Odd.Opaque(), Counted()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(12, 6, 3, padding=1)
        self.c, self.d = nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 3)

    def forward(self, x):
        y = self.counted(x=self.opaque(self.a(x))["value"])
        z = self.b(torch.cat([self.both(y)[1], y], dim=1))
        if float(y.abs().sum()) >= 0:  # data-dependent: the root is not traced, its module calls stay
            y.mul_(2)  # changes what `counted` returned, after b: in b's pass, which keeps it, this never runs
        return self.d(self.c(z + y))


def direct_forward_inside():
    return nn.Sequential(DirectForward())  # the direct call from a module within the model, not from its root


# 12,288 bytes: two 4 x 6 x 8 x 8 outputs, so only the first batch's first calls are kept and the others run.
@pytest.mark.parametrize("budget", [None, 12_288], ids=["room", "little room"])
@pytest.mark.parametrize("model", [SideEffect, direct_forward_inside, Odd], ids=lambda m: m.__name__)
def test_odd_module_calls_get_the_same_fits(model, budget, caplog):
    torch.manual_seed(0)
    model = model().eval()
    with caplog.at_level(logging.INFO, logger="convsep.prefix_cache"):
        cached = calibrate(model, _data(), budget)
    assert not [r for r in caplog.records if r.name == "convsep.prefix_cache"]  # served, not turned off
    assert_same_fits(cached, calibrate(model, _data(), budget=0))


def test_an_output_that_cannot_be_kept_leaves_the_calls_after_it_served():
    torch.manual_seed(0)
    # Counted runs after `a`: not in a's pass, in b's on the 3 batches, once more in c's to be checked, not in d's
    # (in c's and d's passes the caller changes a copy of it in place, not what is kept).
    assert calibrate(Odd().eval(), _data()).counted.calls == 1 + 3 + 1


class ChangedInPlace(nn.Module):
    """Adds to a conv's output in place before the next conv reads it: that output can never be kept."""

    def __init__(self):
        super().__init__()
        self.counted = Counted()
        self.a, self.b, self.c = (nn.Conv2d(3 if i == 0 else 6, 6, 3, padding=1) for i in range(3))

    def forward(self, x):
        y = self.counted(x)
        y = self.a(y)
        y += 1.0  # `a`'s output, changed after its call
        return self.c(self.b(y))


def test_an_output_changed_in_place_after_its_call_is_not_served_what_it_was():
    torch.manual_seed(0)
    model = ChangedInPlace().eval()
    cached = calibrate(model, _data())
    assert_same_fits(cached, calibrate(model, _data(), budget=0))
    assert cached.counted.calls == 1 + 0 + 3 + 1 + 0  # still served itself: nothing changes it


def test_outputs_are_compared_leaf_by_leaf_and_by_structure():
    t = torch.arange(3.0)
    assert prefix_cache._same((t, 1, None), (t.clone(), 1, None))
    assert not prefix_cache._same((t, t), [t, t])  # same leaves, another container
    assert not prefix_cache._same((t,), (t, t))
    assert not prefix_cache._same((t, 1), (t, 2))
    assert not prefix_cache._same(t, 1)
    assert not prefix_cache._same(t, t + 1)
    assert not prefix_cache._same(t, t.double())  # equal values, another dtype


def test_an_output_that_is_not_a_function_of_the_input_turns_the_cache_off(caplog):
    with caplog.at_level(logging.INFO, logger="convsep.prefix_cache"):
        drifting = calibrate(chain(Counted(drift=True)).eval(), _data())
    said = [r.getMessage() for r in caplog.records if r.name == "convsep.prefix_cache"]
    assert said == ["module Counted's output is not the one of the pass before: the converted model runs in full for "
                    "each layer from here on"]  # fmt: skip
    # From then on it runs live, as without the cache: the same calls in the same order, so the same fits.
    assert_same_fits(drifting, calibrate(chain(Counted(drift=True)).eval(), _data(), budget=0))


def test_data_in_another_order_on_another_pass_is_never_served_another_batchs_outputs(caplog):
    model = chain().eval()
    with caplog.at_level(logging.INFO, logger="convsep.prefix_cache"):
        shuffled = calibrate(model, Alternating(_data()))
    said = [r.getMessage() for r in caplog.records if r.name == "convsep.prefix_cache"]
    assert said == ["calibration batch 1: the data gave other batches than on the pass before (shuffled?): the "
                    "converted model runs in full for each layer from here on"]  # fmt: skip
    for name, value in calibrate(model, _data()).state_dict().items():  # the same sums, added in another order
        torch.testing.assert_close(shuffled.state_dict()[name], value, rtol=1e-4, atol=1e-5)


def test_calibrate_gives_the_cache_half_the_outputs_budget(monkeypatch):
    budgets = []
    monkeypatch.setattr(calibrate_module, "ConvertedPrefix", lambda model, budget: budgets.append(budget) or
                        prefix_cache.ConvertedPrefix(model, budget))  # fmt: skip
    model = chain().eval()
    convsep.calibrate(convsep.convert(model, rank=1), model, _data())
    assert budgets == [(1 << 30) // 2]

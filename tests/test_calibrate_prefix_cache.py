"""In-order calibration serves the converted model's module outputs that the last fit did not change
(prefix_cache.ConvertedPrefix): the same fits, bit for bit, as running the converted model's prefix in full for every
layer, with the modules before the last fitted layer run once per batch, and never more kept than the budget allows."""

import logging
import sys
from collections import Counter

import pytest
import torch
from helpers import Alternating
from torch import nn
from zoo import ARCHITECTURES

import convsep
from convsep import prefix_cache

calibrate_module = sys.modules["convsep.calibrate"]  # `convsep.calibrate` is the function


CALLS: Counter = Counter()  # calls per Counted module, kept outside the model: a call that changes it is never served


class Counted(nn.Module):
    """Its input plus one (or `body` of it), counting its calls; `drift` adds the count too (an output that is not a
    function of the input alone)."""

    def __init__(self, body=None, drift=False):
        super().__init__()
        self.body, self.drift = body, drift

    @property
    def calls(self):
        return CALLS[id(self)]

    def forward(self, x):
        CALLS[id(self)] += 1
        y = x + 1.0 if self.body is None else self.body(x)
        return y + CALLS[id(self)] if self.drift else y


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
        CALLS.pop(id(module), None)
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


@pytest.mark.parametrize("budget, calls", [(3 * 3072, 1 + 4 * 3), (1 << 20, 1 + 3 + 1)])
def test_a_view_counts_as_its_whole_storage(budget, calls):
    # Three batches of a 3,072-byte view of 24,576 bytes: a budget for the views alone keeps none of them.
    sliced = Counted(body=lambda x: torch.cat([x + 1.0] * 8, dim=1)[:, :3])
    assert counted_calls(chain(sliced).eval(), _data(), budget=budget) == calls


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
        self.both, self.opaque, self.counted = torch.fx.symbolic_trace(Odd.Both()), Odd.Opaque(), Counted()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(12, 6, 3, padding=1)
        self.c, self.d = nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 3)

    def forward(self, x):
        y = self.counted(x=self.opaque(self.a(x))["value"])
        z = self.b(torch.cat([self.both(y)[1], y], dim=1))
        if float(y.abs().sum()) >= 0:  # data-dependent: the root is not traced, its module calls stay
            y.mul_(2)  # changes what `counted` returned, after b: in b's pass, which keeps it, this never runs
        return self.d(self.c(z + y))


class SharedActivation(nn.Module):
    """One ReLU inside a stage and at the top level: serving the stage must not shift the top-level calls' keys."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()
        self.stage = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), self.act)
        self.b, self.c, self.d = (nn.Conv2d(6, 6, 3, padding=1) for _ in range(3))

    def forward(self, x):
        x = self.act(self.stage(x))
        return self.d(self.act(self.c(self.act(self.b(x)))))


class InPlaceBranch(nn.Module):
    """A branch that changes its input in place (ReLU(inplace=True) first) and returns another tensor."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.branch = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(6, 6, 3, padding=1))
        self.c, self.d = nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        x = self.a(x)
        x = x + self.branch(x)  # x was changed by the branch before the addition reads it
        return self.d(self.c(x))


class StoresSkip(nn.Module):
    """An encoder that keeps its output on itself for a later layer: a side effect no served call would have."""

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)

        def forward(self, x):
            self.skip = self.conv(x)
            return self.skip.relu()

    def __init__(self):
        super().__init__()
        self.encoder = StoresSkip.Encoder()
        self.b, self.c, self.d = (nn.Conv2d(6, 6, 3, padding=1) for _ in range(3))

    def forward(self, x):
        x = self.b(self.encoder(x))
        return self.d(self.c(x + self.encoder.skip))


class Halves(nn.Module):
    """A module returning views of its input (chunk), one changed in place later while the whole is read."""

    def __init__(self):
        super().__init__()
        self.a, self.split = nn.Conv2d(3, 8, 3, padding=1), torch.fx.symbolic_trace(Halves.Split())
        self.b, self.c, self.d = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3)

    class Split(nn.Module):
        def forward(self, x):
            return x.chunk(2, dim=1)

    def forward(self, x):
        t = self.a(x)
        first, second = self.split(t)
        y = self.b(first)
        second.relu_()  # a view of t
        return self.d(self.c(t + y))


class ExpandedIdentity(nn.Module):
    """Eval-mode Dropout returns its input itself, here an expanded tensor (several elements, one memory place)."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.1)
        self.a, self.b, self.c = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 3)

    def forward(self, x):
        return self.c(self.b(self.a(x + self.drop(x.mean(1, keepdim=True).expand(-1, 3, -1, -1)))))


class FeatureHook(nn.Module):
    """A forward hook inside a stage keeps its output for a later layer (timm's feature hooks): served whole, the
    stage would not call it."""

    def __init__(self):
        super().__init__()
        self.stage = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.b, self.c, self.d = (nn.Conv2d(6, 6, 3, padding=1) for _ in range(3))
        self.stage[1].store = {}  # filled in place: no attribute of the model changes
        self.stage[1].register_forward_hook(lambda module, _args, output: module.store.__setitem__("out", output))

    def forward(self, x):
        return self.d(self.c(self.b(self.stage(x)) + self.stage[1].store["out"]))


def scripted_child():
    torch.manual_seed(0)
    convs = [nn.Conv2d(3 if i == 0 else 6, 6, 3, padding=1) for i in range(4)]
    return nn.Sequential(convs[0], torch.jit.script(nn.ReLU()), convs[1], nn.ReLU(), convs[2], nn.ReLU(), convs[3])


@pytest.mark.parametrize(
    "model", [SharedActivation, InPlaceBranch, StoresSkip, FeatureHook, Halves, ExpandedIdentity, scripted_child],
    ids=lambda m: m.__name__,
)  # fmt: skip
def test_calls_that_cannot_be_served_as_they_ran_are_run(model):
    torch.manual_seed(0)
    model = model().eval()
    assert_same_fits(calibrate(model, _data()), calibrate(model, _data(), budget=0))


def test_no_hook_is_left_on_the_model_when_calibration_fails():
    model = chain().eval()
    converted = convsep.convert(model, rank=1)
    with pytest.raises(convsep.InputShapeError):
        convsep.calibrate(converted, model, [torch.randn(4, 3, 8, 8), torch.randn(4, 5, 8, 8)])
    assert not any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in converted.modules())


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

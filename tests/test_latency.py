"""latency.measure against a scripted clock: each layer 'takes' a known time, so every figure is exact."""

import pytest
import torch
from torch import nn

from convsep import latency


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


class Costs(nn.Module):
    """Advances the clock by `seconds` each call; the n-th call of a run costs seconds[n % len]."""

    def __init__(self, clock: Clock, *seconds: float):
        super().__init__()
        self.clock, self.seconds, self.calls = clock, seconds, 0

    def forward(self, x):
        self.clock.now += self.seconds[self.calls % len(self.seconds)]
        self.calls += 1
        return x


class Model(nn.Module):
    def __init__(self, clock: Clock):
        super().__init__()
        self.shared = Costs(clock, 2.0)  # called twice per pass
        self.inner = Costs(clock, 3.0)
        self.outer = nn.Sequential(Costs(clock, 1.0), self.inner)  # contains `inner`: 1 + 3
        self.unreached = Costs(clock, 100.0)
        self.passes = 0

    def forward(self, x):
        self.passes += 1
        return self.outer(self.shared(self.shared(x)))


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(latency.time, "perf_counter", clock)
    return clock


def test_each_layer_is_timed_over_all_its_calls_and_the_whole_pass_without_hooks(clock):
    model = Model(clock)
    modules = [model.shared, model.inner, model.outer, model.unreached, model.shared]  # `shared` listed twice
    timing = latency.measure(model, (torch.zeros(1),), modules, runs=3, warmup=2)
    assert timing.total == 8.0  # 2 + 2 + 1 + 3
    # `unreached` has no entry: no time, not zero time
    assert timing.layers == {id(model.shared): 4.0, id(model.inner): 3.0, id(model.outer): 4.0}
    assert model.passes == 2 + 2 * 3  # warm-up, then a plain and a hooked pass per run


def test_each_figure_is_the_median_of_the_runs(clock):
    model = Model(clock)
    model.inner.seconds = (3.0, 30.0, 5.0, 50.0, 10.0, 100.0)  # per run: plain pass, hooked pass
    timing = latency.measure(model, (torch.zeros(1),), [model.inner], runs=3, warmup=0)
    assert timing.layers == {id(model.inner): 50.0}  # median of 30, 50, 100 (not their mean)
    assert timing.total == 2 + 2 + 1 + 5.0  # median of 3, 5, 10 (not their mean) plus the rest


def test_measure_leaves_no_hook_behind_and_the_model_in_its_mode(clock):
    model = Model(clock).train()
    latency.measure(model, (torch.zeros(1),), [model.shared, model.inner], runs=2, warmup=1)
    assert model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_measure_once_in_one_process_is_measure(clock):
    model = Model(clock)
    timing = latency.measure_once(model, (torch.zeros(1),), [model.shared, model.unreached], runs=1, warmup=0)
    assert (timing.total, timing.layers) == (8.0, {id(model.shared): 4.0})

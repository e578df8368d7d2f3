"""In-order calibration keeps the original's outputs for several layers at a time (model_runs.OriginalOutputs): the
same fits as running the original's prefix again for every layer, with one forward of the original per batch and
window of layers, and never more than the memory budget allows."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convsep
import convsep.model_runs


class Shared(nn.Module):
    """A conv called twice, an in-place ReLU right after a conv (a kept output must be a copy), a functional conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.twice = nn.Conv2d(8, 8, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.stem(x), inplace=True)
        x = self.twice(torch.relu_(self.twice(x)))
        x = F.conv2d(x, self.weight, padding=1).relu_()
        return self.head(x.mean(dim=(2, 3)))


def _data(count=4):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(6, 3, 8, 8, generator=generator) for _ in range(count)]


def _original_forwards(model):
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def _calibrate(monkeypatch, budget, **kwargs):
    torch.manual_seed(0)
    model = Shared().eval()
    converted = convsep.convert(model, rank=1)
    monkeypatch.setattr(convsep.model_runs, "ORIGINAL_OUTPUTS_BYTES", budget)
    forwards = _original_forwards(model)
    calibrated = convsep.calibrate(converted, model, _data(), **kwargs)
    return calibrated, len(forwards)


@pytest.mark.parametrize("kwargs", [{}, {"alternate": 1}, {"refit_kept": True}], ids=["plain", "alternate", "kept"])
def test_kept_outputs_give_the_fits_of_the_original_run_for_every_layer(monkeypatch, kwargs):
    cached, cached_forwards = _calibrate(monkeypatch, 1 << 30, **kwargs)
    streamed, streamed_forwards = _calibrate(monkeypatch, 0, **kwargs)
    layers = 3 + ("refit_kept" in kwargs)  # stem, twice, the functional conv (and the head)
    assert len(cached.convsep_plan.converted) == 3
    assert cached_forwards == 4 and streamed_forwards == 4 * layers  # 4 batches: one window, or one per layer
    for name, value in cached.state_dict().items():
        assert torch.equal(value, streamed.state_dict()[name]), name
    assert cached.convsep_plan.calibration == streamed.convsep_plan.calibration


# Each conv's outputs: 4 batches x 6 x 8 x 8 x 8 floats = 49,152 bytes (the twice-called one, twice that). With room
# for three of those: a window of stem and twice, then one of the functional conv. With room for one: stem alone,
# then twice streamed (after one batch showed it does not fit: 1 + 4 forwards), then the functional conv.
@pytest.mark.parametrize("budget, forwards", [(3 * 49_152, 4 + 4), (49_152, 4 + 1 + 4 + 4)])
def test_a_window_holds_as_many_layers_as_the_budget_allows(monkeypatch, budget, forwards):
    windowed, every_layer = _calibrate(monkeypatch, budget), _calibrate(monkeypatch, 1 << 30)
    assert every_layer[1] == 4 and windowed[1] == forwards
    for name, value in windowed[0].state_dict().items():
        assert torch.equal(value, every_layer[0].state_dict()[name]), name


def test_a_layer_whose_outputs_alone_exceed_the_budget_is_streamed():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)).eval()
    order = [(model[0], 1)]
    data = _data()
    outputs = convsep.model_runs.OriginalOutputs(model, order, data, len(data), lambda *_: None, budget=1000)
    assert outputs.take(0, "0") is None
    streamed = outputs.stream(0, data[0], "batch 1")
    with torch.no_grad():
        assert len(streamed) == 1 and torch.equal(streamed[0][0], model(data[0]))


def test_on_a_gpu_the_outputs_kept_are_at_most_a_quarter_of_its_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4_000_000, 16_000_000))
    assert convsep.model_runs.outputs_budget(torch.device("cuda", 0)) == 1_000_000
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 40, 1 << 41))
    assert convsep.model_runs.outputs_budget(torch.device("cuda", 0)) == convsep.model_runs.ORIGINAL_OUTPUTS_BYTES
    assert convsep.model_runs.outputs_budget(torch.device("cpu")) == convsep.model_runs.ORIGINAL_OUTPUTS_BYTES

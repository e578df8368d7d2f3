"""objective='latency': correctness only (which layers win is the machine's business, not a test's)."""

import pytest
import torch
from torch import nn

import convsep
from convsep.layers import _SeparableConvNd
from helpers import assert_bitwise_equal, relative_error, snapshot
from zoo import FunctionalConvNet


def test_latency_objective_converts_only_what_it_measured_faster():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)).eval()
    before = snapshot(model)
    x = torch.randn(1, 3, 32, 32)
    converted = convsep.convert(model, rank="full", objective="latency", example_inputs=x)
    assert_bitwise_equal(before, model)
    for decision in converted.convsep_plan.layers:
        module = converted.get_submodule(decision.name)
        if decision.converted:
            assert isinstance(module, _SeparableConvNd)
        else:
            assert isinstance(module, nn.Conv2d) and decision.reason.startswith("kept for speed")
    with torch.no_grad():
        assert relative_error(converted(x), model(x)) < 1e-5  # full rank: exact, whatever was kept


def test_latency_objective_keeps_functional_convs():
    model = FunctionalConvNet().eval()
    converted = convsep.convert(model, objective="latency", example_inputs=torch.randn(1, 3, 12, 12))
    functional = next(d for d in converted.convsep_plan.layers if d.kind == "F.conv2d")
    assert not functional.converted and "functional" in functional.reason


def test_latency_objective_needs_inputs_and_a_known_objective():
    model = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match="example_inputs"):
        convsep.convert(model, objective="latency")
    with pytest.raises(ValueError, match="'speed'"):
        convsep.convert(model, objective="speed")


def test_latency_objective_on_inputs_the_model_cannot_take_names_them():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    with pytest.raises(convsep.InputShapeError, match=r"objective='latency'.*\(1, 5, 16, 16\) float32"):
        convsep.convert(model, objective="latency", example_inputs=torch.randn(1, 5, 16, 16))

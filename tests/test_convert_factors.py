"""What each pair is built from and what the plan says about it (whitened or weight SVD, folded weights), and what
the latency pass compares against."""

import pytest
import torch
from helpers import relative_error
from test_latency_objective import converted_names, scripted_clock, three_convs  # noqa: F401
from torch import nn

import convsep
from convsep.factorize import compose


def _model_and_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    return model, [torch.randn(2, 3, 8, 8) for _ in range(3)]


def test_activation_init_records_the_weight_error_of_the_pair_it_built():
    model, batches = _model_and_batches()
    converted = convsep.convert(model, rank=1, init="activation", refit=False, calibration_data=batches)
    for decision in converted.convsep_plan.converted:
        assert decision.whitening == "activation"
        pair = converted.get_submodule(decision.module)
        dense = compose(pair.depthwise.weight.double(), pair.pointwise.weight.double(), 1, decision.rank)
        measured = relative_error(dense, model.get_submodule(decision.name).weight)
        assert decision.relative_error == pytest.approx(measured, rel=1e-6), decision.name
        assert decision.predicted_output_error < decision.relative_error  # the whitened pair trades weight error away


def test_allocating_by_activations_without_a_refit_whitens_even_for_svd_init():
    model, batches = _model_and_batches()
    plan = convsep.convert(
        model,
        init="svd",
        allocate_by="activations",
        refit=False,
        calibration_data=batches,
        budget=0.6,
        budget_on="params",
    ).convsep_plan
    assert plan.activations == {"ridge": 1e-3, "positions_seen": 48}
    assert [d.whitening for d in plan.layers] == ["activation", "activation"]
    assert plan.budget["objective"] == "sum over layers of squared relative output error (predicted from the inputs)"
    assert plan.budget["allocated_by"] == "activations"


def test_a_spectral_normed_conv_converts_from_the_weight_its_forward_uses():
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(3, 8, 3))).eval()  # no forward yet: .weight is raw
    x = torch.randn(2, 3, 8, 8)
    converted = convsep.convert(model, rank="full")
    assert converted.convsep_plan.layers[0].folded == "spectral_norm"
    with torch.no_grad():
        assert relative_error(converted(x), model(x)) < 1e-5


@pytest.mark.usefixtures("scripted_clock")  # the layers' and the whole model's timings, scripted
def test_latency_objective_inplace_compares_against_a_copy_of_the_original():
    model = three_convs()
    converted = convsep.convert(
        model, rank=1, objective="latency", example_inputs=torch.randn(1, 3, 8, 8), inplace=True
    )
    assert converted is model
    assert converted_names(model) == {"2", "4"}  # the same layers as without inplace (test_latency_objective.py)

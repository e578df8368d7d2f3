"""convert(budget=...): what the budget counts, what it records, and why each layer was left as it was."""

import pytest
import torch
from torch import nn
from zoo import FunctionalConvNet

import convsep
from convsep.factorize import channel_matrices

BUDGET_KEEPS_ONE = "layers left out by include/exclude or fixed by ranks= count at their own cost"


def _three_convs():
    """Params (with biases): 1168 + 2320 + 145 = 3633. The last conv has one output: no rank saves anything there."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 1, 3))


def _weight_error(conv: nn.Conv2d, rank: int) -> float:
    """The Eckart-Young relative weight error of the per-channel SVD truncated at `rank`."""
    S = torch.linalg.svdvals(channel_matrices(conv.weight.detach().double(), conv.groups))
    return float((S[:, rank:].square().sum() / S.square().sum()).sqrt())


def test_params_budget_records_what_it_reached_and_says_why_each_layer_stayed():
    model = _three_convs()
    plan = convsep.convert(model, budget=0.5, budget_on="params").convsep_plan
    assert [(d.name, d.converted, d.rank, d.reason) for d in plan.layers] == [
        ("0", False, None, "budget=0.5 of params is spent with less error on other layers"),
        ("1", True, 1, ""),
        ("2", False, None, "no rank saves params here (the pair saves only below rank 0.90)"),
    ]
    assert plan.layers[1].relative_error == pytest.approx(_weight_error(model[1], 1), rel=1e-5)
    budget = dict(plan.budget)
    assert budget.pop("error") == pytest.approx(plan.layers[1].relative_error ** 2, rel=1e-6)
    # 33 bias params stay; layer 1 becomes 16*9 + 16*16 = 400 params at rank 1.
    assert budget == {
        "fraction": 0.5,
        "on": "params",
        "original": 3633,
        "reached": (33 + 1152 + 400 + 144) / 3633,
        "objective": "sum over layers of squared relative weight error",
        "allocated_by": "weights",
    }


def test_a_budget_that_cannot_be_met_says_the_smallest_that_can():
    with pytest.raises(convsep.ConvsepError) as info:
        convsep.convert(_three_convs(), budget=0.1, budget_on="params")
    assert str(info.value) == (
        "budget=0.1 cannot be met: with every convertible layer at its cheapest (rank 1 where that saves params) "
        "the model keeps 21.39% of its params, so the smallest reachable budget is 0.2139; " + BUDGET_KEEPS_ONE
    )


def test_a_budget_met_exactly_at_the_cheapest_ranks_is_reachable():
    class ConvAndTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, bias=False)  # 576 params; 8*9 + 8*8 = 136 at rank 1
            self.table = nn.Parameter(torch.zeros(304))  # so that 304 + 136 is exactly half of 304 + 576

    plan = convsep.convert(ConvAndTable(), budget=0.5, budget_on="params").convsep_plan
    assert [(d.name, d.converted, d.rank) for d in plan.layers] == [("conv", True, 1)]
    assert plan.budget["reached"] == 0.5


def test_a_model_that_runs_no_convolution_on_the_inputs_cannot_meet_a_macs_budget():
    class Bypass(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3)

        def forward(self, x):
            return x

    with pytest.raises(convsep.ConvsepError) as info:
        convsep.convert(Bypass(), budget=0.9, example_inputs=torch.randn(1, 4, 6, 6))
    assert str(info.value) == (
        "budget=0.9 cannot be met: with every convertible layer at its cheapest (rank 1 where that saves MACs) "
        "the model keeps 100.00% of its MACs, so the smallest reachable budget is 1.0000; " + BUDGET_KEEPS_ONE
    )


def test_a_conv_that_does_not_run_on_the_inputs_is_kept_and_costs_nothing():
    class OneIdle(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3)
            self.idle = nn.Conv2d(4, 8, 3)

        def forward(self, x):
            return self.conv(x)

    torch.manual_seed(0)
    plan = convsep.convert(OneIdle(), budget=0.9, example_inputs=torch.randn(1, 4, 6, 6)).convsep_plan
    assert [(d.name, d.converted, d.reason) for d in plan.layers] == [
        ("conv", True, ""),
        ("idle", False, "it did not run on example_inputs, so converting it saves no MACs"),
    ]
    original = 8 * 4 * 9 * 16  # 4x4 output positions
    assert plan.budget["original"] == original and type(plan.budget["original"]) is int
    rank = plan.layers[0].rank
    assert plan.budget["reached"] == (4 * 9 + 8 * 4) * rank * 16 / original


def test_a_functional_conv_counts_its_macs_under_a_macs_budget():
    model = FunctionalConvNet()  # stem: F.conv2d 3 -> 8, 3x3; conv: 8 -> 8, 3x3; 12x12 positions each
    plan = convsep.convert(model, budget=0.9, exclude="conv", example_inputs=torch.randn(1, 3, 12, 12)).convsep_plan
    stem, conv = 8 * 3 * 9 * 144, 8 * 8 * 9 * 144
    per_rank = (3 * 9 + 8 * 3) * 144
    # 0.9 of the whole leaves the stem at most 0.9 * (stem + conv) - conv MACs: rank 2, not 3.
    assert [(d.name, d.converted, d.rank) for d in plan.layers] == [("stem_weight", True, 2), ("conv", False, None)]
    assert plan.budget["original"] == stem + conv
    assert plan.budget["reached"] == (conv + 2 * per_rank) / (stem + conv)


def test_a_rank_override_under_a_budget_is_initialised_like_any_other_layer():
    model = _three_convs()
    plan = convsep.convert(model, budget=0.5, budget_on="params", ranks={"0": 2}).convsep_plan
    first = plan.layers[0]
    assert (first.converted, first.rank) == (True, 2)
    assert first.relative_error == pytest.approx(_weight_error(model[0], 2), rel=1e-5)

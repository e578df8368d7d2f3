"""Activation-aware factorisation and allocation: the truncation that least changes each layer's output."""

import pytest
import torch
from torch import nn

import convsep
from convsep.activations import input_moments, patches
from convsep.factorize import (
    channel_matrices,
    channel_svd,
    compose,
    discarded_energy_fraction,
    factors_from_svd,
    full_rank,
    whitened_channel_svd,
)
from helpers import relative_error


def _correlated_inputs(channels: int, positions: int = 4000, seed: int = 0) -> torch.Tensor:
    """(M, K=9, positions) patches whose energy sits in a few directions, unlike the identity the weight SVD assumes."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(channels, 9, 9, generator=generator, dtype=torch.float64)
    mixing[:, :, 3:] *= 0.05
    return mixing @ torch.randn(channels, 9, positions, generator=generator, dtype=torch.float64)


def _output_error(weight, groups, svd, rank, covariance) -> float:
    """sum_c tr((A_c - B_c) Sigma_c (A_c - B_c)^T): the expected output error energy without cross-channel terms."""
    A = channel_matrices(weight, groups)
    r = min(rank, svd.S.shape[1])
    error = A - (svd.U[:, :, :r] * svd.S[:, None, :r]) @ svd.Vh[:, :r]
    return float(torch.einsum("cnk,ckl,cnl->", error, covariance, error))


@pytest.mark.parametrize("groups", [1, 2])
def test_whitened_factorisation_is_exact_at_full_rank(groups):
    torch.manual_seed(0)
    weight = torch.randn(8, 4 // groups, 3, 3, dtype=torch.float64)
    x = _correlated_inputs(4)
    svd = whitened_channel_svd(weight, groups, x @ x.mT / x.shape[-1])
    r = full_rank(weight.shape, groups)
    factors = factors_from_svd(svd, r, weight.shape, groups, weight.dtype)
    assert relative_error(compose(factors.depthwise, factors.pointwise, groups, r), weight) < 1e-10


def _kernel_and_covariance():
    torch.manual_seed(0)
    x = _correlated_inputs(6)
    return torch.randn(16, 6, 3, 3, dtype=torch.float64), x @ x.mT / x.shape[-1]


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_whitened_truncation_loses_less_output_energy_than_the_weight_svd(rank):
    weight, covariance = _kernel_and_covariance()
    whitened = whitened_channel_svd(weight, 1, covariance, ridge=0.0)
    plain = channel_svd(weight, 1)
    assert _output_error(weight, 1, whitened, rank, covariance) < 0.9 * _output_error(weight, 1, plain, rank, covariance)


def test_discarded_whitened_energy_is_the_output_error_it_predicts():
    weight, covariance = _kernel_and_covariance()
    svd = whitened_channel_svd(weight, 1, covariance, ridge=0.0)
    A = channel_matrices(weight, 1)
    total = float(torch.einsum("cnk,ckl,cnl->", A, covariance, A))
    for rank in (1, 3):
        predicted = discarded_energy_fraction(svd.S, rank)
        assert predicted == pytest.approx(_output_error(weight, 1, svd, rank, covariance) / total, rel=1e-9)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 4, 3, stride=2, padding=1),
    nn.Conv2d(3, 4, 3, dilation=2, padding=2, padding_mode="reflect"),
    nn.Conv1d(3, 4, 5, stride=3, padding=2, padding_mode="circular"),
    nn.Conv3d(3, 4, 3, padding=1),
])  # fmt: skip
def test_patches_are_what_the_conv_multiplies(conv):
    """Each output of the conv is the weight times the patches, summed over channels: the moments describe those inputs."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, *([9] * (conv.weight.dim() - 2)))
    p = patches(x, conv)  # (batch, M*K, *positions)
    k = conv.weight[0].numel() // 3
    by_channel = p.reshape(2, 3, k, -1)
    expected = torch.einsum("nck,bckp->bnp", conv.weight.reshape(4, 3, k), by_channel) + conv.bias.reshape(1, 4, 1)
    torch.testing.assert_close(expected.reshape(conv(x).shape), conv(x), atol=1e-5, rtol=1e-5)


def test_input_moments_are_averaged_over_batches_and_positions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 40, 3))  # 40 outputs for 9 taps: every position is looked at
    data = [torch.randn(4, 2, 6, 6), torch.randn(2, 2, 6, 6)]
    moments = input_moments(model, {"0": model[0]}, data, batches=None)["0"]
    p = torch.cat([patches(x, model[0]).reshape(len(x), 2, 9, -1).permute(1, 2, 0, 3).reshape(2, 9, -1) for x in data], -1)
    assert moments.count == 6 * 16
    torch.testing.assert_close(moments.covariance(), (p.double() @ p.double().mT / p.shape[-1]), rtol=1e-6, atol=1e-6)


def test_long_kernels_with_few_outputs_sample_every_sth_position():
    """16 taps, 8 outputs: the statistics would cost more than the conv, so every 8th position is used."""
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 8, 16, padding=4)
    x = torch.randn(5, 3, 100)
    moments = input_moments(nn.Sequential(conv), {"0": conv}, [x], batches=None)["0"]
    every = patches(x, conv).reshape(5, 3, 16, -1)[..., ::8].permute(1, 2, 0, 3).reshape(3, 16, -1).double()
    assert moments.count == every.shape[-1] == 5 * 12
    torch.testing.assert_close(moments.covariance(), every @ every.mT / every.shape[-1], rtol=1e-6, atol=1e-6)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    ).eval()  # fmt: skip


def _images(count=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(count, 3, 1, 1, generator=generator)  # smooth images: neighbouring pixels correlate
    return [base + 0.1 * torch.randn(count, 3, 12, 12, generator=generator) for _ in range(3)]


def test_data_used_only_for_conversion_is_used_activation_aware_and_the_plan_says_so():
    model, data = _net(), _images()
    converted = convsep.convert(model, budget=0.4, example_inputs=data[0][:1], calibration_data=data, refit=False,
                                init="activation")  # fmt: skip
    plan = converted.convsep_plan
    assert plan.init == "activation" and plan.budget["allocated_by"] == "activations"
    assert all(d.whitening == "activation" and 0 <= d.predicted_output_error < 1 for d in plan.converted)


def test_data_used_only_for_conversion_fits_the_pairs_jointly_and_allocates_by_what_that_leaves():
    model, data = _net(), _images()
    converted = convsep.convert(model, budget=0.4, example_inputs=data[0][:1], calibration_data=data, refit=False)
    plan = converted.convsep_plan
    assert plan.init == "joint" and plan.budget["allocated_by"] == "activations" and plan.calibration is None
    assert "after calibration's refit" in plan.budget["objective"]  # the joint fit solves the pointwise weights too
    fitted, whitened = plan.converted[0], plan.converted[1:]
    assert fitted.joint_fit.startswith("fitted on the input moments")
    assert fitted.whitening == "" and fitted.predicted_output_error is None
    # Too few sampled patches for the wider layers: the whitened pair, what init="activation" builds.
    for d in whitened:
        assert d.joint_fit == (
            "whitened SVD: 288 input patches were sampled, fewer than 4 per column of its 144-wide moments: more "
            "calibration data would allow it"
        )
        assert d.whitening == "activation" and 0 < d.predicted_output_error < 1
    svd = convsep.convert(model, ranks={d.name: d.rank for d in plan.converted}, init="svd").convsep_plan
    for d, plain in zip(whitened, svd.converted[1:], strict=True):
        weight = model.get_submodule(d.name).weight.detach().double()
        pair = converted.get_submodule(d.name).weight.detach().double()
        measured = float((pair - weight).norm() / weight.norm())
        assert measured == pytest.approx(d.relative_error, rel=1e-4)  # the whitened truncation's weight error ...
        assert d.relative_error > 1.01 * plain.relative_error  # ... not the weight SVD's, the least there is


def test_auto_keeps_the_weight_svd_and_weight_error_without_data():
    model, data = _net(), _images()
    plan = convsep.convert(model, budget=0.4, example_inputs=data[0][:1]).convsep_plan
    assert plan.init == "svd" and plan.budget["allocated_by"] == "weights" and plan.activations is None
    assert all(d.predicted_output_error is None and d.predicted_refit_error is None for d in plan.converted)


def test_auto_with_calibration_allocates_by_the_error_the_refit_leaves_and_fits_the_pairs_jointly():
    model, data = _net(), _images()
    plan = convsep.convert(model, budget=0.4, example_inputs=data[0][:1], calibration_data=data).convsep_plan
    assert plan.init == "joint" and plan.budget["allocated_by"] == "activations"
    assert plan.budget["objective"] == "sum over layers of squared relative output error after calibration's refit (predicted from the inputs)"
    assert all(d.predicted_output_error is None and 0 <= d.predicted_refit_error < 1 for d in plan.converted)
    # What the allocation weighed, from the weight SVD's filters; the joint fit lowered it (what the plan records).
    allocated = convsep.convert(model, budget=0.4, example_inputs=data[0][:1], calibration_data=data, init="svd")
    assert allocated.convsep_plan.budget == plan.budget
    errors = {d.name: d.predicted_refit_error for d in allocated.convsep_plan.converted}
    assert plan.budget["error"] == pytest.approx(sum(e**2 for e in errors.values()))
    fitted = [d for d in plan.converted if d.joint_fit.startswith("fitted")]
    assert all(d.predicted_refit_error < errors[d.name] for d in fitted)  # (these few images afford no round)
    assert all(d.predicted_refit_error == errors[d.name] for d in plan.converted if d not in fitted)


def test_activation_init_lowers_each_layers_error_on_the_inputs_it_sees():
    model, data = _net(), _images()
    errors = {}
    for init in ("svd", "activation"):
        converted = convsep.convert(model, rank=1, calibration_data=data, init=init)  # calibrate measures "initial"
        errors[init] = {name: e["initial"] for name, e in converted.convsep_plan.calibration["layers"].items()}
    assert all(errors["activation"][name] < errors["svd"][name] for name in errors["svd"])


def test_predicted_output_error_matches_the_measured_one_without_cross_channel_terms():
    """One input channel: no cross-channel terms, so the prediction is the layer's measured error (up to the ridge)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1)).eval()
    data = [torch.randn(4, 1, 10, 10).cumsum(-1) for _ in range(2)]
    converted = convsep.convert(model, rank=2, calibration_data=data, init="activation")
    decision = converted.convsep_plan.converted[0]
    measured = converted.convsep_plan.calibration["layers"]["0"]["initial"]
    assert decision.predicted_output_error == pytest.approx(measured, rel=0.02)


def test_full_rank_with_activation_init_is_still_exact():
    model, data = _net().double(), [x.double() for x in _images()]
    converted = convsep.convert(model, rank="full", calibration_data=data, refit=False, init="activation")
    assert converted.convsep_plan.init == "activation"
    with torch.no_grad():
        assert relative_error(converted(data[0]), model(data[0])) < 1e-8


def test_refit_false_uses_the_data_only_for_the_factorisation():
    model, data = _net(), _images()
    converted = convsep.convert(model, rank=1, calibration_data=data, refit=False)
    assert converted.convsep_plan.calibration is None and converted.convsep_plan.init == "joint"


def test_a_layer_whose_inputs_are_all_zero_keeps_the_weight_svd_and_says_why():
    class Silent(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return self.a(x) + self.b(x * 0)

    torch.manual_seed(0)
    model = Silent().eval()
    converted = convsep.convert(model, rank=1, calibration_data=_images(), refit=False, init="activation")
    decisions = {d.name: d for d in converted.convsep_plan.layers}
    assert decisions["b"].whitening == "weight SVD: its inputs on the calibration data are all zero"
    joint = convsep.convert(model, rank=1, calibration_data=_images(), refit=False)
    assert joint.convsep_plan.layers[1].joint_fit == "weight SVD: its inputs on the calibration data are all zero"
    assert joint.convsep_plan.layers[0].joint_fit.startswith("fitted on the input moments")
    torch.testing.assert_close(joint.b.depthwise.weight, convsep.convert(model, rank=1, init="svd").b.depthwise.weight)
    assert all(torch.isfinite(p).all() for p in joint.parameters())
    assert decisions["a"].whitening == "activation"
    weight_svd = convsep.convert(model, rank=1, init="svd")
    torch.testing.assert_close(converted.b.depthwise.weight, weight_svd.b.depthwise.weight)
    assert all(torch.isfinite(p).all() for p in converted.parameters())


@pytest.mark.parametrize("kwargs, match", [
    ({"init": "activation"}, "init='activation' needs calibration_data"),
    ({"allocate_by": "activations"}, "allocate_by='activations' needs calibration_data"),
    ({"allocate_by": "outputs"}, "allocate_by='outputs' is not known"),
    ({"init": "whitened"}, "init='whitened' is not known"),
])  # fmt: skip
def test_activation_options_refuse_what_cannot_work(kwargs, match):
    with pytest.raises(convsep.ConvsepValueError, match=match):
        convsep.convert(_net(), **kwargs)


def test_report_shows_predicted_and_measured_output_errors():
    model, data = _net(), _images()
    converted = convsep.convert(model, rank=1, calibration_data=data, init="activation")
    report = convsep.report(model, converted, data[0][:1])
    plan = converted.convsep_plan
    predicted = {d.name: d.predicted_output_error for d in plan.layers}
    for row in report.rows:
        assert row["predicted_output_error"] == predicted[row["name"]] is not None
        assert row["measured_output_error"] == plan.calibration["layers"][row["name"]]["initial"]
    assert "output error predicted" in str(report)


def test_report_shows_the_refit_error_predicted_and_what_calibration_left():
    model, data = _net(), _images()
    converted = convsep.convert(model, budget=0.4, example_inputs=data[0][:1], calibration_data=data)
    report = convsep.report(model, converted, data[0][:1])
    plan = converted.convsep_plan
    decisions = {d.name: d for d in plan.layers}
    rows = [row for row in report.rows if decisions[row["name"]].converted]
    assert rows
    for row in rows:
        assert row["predicted_refit_error"] == decisions[row["name"]].predicted_refit_error is not None
        assert row["measured_refit_error"] == plan.calibration["layers"][row["name"]]["after"]
        assert row["predicted_output_error"] is None
    header = str(report).splitlines()[[i for i, line in enumerate(str(report).splitlines()) if "layer" in line][0]]
    assert "after refit predicted" in header and "output error predicted" not in header


class _TwoBranches(nn.Module):
    """Branch `a` sees constant inputs and has a flat weight spectrum; branch `b` sees white noise and has a
    decaying one. By weight error `a` needs the ranks; by output error `b` does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(4, 16, 3, padding=1), nn.Conv2d(4, 16, 3, padding=1)
        with torch.no_grad():
            decay = torch.tensor([1.0, 0.5, 0.25, 0.12, 0.06, 0.03, 0.02, 0.01, 0.01])
            u, _, vh = torch.linalg.svd(self.b.weight.permute(1, 0, 2, 3).reshape(4, 16, 9), full_matrices=False)
            self.b.weight.copy_(((u * decay) @ vh).reshape(4, 16, 3, 3).permute(1, 0, 2, 3))

    def forward(self, x):
        flat = x.mean(dim=(2, 3), keepdim=True).expand_as(x)  # every patch of a channel alike: one direction
        return self.a(flat) + self.b(x)


def test_allocating_by_activations_spends_the_ranks_where_the_output_error_is():
    model = _TwoBranches().eval()
    generator = torch.Generator().manual_seed(2)
    data = [torch.randn(8, 4, 16, 16, generator=generator) for _ in range(2)]
    plans = {
        by: convsep.convert(model, budget=0.5, example_inputs=data[0][:1], calibration_data=data, allocate_by=by, refit=False, init="activation").convsep_plan
        for by in ("weights", "activations")
    }
    ranks = {by: {d.name: d.rank if d.converted else "keep" for d in plan.layers} for by, plan in plans.items()}
    predicted = {by: sum(d.predicted_output_error**2 for d in plan.converted) for by, plan in plans.items()}
    assert ranks["weights"]["a"] == "keep" or ranks["weights"]["a"] > ranks["weights"]["b"]
    assert ranks["activations"]["b"] == "keep" or ranks["activations"]["b"] > ranks["activations"]["a"]
    assert predicted["activations"] < 0.8 * predicted["weights"]


def test_half_precision_models_gather_their_statistics_in_float32():
    """bf16 sums would round off more than the ridge adds, and the covariance would not be positive definite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1)).to(torch.bfloat16).eval()
    x = torch.randn(8, 3, 12, 12)
    x[:, 0] = 100 * torch.linspace(0, 1, 12) + 0.01 * x[:, 0]  # one loud, smooth channel
    converted = convsep.convert(model, rank=2, calibration_data=[x.to(torch.bfloat16)], refit=False, init="activation")
    assert converted.convsep_plan.converted[0].whitening == "activation"
    joint = convsep.convert(model, rank=2, calibration_data=[x.to(torch.bfloat16)], refit=False)
    assert joint.convsep_plan.converted[0].joint_fit.startswith("fitted on the input moments")
    assert all(torch.isfinite(p).all() for p in joint.parameters())
    assert all(torch.isfinite(p.float()).all() for p in converted.parameters())


def test_conv_subclasses_with_their_own_constructor_get_statistics():
    class Cube(nn.Conv3d):
        def __init__(self, channels):
            super().__init__(channels, 8, 3, padding=1)

    torch.manual_seed(0)
    model = nn.Sequential(Cube(2)).eval()
    converted = convsep.convert(model, rank=1, include="0", calibration_data=[torch.randn(2, 2, 5, 5, 5)], refit=False,
                                init="activation")  # fmt: skip
    assert converted.convsep_plan.converted[0].whitening == "activation"

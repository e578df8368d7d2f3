"""init="joint": a pair's depthwise filters and pointwise weights fitted together on the input moments the statistics
pass gathered (joint_fit.py), without another pass over the data."""

import copy

import pytest
import torch
from helpers import relative_error
from torch import nn

import convsep
from convsep import joint_fit, least_squares
from convsep.activations import input_moments
from convsep.errors import ConvsepValueError
from convsep.joint_fit import fit_jointly, moment_stats, why_not_joint
from convsep.least_squares import LayerStats


def conv_and_data(conv, shape, batches=3, seed=0):
    torch.manual_seed(seed)
    # Correlated channels: what the joint fit can use and the weight SVD cannot see.
    mix = torch.randn(shape[0], shape[0])
    data = [torch.einsum("dc,nc...->nd...", mix, torch.randn(4, *shape)) for _ in range(batches)]
    return conv.eval(), data


def moments_of(conv, data):
    return input_moments(nn.Sequential(conv), {"0": conv}, data, None, cross_channel=True)["0"]


@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv2d(4, 40, 3, padding=1), (4, 6, 6)),  # every position sampled (36 patch columns, 40 outputs)
        (nn.Conv2d(6, 54, 3, padding=1, groups=2, bias=False), (6, 5, 5)),
        (nn.Conv1d(3, 30, 5, padding=2, stride=2), (3, 11)),
    ],
)
def test_the_sums_from_the_moments_are_those_of_a_pass_over_the_conv_outputs(conv, shape):
    conv, data = conv_and_data(conv, shape)
    pair = convsep.convert(nn.Sequential(conv), rank=1, init="svd")[0]
    expected = LayerStats(pair, True, on_original_inputs=True)
    with torch.no_grad():
        for x in data:
            expected.add(x, conv(x), "0")
    stats = moment_stats(pair, conv.weight, conv.bias, moments_of(conv, data))
    assert stats.count == expected.count == sum(x.shape[0] for x in data) * conv(data[0]).shape[2:].numel()
    for name in ("gram", "cross", "feature_sum", "target_sum"):
        torch.testing.assert_close(getattr(stats, name), getattr(expected, name), rtol=1e-5, atol=1e-3, msg=name)
    assert stats.target_energy == pytest.approx(expected.target_energy, rel=1e-5)
    assert stats.all_target_energy == stats.target_energy


def test_at_full_rank_the_pair_stays_exact():
    conv, data = conv_and_data(nn.Conv2d(4, 40, 3, padding=1), (4, 6, 6))
    pair = convsep.SeparableConv2d.from_conv(conv, rank="full")
    before, after, rounds = fit_jointly(pair, conv.weight, conv.bias, moments_of(conv, data), "0", ridge=1e-3)
    assert before < 1e-5 and after < 1e-5 and rounds == 1  # nothing left to gain: no further round
    with torch.no_grad():
        assert relative_error(pair(data[0]), conv(data[0])) < 1e-4


def test_at_low_rank_it_lowers_the_output_error_to_what_it_reports():
    conv, data = conv_and_data(nn.Conv2d(4, 40, 3, padding=1), (4, 6, 6))
    svd_pair = convsep.SeparableConv2d.from_conv(conv, rank=1)
    pair = copy.deepcopy(svd_pair)
    before, after, _ = fit_jointly(pair, conv.weight, conv.bias, moments_of(conv, data), "0", ridge=1e-3)
    x, y = torch.cat(data), conv(torch.cat(data)).detach()
    with torch.no_grad():
        assert relative_error(svd_pair(x), y) == pytest.approx(before, rel=1e-3)  # as built: the weight SVD
        assert relative_error(pair(x), y) == pytest.approx(after, rel=1e-3)
    assert after < before - 0.02
    # Better than refitting the pointwise weights alone: the filters moved too.
    alone = copy.deepcopy(svd_pair)
    _, pointwise_only, _ = fit_jointly(alone, conv.weight, conv.bias, moments_of(conv, data), "0", 1e-3, rounds=0)
    assert torch.equal(alone.depthwise.weight, svd_pair.depthwise.weight)
    assert not torch.allclose(pair.depthwise.weight, svd_pair.depthwise.weight)
    assert after < pointwise_only - 0.01, (before, pointwise_only, after)


def test_layers_it_cannot_fit_say_why():
    conv, data = conv_and_data(nn.Conv2d(8, 8, 3, padding=1), (8, 5, 5))
    moments = moments_of(conv, data)
    pair = convsep.SeparableConv2d.from_conv(conv, rank=1)
    assert moments.count == 60  # 300 positions, every 9th (each call starting one further on)
    assert why_not_joint(pair, moments) == (
        "60 input patches were sampled, fewer than 4 per column of its 72-wide moments: more calibration data would "
        "allow it"
    )
    moments.count = 288
    assert why_not_joint(pair, moments) is None
    moments.block = 4  # as if the group's moments had been too large to keep whole
    assert why_not_joint(pair, moments) == "its input moments were taken in blocks of 4 channels, not whole groups of 8"
    wide = convsep.SeparableConv2d.from_conv(nn.Conv2d(512, 8, 3), rank=1)  # 4,608 filter weights
    moments.block, moments.count = 512, 10**6
    assert "4608 unknowns per group (more than 4096)" in why_not_joint(wide, moments)
    at_the_cap = convsep.SeparableConv1d.from_conv(nn.Conv1d(64, 8, 64), rank=1)  # 64 x 64 = 4,096: allowed
    moments.block = 64
    assert why_not_joint(at_the_cap, moments) is None


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5),
    ).eval()  # fmt: skip
    mix = torch.randn(3, 3)
    # Enough sampled patches for the widest layer (32 channels x 9 taps: 4 per column, every 9th position).
    return model, [torch.einsum("dc,nchw->ndhw", mix, torch.randn(8, 3, 10, 10)) for _ in range(16)]


def test_convert_fits_each_pair_on_its_inputs_and_records_it():
    model, data = model_and_data()
    svd = convsep.convert(model, rank=1, init="svd", calibration_data=data, refit=False)
    joint = convsep.convert(model, rank=1, init="joint", calibration_data=data, refit=False)
    plan = joint.convsep_plan
    assert plan.init == "joint"
    assert all(d.joint_fit.startswith("fitted on the input moments (") for d in plan.converted)
    assert all(d.joint_fit == "" for d in svd.convsep_plan.converted)
    for d in plan.converted:  # the weight error recorded is the fitted pair's, not the SVD's it started from
        weight = model.get_submodule(d.name).weight.detach().double()
        pair = joint.get_submodule(d.name).weight.detach().double()
        assert d.relative_error == pytest.approx(float((pair - weight).norm() / weight.norm()), rel=1e-6)
    x = torch.cat(data)
    with torch.no_grad():
        # The first pair sees the original's inputs: its error is the one recorded.
        first = relative_error(joint[0](x), model[0](x))
        assert first == pytest.approx(plan.converted[0].predicted_refit_error, rel=1e-3)
        assert first < relative_error(svd[0](x), model[0](x))
        assert relative_error(joint(x), model(x)) < relative_error(svd(x), model(x))


def test_each_joint_pair_leaves_calibration_less_to_fix_on_the_original_inputs():
    """Calibrated at once (each pair's pointwise weights refitted on the original model's inputs), every joint pair
    ends with a lower error than the weight SVD's: its filters are fitted too."""
    model, data = model_and_data()
    after = {}
    for init in ("svd", "joint"):
        converted = convsep.convert(model, rank=1, init=init, calibration_data=data, calibration_sequential=False)
        after[init] = {name: e["after"] for name, e in converted.convsep_plan.calibration["layers"].items()}
    assert all(after["joint"][name] < after["svd"][name] for name in after["svd"]), after


def test_a_layer_the_data_never_reaches_keeps_the_svd_pair_with_the_reason():
    model, data = model_and_data()

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.unused = model, nn.Conv2d(3, 16, 3)

        def forward(self, x):
            return self.body(x)

    skips = Skips()
    converted = convsep.convert(skips, rank=1, init="joint", calibration_data=data, refit=False)
    svd = convsep.convert(skips, rank=1, init="svd")
    unused = next(d for d in converted.convsep_plan.converted if d.name == "unused")
    assert unused.joint_fit == "weight SVD: the calibration data never reached this layer"
    for name, value in svd.unused.state_dict().items():
        assert torch.equal(converted.unused.state_dict()[name], value), name


def test_init_joint_needs_data():
    model, _ = model_and_data()
    with pytest.raises(ConvsepValueError, match="init='joint' needs calibration_data"):
        convsep.convert(model, rank=1, init="joint")


def test_the_rounds_stop_once_a_round_no_longer_lowers_the_error_by_the_tolerance(monkeypatch):
    conv, data = conv_and_data(nn.Conv2d(4, 40, 3, padding=1), (4, 6, 6))
    moments = moments_of(conv, data)
    svd_pair = convsep.SeparableConv2d.from_conv(conv, rank=5)  # an error near 0.4: relative and absolute differ
    tolerant, exhaustive = copy.deepcopy(svd_pair), copy.deepcopy(svd_pair)
    _, stopped_at, ran = fit_jointly(tolerant, conv.weight, conv.bias, moments, "0", 1e-3)
    monkeypatch.setattr(joint_fit, "JOINT_TOLERANCE", -1.0)  # never stop early
    _, further, every = fit_jointly(exhaustive, conv.weight, conv.bias, moments, "0", 1e-3, rounds=ran + 20)
    assert 1 < ran < every == ran + 20
    assert further < stopped_at  # later rounds still gain, but less than the tolerance each
    # Round by round: each until the last gained at least 0.1% of the error before it; the last gained less.
    errors = [fit_jointly(copy.deepcopy(svd_pair), conv.weight, conv.bias, moments, "0", 1e-3, rounds=k)[1]
              for k in range(ran + 1)]  # fmt: skip
    assert errors[-1] == stopped_at
    gains = [(errors[k - 1] - errors[k]) / errors[k - 1] for k in range(1, ran + 1)]
    assert all(gain >= 1e-3 for gain in gains[:-1]) and gains[-1] < 1e-3
    _, _, capped = fit_jointly(copy.deepcopy(svd_pair), conv.weight, conv.bias, moments, "0", 1e-3, rounds=1)
    assert capped == 1


def test_each_round_is_one_round_of_calibrations_alternation(monkeypatch):
    conv, data = conv_and_data(nn.Conv2d(4, 40, 3, padding=1), (4, 6, 6))
    moments = moments_of(conv, data)
    pair = convsep.SeparableConv2d.from_conv(conv, rank=1)
    reference = copy.deepcopy(pair)
    monkeypatch.setattr(joint_fit, "JOINT_TOLERANCE", -1.0)
    fit_jointly(pair, conv.weight, conv.bias, moments, "0", 1e-3, rounds=3)
    least_squares.fit(reference, moment_stats(reference, conv.weight, conv.bias, moments), 1e-3, 3, "0")
    for name, value in reference.state_dict().items():
        assert torch.equal(pair.state_dict()[name], value), name


def test_moments_that_are_not_finite_are_refused_naming_the_layer():
    conv, data = conv_and_data(nn.Conv2d(4, 40, 3, padding=1), (4, 6, 6))
    data[1][0, 0, 0, 0] = float("nan")
    pair = convsep.SeparableConv2d.from_conv(conv, rank=1)
    with pytest.raises(ConvsepValueError, match="^calibrating 'layer3': its inputs or the original layer's outputs"):
        fit_jointly(pair, conv.weight, conv.bias, moments_of(conv, data), "layer3", 1e-3)


def test_rounds_cost_no_more_than_the_conv_over_the_data():
    pair = convsep.SeparableConv2d.from_conv(nn.Conv2d(8, 8, 3), rank=1)  # 72 filter weights, 9 pointwise inputs
    per_round = 72**3 / 3 + 2 * 72**2 + 9**3 / 3 + 9**2 * 8
    assert joint_fit.rounds_affordable(pair, 5 * per_round) == 5
    assert joint_fit.rounds_affordable(pair, 5 * per_round - 1) == 4
    assert joint_fit.rounds_affordable(pair, 1e18) == joint_fit.JOINT_ROUNDS
    grouped = convsep.SeparableConv2d.from_conv(nn.Conv2d(8, 12, 3, groups=2), rank=2)  # per group: 72 unknowns, 9
    per_round = 2 * (72**3 / 3 + 2 * 72**2 + 9**3 / 3 + 9**2 * 12)
    assert joint_fit.rounds_affordable(grouped, 3 * per_round) == 3
    assert joint_fit.rounds_affordable(grouped, 3 * per_round - 1) == 2


def test_on_little_data_only_the_pointwise_weights_are_fitted_and_the_plan_says_why():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1)).eval()
    # 13 x 144 positions, every third sampled: enough patches for the 144-wide moments (624 >= 4 x 144), but the conv
    # over them costs less than one round of rank 3's 432 unknowns.
    data = [torch.randn(13, 16, 12, 12)]
    converted = convsep.convert(model, rank=3, init="joint", calibration_data=data, refit=False)
    decision = converted.convsep_plan.converted[0]
    assert (
        decision.joint_fit == "fitted on the input moments (0 rounds; more would cost more than the conv over the data)"
    )
    svd = convsep.convert(model, rank=3, init="svd")
    assert torch.equal(converted[0].depthwise.weight, svd[0].depthwise.weight)
    assert not torch.allclose(converted[0].pointwise.weight, svd[0].pointwise.weight)


def test_with_calibration_to_follow_a_layer_that_affords_no_round_keeps_the_svd_pair():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1)).eval()
    data = [torch.randn(13, 16, 12, 12)]  # as above
    converted = convsep.convert(model, rank=3, init="joint", calibration_data=data, refit=True)
    assert (
        converted.convsep_plan.converted[0].joint_fit
        == "weight SVD: one round would cost more than the conv over the data"
    )
    assert torch.equal(converted[0].depthwise.weight, convsep.convert(model, rank=3, init="svd")[0].depthwise.weight)


def test_a_layer_with_nothing_to_fit_stops_after_one_round():
    conv, data = conv_and_data(nn.Conv2d(4, 40, 3, padding=1), (4, 6, 6))
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()  # a pruned layer: outputs all zero, met exactly
    pair = convsep.SeparableConv2d.from_conv(conv, rank=1)
    before, after, rounds = fit_jointly(pair, conv.weight, conv.bias, moments_of(conv, data), "0", ridge=1e-3)
    assert (before, after, rounds) == (0.0, 0.0, 1)
    assert all(torch.isfinite(p).all() for p in pair.parameters())


def test_latency_objective_fits_the_pairs_it_keeps_and_clears_the_ones_it_reverts():
    model, data = model_and_data()
    converted = convsep.convert(model, rank=1, init="joint", calibration_data=data, refit=False,
                                objective="latency", example_inputs=data[0][:1])  # fmt: skip
    for d in converted.convsep_plan.layers:
        if d.converted:
            assert d.joint_fit.startswith("fitted on the input moments") and d.predicted_refit_error is not None
        else:  # kept for speed: no pair, no fit
            assert d.joint_fit == "" and d.predicted_refit_error is None and d.relative_error is None

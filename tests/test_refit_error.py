"""The output error calibration's pointwise refit leaves, predicted from the input moments (refit_error.py)."""

import itertools
import math
import re

import pytest
import torch
from torch import nn

import convsep
from convsep.activations import InputMoments, cross_channel_block, input_moments, patches, sampling_step
from convsep.count import largest_saving_rank, saves_macs
from convsep.factorize import channel_svd, whitened_channel_svd
from convsep.refit_error import refit_errors


def _inputs(conv, count=6, size=7, seed=0):
    """Inputs whose channels share a common part: the cross-channel terms matter."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(count, 1, size, size, generator=generator, dtype=torch.float64)
    own = torch.randn(count, conv.in_channels, size, size, generator=generator, dtype=torch.float64)
    return shared + 0.3 * own + 0.5


def _moments(conv, x, block):
    p = patches(x, conv)  # (batch, M*K, positions)
    rows = p.transpose(1, 2).reshape(-1, p.shape[1])
    blocks = rows.reshape(rows.shape[0], -1, block * math.prod(conv.kernel_size)).transpose(0, 1)
    return blocks.mT @ blocks / rows.shape[0], rows.mean(0), rows


def _least_squares_error(conv, rows, depthwise, rank, bias):
    """Relative error of the best pointwise weights (and bias), by a direct least squares per group."""
    n, g, k = conv.out_channels, conv.groups, math.prod(conv.kernel_size)
    m = conv.in_channels
    total, lost = 0.0, 0.0
    for group in range(g):
        channels = range(group * m // g, (group + 1) * m // g)
        x = rows.reshape(rows.shape[0], m, k)[:, channels]  # (positions, M/g, K)
        w = conv.weight.detach().double()[group * n // g : (group + 1) * n // g].reshape(n // g, -1)
        y = x.reshape(x.shape[0], -1) @ w.T
        if bias:
            y = y + conv.bias.detach().double()[group * n // g : (group + 1) * n // g]
        total += float(y.square().sum())  # the energy calibration divides by: the output's, mean included
        z = torch.einsum("pck,cjk->pcj", x, depthwise[list(channels), :rank].double()).reshape(x.shape[0], -1)
        if bias:  # the refit fits a bias too
            z, y = z - z.mean(0), y - y.mean(0)
        solution = torch.linalg.lstsq(z, y, driver="gelsd").solution  # SVD based: rank-deficient z too
        lost += float((y - z @ solution).square().sum())
    return lost / total


@pytest.mark.parametrize("groups, bias", [(1, False), (1, True), (2, False), (2, True)])
def test_predicted_error_is_the_least_squares_refit_error(groups, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups, bias=bias).double()
    second, mean, rows = _moments(conv, _inputs(conv), conv.in_channels // groups)
    depthwise = channel_svd(conv.weight, groups).Vh
    predicted = refit_errors(conv.weight, conv.bias, groups, depthwise, second, mean, 3, ridge=0.0)
    expected = [_least_squares_error(conv, rows, depthwise, r, bias) for r in (1, 2, 3)]
    assert predicted == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_full_rank_loses_nothing_and_more_rank_never_loses_more():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 16, 3, padding=1).double()
    second, mean, _ = _moments(conv, _inputs(conv), 3)
    errors = refit_errors(conv.weight, conv.bias, 1, channel_svd(conv.weight, 1).Vh, second, mean, 9, ridge=0.0)
    assert errors[-1] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(errors)) and errors[0] > 0.01


def test_any_nested_depthwise_basis_works_the_whitened_one_too():
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 8, 3, padding=1).double()
    second, mean, rows = _moments(conv, _inputs(conv), 4)
    channel_second = torch.stack([second[0, c * 9 : (c + 1) * 9, c * 9 : (c + 1) * 9] for c in range(4)])
    basis = whitened_channel_svd(conv.weight, 1, channel_second, ridge=0.0).Vh
    predicted = refit_errors(conv.weight, None, 1, basis, second, mean, 2, ridge=0.0)
    assert predicted == pytest.approx([_least_squares_error(conv, rows, basis, r, False) for r in (1, 2)], rel=1e-6)


def test_redundant_channels_lose_little_at_rank_one_whatever_the_weight_spectrum():
    """Every channel sees the same input: one filter per channel spans what the refit needs at rank 1 only if
    the refit can mix channels (the weight error alone says rank 1 loses most of the kernel)."""
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False).double()
    x = _inputs(conv)[:, :1].expand(-1, 4, -1, -1).contiguous()  # 4 copies of one channel
    second, mean, _ = _moments(conv, x, 4)
    svd = channel_svd(conv.weight, 1)
    errors = refit_errors(conv.weight, None, 1, svd.Vh, second, mean, 4, ridge=0.0)
    weight_error_at_4 = float(svd.S[:, 4:].square().sum() / svd.S.square().sum())
    # four channels x four filters span all 9 taps of the one input (up to its 4-dim overlap): nothing lost at rank 3
    assert errors[2] < 1e-9 < weight_error_at_4


def test_ridge_keeps_channels_the_data_never_excites_solvable():
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False).double()
    x = _inputs(conv)
    x[:, 2] = 0  # one dead channel: its block of the moments is zero
    second, mean, _ = _moments(conv, x, 3)
    errors = refit_errors(conv.weight, None, 1, channel_svd(conv.weight, 1).Vh, second, mean, 3, ridge=1e-3)
    assert all(math.isfinite(e) and 0 <= e <= 1 for e in errors)


@pytest.mark.parametrize("seed", range(5))
def test_inputs_that_leave_the_system_singular_still_give_the_least_squares_error(seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False).double()
    x = _inputs(conv)
    x[:, 2] = 0  # no ridge, one dead channel: the Cholesky factorisation fails, the error is still defined
    second, mean, rows = _moments(conv, x, 3)
    basis = channel_svd(conv.weight, 1).Vh
    errors = refit_errors(conv.weight, None, 1, basis, second, mean, 2, ridge=0.0)
    assert errors == pytest.approx([_least_squares_error(conv, rows, basis, r, False) for r in (1, 2)], rel=1e-6)


def test_cross_channel_moments_are_the_patch_products_and_their_diagonal_the_per_channel_ones():
    torch.manual_seed(4)
    conv = nn.Conv2d(4, 64, 3, padding=1).double()  # many outputs: every position is used
    x = _inputs(conv, count=3)
    assert sampling_step(conv, cross_channel_block(conv)) == 1 and cross_channel_block(conv) == 4
    crossed = input_moments(nn.Sequential(conv), {"0": conv}, [x[:2], x[2:]], None, cross_channel=True)["0"]
    single = input_moments(nn.Sequential(conv), {"0": conv}, [x], None)["0"]
    second, mean, _ = _moments(conv, x, 4)
    torch.testing.assert_close(crossed.covariance(), second)
    torch.testing.assert_close(crossed.mean(), mean)
    torch.testing.assert_close(crossed.channel_covariance(), single.covariance())
    torch.testing.assert_close(single.mean(), mean)


def test_cross_channel_moments_sample_every_sth_position_starting_one_further_each_batch():
    conv = nn.Conv1d(8, 2, 5, padding=2).double()  # 8 channels x 5 taps against 2 outputs: s = ceil(40 / 2) = 20
    x = torch.randn(3, 8, 30, dtype=torch.float64)
    moments = InputMoments.empty(conv, 8, "cpu")
    for batch in x.split(1):
        moments.add(batch, conv)
    every = patches(x, conv)  # (3, 40, 30)
    rows = torch.cat([every[i, :, [i, 20 + i]] for i in range(3)], dim=1)  # batch i: positions i and 20 + i
    assert moments.count == 6
    torch.testing.assert_close(moments.covariance()[0], rows @ rows.T / 6)
    torch.testing.assert_close(moments.mean(), rows.mean(1))


@pytest.mark.parametrize("conv", [
    nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2),
    nn.Conv1d(2, 3, 3, padding=1, padding_mode="reflect"), nn.Conv3d(2, 3, 3, padding=1), nn.Conv2d(2, 3, 3, padding="same"),
], ids=["2d", "1d", "1d_reflect", "3d", "2d_same"])  # fmt: skip
@pytest.mark.parametrize("phase", [0, 1, 3])
def test_sampled_patches_are_the_phase_and_every_third_of_all(conv, phase):
    x = torch.randn(2, 2, *([9] * len(conv.kernel_size)), dtype=torch.float64)
    conv = conv.double()
    everything = patches(x, conv).reshape(2, 2 * math.prod(conv.kernel_size), *conv(x).shape[2:])
    torch.testing.assert_close(patches(x, conv, every=3, phase=phase).flatten(2), everything[..., phase::3].flatten(2))


def test_moments_of_a_layer_too_large_for_one_block_are_taken_in_blocks():
    conv = nn.Conv1d(1024, 1024, 64, device="meta")
    block = cross_channel_block(conv)
    assert block == 8 and 1024 * block * 64 * 64 <= 1 << 25
    assert cross_channel_block(nn.Conv2d(512, 512, 3, device="meta")) == 512
    assert cross_channel_block(nn.Conv2d(6, 6, 3, groups=3, device="meta")) == 2


def test_first_layers_predicted_refit_error_is_what_calibration_leaves():
    """The first conv sees the original's inputs in both models, so its prediction is exact up to the ridges."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    data = [_inputs(nn.Conv2d(3, 3, 1), count=8, size=10, seed=s).float() for s in range(3)]
    converted = convsep.convert(model, budget=0.5, ranks={"0": 2}, example_inputs=data[0][:1], calibration_data=data)
    plan = converted.convsep_plan
    first = plan.layers[0]
    assert first.converted and first.predicted_refit_error > 0.01
    assert first.predicted_refit_error == pytest.approx(plan.calibration["layers"]["0"]["after"], rel=0.02)


def _zoo():
    import audio_zoo
    import zoo

    return {**zoo.ARCHITECTURES, **audio_zoo.HUB_ARCHITECTURES}


@pytest.mark.parametrize("name", sorted(_zoo()))
def test_every_zoo_model_converts_with_refit_aware_ranks_and_keeps_each_prediction_a_share(name):
    factory, shape = _zoo()[name]
    torch.manual_seed(0)
    model = factory().eval()
    data = [torch.randn(shape) for _ in range(2)]
    budget, on = 0.6, "macs"
    try:
        convsep.convert(model, budget=budget, example_inputs=data[0][:1], refit=False)
    except convsep.ConvsepValueError as error:  # most of its MACs are in layers no rank makes cheaper
        budget = (1 + float(re.search(r"smallest reachable budget is ([0-9.]+)", str(error))[1])) / 2
        if budget == 1:  # its convs run without their forward (hooks see no MACs): budget the params instead
            budget, on = 0.6, "params"
    converted = convsep.convert(model, budget=budget, budget_on=on, example_inputs=data[0][:1], calibration_data=data)
    plan = converted.convsep_plan
    assert plan.budget["allocated_by"] == "activations" and plan.budget["reached"] <= budget + 1e-9
    assert plan.converted and set(plan.calibration["layers"]) <= {d.name for d in plan.converted}
    for decision in plan.converted:
        if decision.allocation:  # the data could not speak for it (functional convs): weight error, and no prediction
            assert decision.allocation.startswith("weight error: ") and decision.predicted_refit_error is None
        else:
            assert 0 <= decision.predicted_refit_error <= 1
    with torch.no_grad():
        assert torch.isfinite(converted(data[1])).all()


@pytest.mark.parametrize("shape", [(64, 64, 9, 1), (512, 512, 9, 1), (1024, 1024, 64, 16), (6, 6, 9, 3), (4, 2, 9, 1)])
def test_largest_saving_rank_is_the_last_rank_that_saves_macs(shape):
    n, m, k, g = shape
    saving = [r for r in range(1, k + 1) if saves_macs(n, m, k, g, r)]
    assert largest_saving_rank(n, m, k, g) == (saving[-1] if saving else 0)


def test_predictions_do_not_depend_on_how_many_ranks_are_asked_for():
    """convert predicts only the ranks a budget can use: the ridge (scaled at full rank) must not move with them."""
    conv = nn.Conv2d(4, 8, 3, padding=1).double()
    second, mean, _ = _moments(conv, _inputs(conv), 4)
    basis = channel_svd(conv.weight, 1).Vh
    every = refit_errors(conv.weight, conv.bias, 1, basis, second, mean, basis.shape[1], ridge=1e-3)
    three = refit_errors(conv.weight, conv.bias, 1, basis, second, mean, 3, ridge=1e-3)
    assert three == pytest.approx(every[:3], rel=1e-12)


def test_a_layer_whose_rank_is_fixed_gets_the_prediction_at_that_rank_even_where_no_budget_would_go():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    data = [_inputs(nn.Conv2d(3, 3, 1), count=8, size=10, seed=s).float() for s in range(3)]
    assert largest_saving_rank(16, 3, 9, 1) < 9  # "full" (rank 9) saves nothing: a budget alone never predicts it
    predicted = {}
    for rank in ("full", largest_saving_rank(16, 3, 9, 1)):
        converted = convsep.convert(model, budget=0.9, ranks={"0": rank}, example_inputs=data[0][:1], calibration_data=data)
        plan = converted.convsep_plan
        predicted[plan.layers[0].rank] = plan.layers[0].predicted_refit_error
    assert predicted[9] < 0.5 * predicted[largest_saving_rank(16, 3, 9, 1)]  # full rank's own error, not a lower rank's

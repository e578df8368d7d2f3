"""refit_errors_from_samples: the refit's predicted error from the sampled rows themselves (fewer rows than unknowns),
the same numbers as refit_errors on their moments; and when the moments keep their rows apart to allow it."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from convsep.activations import InputMoments, input_moments, patches
from convsep.factorize import channel_svd
from convsep.refit_error import predicted_refit_errors, refit_errors, refit_errors_from_samples, use_samples


def _rows(conv, x):
    p = patches(x, conv)
    return p.transpose(1, 2).reshape(-1, p.shape[1])  # (positions, M*K)


def _from_moments(conv, rows, block, depthwise, ranks, ridge):
    x = rows.double().reshape(rows.shape[0], -1, block * math.prod(conv.kernel_size)).transpose(0, 1)
    second, mean = x.mT @ x / rows.shape[0], x.mean(dim=1).reshape(-1)
    return refit_errors(conv.weight, conv.bias, conv.groups, depthwise, second, mean, ranks, ridge)


@settings(max_examples=60, deadline=None)
@given(
    per_group=st.sampled_from([2, 3, 4]), groups=st.sampled_from([1, 2]), outputs=st.sampled_from([2, 6]),
    kernel=st.sampled_from([1, 3]), bias=st.booleans(), blocks_per_group=st.sampled_from([1, 2]),
    count=st.integers(1, 40), ridge=st.sampled_from([1e-3, 1e-1]), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_from_samples_equals_from_their_moments(per_group, groups, outputs, kernel, bias, blocks_per_group, count,
                                                ridge, seed):  # fmt: skip
    if per_group % blocks_per_group:
        blocks_per_group = 1
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    conv = nn.Conv1d(per_group * groups, outputs * groups, kernel, groups=groups, bias=bias).double()
    shared = torch.randn(count, 1, kernel, generator=generator, dtype=torch.float64)
    rows = shared + 0.3 * torch.randn(count, conv.in_channels, kernel, generator=generator, dtype=torch.float64) + 0.5
    rows = rows.reshape(count, -1)  # a 1-d conv over inputs as long as its kernel: one position, one row each
    block = per_group // blocks_per_group
    depthwise = channel_svd(conv.weight, groups).Vh
    ranks = depthwise.shape[1]
    expected = _from_moments(conv, rows, block, depthwise, ranks, ridge)
    got = refit_errors_from_samples(conv.weight, conv.bias, groups, depthwise, rows, block, ranks, ridge)
    assert got == pytest.approx(expected, rel=1e-7, abs=1e-10)


def test_a_deep_layer_with_few_positions_sampled_is_predicted_from_its_rows_and_they_are_never_summed():
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1).double()
    model = nn.Sequential(conv)
    x = torch.randn(4, 64, 4, 4, dtype=torch.float64) + torch.randn(4, 1, 4, 4, dtype=torch.float64)
    moments = input_moments(model, {"0": conv}, [x[:2], x[2:]], None, cross_channel=True)["0"]
    rows = moments.samples()
    assert (
        rows is not None and moments.second is None and rows.shape == (moments.count, 64 * 9) and moments.count < 64 * 9
    )
    depthwise = channel_svd(conv.weight, 1).Vh
    assert use_samples(moments.count, 64, 9, 64, 4)
    predicted = predicted_refit_errors(conv.weight, conv.bias, 1, depthwise, moments, 4, 1e-3)
    assert moments.second is None  # the (576 x 576) products were never formed
    assert predicted == pytest.approx(_from_moments(conv, rows, 64, depthwise, 4, 1e-3), rel=1e-9)
    assert predicted == pytest.approx(refit_errors(conv.weight, conv.bias, 1, depthwise, moments.covariance(),
                                                   moments.mean(), 4, 1e-3), rel=1e-9)  # fmt: skip
    assert moments.samples() is None  # summed now: the moments path from here on


def test_rows_kept_apart_give_the_same_means_and_per_channel_moments_as_the_sums():
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 4, 3).double()  # 4 outputs: one position in 18 is sampled
    x = torch.randn(3, 8, 6, 6, dtype=torch.float64)
    apart = InputMoments.empty(conv, 8, "cpu")
    apart.add(x, conv)
    assert apart.samples() is not None
    mean, channels = apart.mean(), apart.channel_covariance()
    assert apart.samples() is not None  # neither summed them
    summed = InputMoments.empty(conv, 8, "cpu")
    summed.add(x, conv)
    summed.flush()
    assert summed.samples() is None
    torch.testing.assert_close(mean, summed.mean())
    torch.testing.assert_close(channels, summed.channel_covariance())


def test_without_a_ridge_the_samples_path_gives_the_pseudo_inverse_answer_of_the_moments_path():
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 4, 3, bias=False).double()
    rows = _rows(conv, torch.randn(1, 6, 4, 4, dtype=torch.float64))  # 4 rows against 6 x 2 unknowns at rank 2
    depthwise = channel_svd(conv.weight, 1).Vh
    got = refit_errors_from_samples(conv.weight, None, 1, depthwise, rows, 6, 2, 0.0)
    assert got == pytest.approx(_from_moments(conv, rows, 6, depthwise, 2, 0.0), rel=1e-9, abs=1e-12)


def test_the_samples_path_is_chosen_where_rows_are_few_against_the_unknowns():
    assert use_samples(256, 512, 9, 512, 8)  # ResNet-18's layer4 on 64x64 images
    assert use_samples(512, 256, 9, 256, 8)  # its layer3
    assert not use_samples(3840, 64, 9, 64, 7)  # layer1: more rows than the system has unknowns
    assert not use_samples(500, 8, 64, 64, 60)  # long kernels in blocks of 8 channels: 60 ranks of 500-square systems

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convsep.factorize import channel_matrices, compose, factorize, full_rank


@st.composite
def kernels(draw):
    groups = draw(st.integers(1, 3))
    out_per_group = draw(st.integers(1, 5))
    in_per_group = draw(st.integers(1, 4))
    kernel = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return torch.randn(groups * out_per_group, in_per_group, *kernel, dtype=torch.float64), groups


@settings(max_examples=60, deadline=None)
@given(kernels())
def test_full_rank_reconstructs_the_kernel_exactly(case):
    weight, groups = case
    rank = full_rank(weight.shape, groups)
    factors = factorize(weight, groups, rank)
    torch.testing.assert_close(compose(factors.depthwise, factors.pointwise, groups, rank), weight, rtol=1e-12, atol=1e-12)
    assert factors.relative_error < 1e-7


@settings(max_examples=60, deadline=None)
@given(kernels(), st.integers(1, 6))
def test_truncation_error_is_the_discarded_spectral_energy(case, rank):
    """Eckart-Young per channel: ||W - W_r||^2 is the sum of the dropped squared singular values."""
    weight, groups = case
    factors = factorize(weight, groups, rank)
    r = factors.rank
    approx = compose(factors.depthwise, factors.pointwise, groups, r)
    S = torch.linalg.svdvals(channel_matrices(weight, groups))
    discarded = S[:, r:].square().sum()
    assert math.isclose(float((approx - weight).norm() ** 2), float(discarded), rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(factors.relative_error, float((discarded / S.square().sum()).sqrt()), rel_tol=1e-9, abs_tol=1e-12)


def test_rank_one_beats_any_other_rank_one_pair():
    """No random rank-1 separable kernel comes closer than the SVD one (optimality, sampled)."""
    torch.manual_seed(0)
    weight, groups = torch.randn(8, 4, 3, 3, dtype=torch.float64), 1
    best = factorize(weight, groups, 1)
    best_error = (compose(best.depthwise, best.pointwise, groups, 1) - weight).norm()
    for _ in range(50):
        d = best.depthwise + 0.1 * torch.randn_like(best.depthwise)
        p = best.pointwise + 0.1 * torch.randn_like(best.pointwise)
        assert (compose(d, p, groups, 1) - weight).norm() >= best_error


def test_channel_matrices_follow_the_design_layout():
    weight = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).reshape(4, 3, 2, 2)  # groups=2: N=4, M=6
    matrices = channel_matrices(weight, groups=2)
    assert matrices.shape == (6, 2, 4)
    # channel c = 4 is input 1 of group 1, which reaches outputs 2 and 3
    torch.testing.assert_close(matrices[4], weight[2:4, 1].reshape(2, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_factors_come_back_in_the_kernel_dtype(dtype):
    weight = torch.randn(6, 3, 3, 3).to(dtype)
    factors = factorize(weight, 1, 2)
    assert factors.depthwise.dtype == dtype and factors.pointwise.dtype == dtype


def test_zero_kernel_has_no_error():
    factors = factorize(torch.zeros(4, 2, 3, 3), 1, 1)
    assert factors.relative_error == 0.0
    assert torch.count_nonzero(factors.depthwise) == 0 or torch.count_nonzero(factors.pointwise) == 0


def test_rank_below_one_is_refused():
    with pytest.raises(ValueError, match="rank"):
        factorize(torch.randn(4, 2, 3, 3), 1, 0)

"""Alternating calibration sums the input patches, about K times a conv's own cost: where the data holds many more
positions than those sums need, it takes them at every s-th position (least_squares.LayerStats.sampling_step), each
call one position further on, and the fits stay as good."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convsep
from convsep import least_squares
from convsep.least_squares import ROWS_PER_COLUMN, LayerStats


def pair(in_channels=8, out_channels=8, groups=1):
    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, groups=groups)
    return conv, convsep.SeparableConv2d.from_conv(conv, rank=1)


@pytest.mark.parametrize(
    "patches, batches, positions, step",
    [
        (False, 10, 10**6, 1),  # pointwise sums: cheap, never sampled
        (True, None, 10**6, 1),  # how many batches a pass holds is not known
        (True, 10, 2 * ROWS_PER_COLUMN * 72 // 10 + 1, 2),  # twice the rows the 72 columns need: every other one
        (True, 10, 10**6, 9),  # plenty: as sparse as brings the sums' cost to the conv's (72 columns, 8 outputs)
        (True, 10, ROWS_PER_COLUMN * 72 // 10 - 1, 1),  # fewer rows than they need: every position
    ],
)
def test_the_step_spares_what_the_data_allows_and_no_more_than_the_cost_needs(patches, batches, positions, step):
    _, separable = pair()
    assert LayerStats(separable, patches, batches=batches).sampling_step(positions) == step


def test_grouped_sums_are_sampled_by_their_own_width():
    _, separable = pair(in_channels=8, out_channels=16, groups=2)  # 4 channels x 9 taps per group
    assert LayerStats(separable, True, batches=1).sampling_step(10**6) == 5  # ceil(2 groups x 36 / 16 outputs)


def test_the_sums_are_those_of_the_sampled_positions(monkeypatch):
    monkeypatch.setattr(least_squares, "ROWS_PER_COLUMN", 1)  # 147 positions: every other one for 72 columns
    conv, separable = pair()
    x = torch.randn(3, 8, 7, 7)
    with torch.no_grad():
        y = conv(x)
    stats = LayerStats(separable, True, batches=1)
    step = stats.sampling_step(3 * 49)
    stats.calls = 5  # the sixth call starts at column 5 % step
    phase = 5 % step
    stats.add(x, y, "conv")
    columns = F.unfold(x, 3, padding=1).reshape(3, 72, 7, 7)[..., phase::step].permute(1, 0, 2, 3).reshape(72, -1)
    targets = y[..., phase::step].permute(1, 0, 2, 3).reshape(8, -1)
    weight = 49 / (columns.shape[1] / 3)  # each sampled position stands for the call's skipped ones
    assert step > 1 and stats.count == 3 * 49
    torch.testing.assert_close(stats.gram[0], (columns @ columns.T).double() * weight, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats.cross[0], (columns @ targets.T).double() * weight, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats.target_sum[0], targets.sum(1).double() * weight, rtol=1e-5, atol=1e-4)
    assert stats.target_energy == pytest.approx(float(targets.square().sum()) * weight, rel=1e-5)
    assert stats.all_target_energy == pytest.approx(float(y.square().sum()), rel=1e-5)


def test_as_many_calls_as_the_step_cover_every_position_once(monkeypatch):
    monkeypatch.setattr(least_squares, "ROWS_PER_COLUMN", 1)
    conv, separable = pair()
    x = torch.randn(3, 8, 8, 8)
    with torch.no_grad():
        y = conv(x)
    sampled, whole = LayerStats(separable, True, batches=1), LayerStats(separable, True)
    step = sampled.sampling_step(3 * 64)
    for _ in range(step):
        sampled.add(x, y, "conv")
    whole.add(x, y, "conv")
    # Each call's sums stand for the whole call (weighted by the positions it skipped): together, step times it.
    assert step == 2 and sampled.count == step * whole.count == step * 3 * 64
    for name in ("gram", "cross", "feature_sum", "target_sum"):
        torch.testing.assert_close(getattr(sampled, name) / step, getattr(whole, name), rtol=1e-6, atol=1e-4)


def test_a_smaller_call_weighs_in_by_its_positions_not_by_how_densely_it_was_sampled(monkeypatch):
    monkeypatch.setattr(least_squares, "ROWS_PER_COLUMN", 1)
    conv, separable = pair()
    large, small = torch.randn(4, 8, 16, 16), torch.randn(1, 8, 4, 4)
    stats = LayerStats(separable, True, batches=1)
    with torch.no_grad():
        steps = [stats.sampling_step(4 * 256), stats.sampling_step(16)]
        for x in (large, small):
            stats.add(x, conv(x), "conv")
    assert steps == [9, 1]  # the large call sampled, the small one summed in full
    assert stats.count == 4 * 256 + 16


@pytest.mark.parametrize("sequential", [True, False])
def test_sampled_alternation_fits_as_well_and_the_error_before_is_still_measured(monkeypatch, sequential):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    converted = convsep.convert(model, rank=1)
    data = [torch.randn(16, 3, 16, 16) for _ in range(4)]  # 4 x 16 x 256 positions against 72 columns
    sampled = convsep.calibrate(copy.deepcopy(converted), model, data, alternate=4, sequential=sequential)
    monkeypatch.setattr(least_squares, "ROWS_PER_COLUMN", 10**9)  # never enough to spare: every position
    whole = convsep.calibrate(copy.deepcopy(converted), model, data, alternate=4, sequential=sequential)
    with torch.no_grad():
        target = torch.cat([model(x) for x in data])
        errors = [float((torch.cat([m(x) for x in data]) - target).norm() / target.norm()) for m in (sampled, whole)]
    assert errors[0] <= 1.02 * errors[1]
    assert not all(torch.equal(a, b) for a, b in zip(sampled.state_dict().values(), whole.state_dict().values(), strict=True))
    # In order it is measured on every position as the outputs go by; at once it comes from the sampled sums.
    for name, record in whole.convsep_plan.calibration["layers"].items():
        initial = sampled.convsep_plan.calibration["layers"][name]["initial"]
        assert initial == pytest.approx(record["initial"], rel=1e-6 if sequential else 0.05)

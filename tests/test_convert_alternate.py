"""convert(calibration_alternate=N) is calibrate(alternate=N) after the conversion, and is refused where no refit follows."""

import pytest
import torch
from torch import nn

import convsep


def two_convs():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3)).eval()


def data():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=generator) for _ in range(2)]


def test_convert_alternates_as_calibrate_does():
    model, batches = two_convs(), data()
    through_convert = convsep.convert(model, rank=1, calibration_data=batches, calibration_alternate=2)
    direct = convsep.calibrate(convsep.convert(model, rank=1), model, batches, alternate=2)
    pointwise_only = convsep.calibrate(convsep.convert(model, rank=1), model, batches)
    assert through_convert.convsep_plan.calibration["alternate"] == 2
    for key, value in direct.state_dict().items():
        torch.testing.assert_close(through_convert.state_dict()[key], value)
    moved = through_convert.state_dict()["0.depthwise.weight"] - pointwise_only.state_dict()["0.depthwise.weight"]
    assert float(moved.abs().max()) > 1e-3  # the depthwise filters were refitted too


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_a_bad_calibration_alternate_is_refused_before_any_work(value):
    with pytest.raises(convsep.ConvsepValueError) as info:
        convsep.convert(two_convs(), rank=1, calibration_data=data(), calibration_alternate=value)
    assert str(info.value) == (
        f"calibration_alternate={value!r} must be an int >= 0 (rounds of depthwise + pointwise refits)"
    )


@pytest.mark.parametrize("calibration", [dict(), dict(calibration_data="data", refit=False)])
def test_calibration_alternate_without_a_refit_is_refused(calibration):
    calibration = {key: data() if value == "data" else value for key, value in calibration.items()}
    with pytest.raises(convsep.ConvsepValueError) as info:
        convsep.convert(two_convs(), rank=1, calibration_alternate=2, **calibration)
    assert str(info.value) == "calibration_alternate=2 needs calibration_data and refit=True: it shapes the refit"

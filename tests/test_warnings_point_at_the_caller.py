"""Warnings point at the caller's line, however deep inside convsep they start (convsep/warn.py).

Mutation testing leaves this file out: mutmut's trampolines add frames of their own between the caller
and convsep, so no warning can point at the caller under mutmut.
"""

import pytest
import torch
from torch import nn
from zoo import Branch

import convsep
from convsep import least_squares


def branch_and_pairs():
    torch.manual_seed(0)
    model = Branch().eval()
    return model, convsep.convert(model, rank=1, example_inputs=torch.randn(1, 3, 12, 12))


@pytest.mark.parametrize("sequential", [True, False])
def test_calibrates_warning_about_layers_never_reached(sequential):
    model, converted = branch_and_pairs()
    with pytest.warns(UserWarning, match="never reached them: wide") as record:
        convsep.calibrate(converted, model, [torch.randn(2, 3, 8, 8)], sequential=sequential)
    assert [w.filename for w in record] == [__file__]


def test_calibrates_warning_when_convert_calibrates():
    model, _ = branch_and_pairs()
    with pytest.warns(UserWarning, match="never reached them: wide") as record:
        convsep.convert(
            model, rank=1, example_inputs=torch.randn(1, 3, 12, 12), calibration_data=[torch.randn(2, 3, 8, 8)]
        )
    assert [w.filename for w in record] == [__file__]


def test_calibrates_warning_about_depthwise_filters_too_large_to_refit(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    monkeypatch.setattr(least_squares, "MAX_DEPTHWISE_UNKNOWNS", 26)
    with pytest.warns(UserWarning, match="27 unknowns per group") as record:
        convsep.calibrate(convsep.convert(model, rank=1), model, [torch.randn(2, 3, 8, 8)], alternate=1)
    assert [w.filename for w in record] == [__file__]


@pytest.mark.parametrize("keyword", ["include", "exclude"])
def test_converts_warning_about_a_pattern_that_matched_nothing(keyword):
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    with pytest.warns(UserWarning, match=f"{keyword} pattern 'nothing.*' matched no convolution") as record:
        convsep.convert(model, rank=1, **{keyword: ["0", "nothing.*"] if keyword == "include" else "nothing.*"})
    assert [w.filename for w in record] == [__file__]


def test_converts_warning_about_a_rank_pattern_that_matched_nothing():
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    with pytest.warns(UserWarning, match="ranks pattern 'nothing.*' matched no convertible convolution") as record:
        convsep.convert(model, rank=1, ranks={"nothing.*": 2})
    assert [w.filename for w in record] == [__file__]


def test_calibrates_warning_that_original_holds_every_pair_already():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    converted = convsep.convert(model, rank=1)
    with pytest.warns(UserWarning, match="nothing calibrated") as record:
        convsep.calibrate(converted, convsep.convert(model, rank=1), [torch.randn(2, 3, 8, 8)])
    assert [w.filename for w in record] == [__file__]

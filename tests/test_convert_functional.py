"""Functional convolutions (F.conv2d(x, self.weight, ...) in forward): which are converted, which kept and why."""

import copy

import torch
import torch.nn.functional as F
from helpers import relative_error
from torch import fx, nn

import convsep
from convsep import SeparableConv2d
from convsep.plan import LayerDecision


class TwoFunctionalConvs(nn.Module):
    """Two functional convs; the first carries every setting a call can have."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Parameter(torch.randn(8, 2, 3, 3) * 0.2)
        self.grouped_bias = nn.Parameter(torch.randn(8) * 0.1)
        self.head = nn.Parameter(torch.randn(6, 8, 3, 3) * 0.2)

    def forward(self, x):
        x = F.conv2d(x, self.grouped, self.grouped_bias, stride=2, padding=2, dilation=2, groups=2)
        return F.conv2d(x, self.head, None, 1, 1)


class UnconvertibleFunctionalConvs(nn.Module):
    """Every way a functional conv can fail to qualify, and a conv module whose weight is also used functionally."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 4, 3, 3))
        self.w2 = nn.Parameter(torch.randn(8, 4, 3, 3))
        self.b2 = nn.Parameter(torch.randn(8))
        self.w3 = nn.Parameter(torch.randn(8, 4, 3, 3))
        self.pointwise = nn.Parameter(torch.randn(8, 4, 1, 1))
        self.depthwise = nn.Parameter(torch.randn(4, 1, 3, 3))
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x):
        return (
            F.conv2d(x, self.w1 * 2, padding=1),
            F.conv2d(x, self.w2, self.b2 * 2, padding=1),
            F.conv2d(x, self.w3, None, x.shape[1] // 4, x.shape[1] // 4),
            F.conv2d(x, self.pointwise),
            F.conv2d(x, self.depthwise, padding=1, groups=4),
            F.conv2d(x, self.conv.weight, self.conv.bias, padding=1),
            self.conv(x),
        )


def _kept(name, reason, module=None, **shape):
    return LayerDecision(name=name, kind=shape.pop("kind", "F.conv2d"), converted=False, reason=reason,
                         module=module or name, **shape)  # fmt: skip


def test_functional_convs_that_cannot_convert_are_kept_each_with_its_reason():
    model = UnconvertibleFunctionalConvs()
    converted = convsep.convert(model, rank=1)
    shape = {"in_channels": 4, "out_channels": 8, "kernel_size": (3, 3), "groups": 1}
    assert converted.convsep_plan.layers == [
        _kept("conv2d", "weight is computed in forward, not a parameter"),
        _kept("w2", "bias is computed in forward, not a parameter"),
        _kept("w3", "stride, padding computed in forward"),
        _kept("pointwise", "kernel has 1 element (already pointwise)", "pointwise_separable",
              in_channels=4, out_channels=8, kernel_size=(1, 1)),
        _kept("depthwise", "already depthwise (groups == in_channels)", "depthwise_separable",
              in_channels=4, out_channels=4, kernel_size=(3, 3), groups=4),
        _kept("conv.weight", "its weight belongs to a conv module, which is considered on its own",
              "conv.weight_separable", bias=True, **shape),
        _kept("conv", "its weight is also used by a functional conv elsewhere", kind="Conv2d", bias=True, **shape),
    ]  # fmt: skip
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        for actual, expected in zip(converted(x), model(x)):
            assert torch.equal(actual, expected)


def test_functional_convs_convert_with_their_stride_padding_dilation_groups_and_bias():
    torch.manual_seed(0)
    model = TwoFunctionalConvs().eval()
    x = torch.randn(2, 4, 13, 13)
    converted = convsep.convert(model, rank="full")
    assert isinstance(converted, fx.GraphModule)
    assert isinstance(converted.grouped_separable, SeparableConv2d) and isinstance(
        converted.head_separable, SeparableConv2d
    )
    assert sorted(name for name, _ in converted.named_parameters() if "separable" not in name) == []
    with torch.no_grad():
        assert relative_error(converted(x), model(x)) < 1e-5
    plan = converted.convsep_plan
    assert [(d.name, d.kind, d.converted, d.reason, d.module, d.rank, d.full_rank) for d in plan.layers] == [
        ("grouped", "F.conv2d", True, "", "grouped_separable", 4, 4),
        ("head", "F.conv2d", True, "", "head_separable", 6, 6),
    ]
    assert [(d.in_channels, d.out_channels, d.kernel_size, d.groups, d.bias) for d in plan.layers] == [
        (4, 8, (3, 3), 2, True),
        (8, 6, (3, 3), 1, False),
    ]


def test_include_and_exclude_see_a_functional_conv_as_a_conv_module():
    model = TwoFunctionalConvs()
    plan = convsep.convert(model, exclude=lambda name, conv: conv.groups == 2).convsep_plan
    assert [(d.name, d.converted, d.reason) for d in plan.layers] == [
        ("grouped", False, "excluded by exclude callable"),
        ("head", True, ""),
    ]
    plan = convsep.convert(model, exclude="head").convsep_plan
    assert [(d.name, d.converted, d.reason) for d in plan.layers] == [
        ("grouped", True, ""),
        ("head", False, "excluded by 'head'"),
    ]


def test_a_deep_copy_of_a_model_converted_through_fx_keeps_its_plan_and_calibrates():
    """A model with a functional conv comes back as an fx GraphModule, whose deepcopy rebuilds it from its graph."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.1)

        def forward(self, x):
            return F.conv2d(x, self.weight, padding=1)

    torch.manual_seed(0)
    model = Functional().eval()
    converted = convsep.convert(model, rank=1)
    assert isinstance(converted, torch.fx.GraphModule)
    copied = copy.deepcopy(converted)
    assert copied.convsep_plan == converted.convsep_plan and copied.convsep_plan is not converted.convsep_plan
    calibrated = convsep.calibrate(copied, model, [torch.randn(4, 3, 8, 8)])
    assert calibrated.convsep_plan.calibration["layers"]["weight"]["after"] < 1
    assert converted.convsep_plan.calibration is None  # the original conversion untouched

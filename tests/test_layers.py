import copy
import io
import math
import warnings

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations

import convsep
from convsep import SeparableConv1d, SeparableConv2d, SeparableConv3d
from convsep.count import separable_params
from convsep.factorize import full_rank
from helpers import assert_bitwise_equal, relative_error, snapshot

SEPARABLE = {1: SeparableConv1d, 2: SeparableConv2d, 3: SeparableConv3d}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@st.composite
def conv_configs(draw):
    """A random standard convolution and an input that fits it."""
    dims = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(1, 4))
    per_dim = lambda strategy: tuple(draw(st.lists(strategy, min_size=dims, max_size=dims)))  # noqa: E731
    kernel = per_dim(st.integers(1, 3))
    stride = per_dim(st.integers(1, 2))
    dilation = per_dim(st.integers(1, 2))
    padding_form = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if padding_form == "same":
        stride = (1,) * dims  # PyTorch allows 'same' only with stride 1
        padding = "same"
    elif padding_form == "valid":
        padding = "valid"
    elif padding_form == "int":
        padding = draw(st.integers(0, 2))
    else:
        padding = per_dim(st.integers(0, 2))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    bias = draw(st.booleans())
    size = 7 if dims < 3 else 5  # > padding, and >= the dilated kernel, for every padding mode
    conv = CONV[dims](
        in_channels, out_channels, kernel, stride, padding, dilation, groups, bias, padding_mode, dtype=torch.float64
    )
    seed = draw(st.integers(0, 2**16))
    return conv, (2, in_channels) + (size,) * dims, seed


@st.composite
def normed_conv_configs(draw):
    """The zoo's convs, random weights set, then weight-normed or spectral-normed as audio models do."""
    conv, shape, seed = draw(conv_configs())
    conv, _ = _fit_input(conv, shape, seed, torch.float64)
    norm = draw(st.sampled_from(sorted(NORMS)))
    dim = draw(st.integers(0, conv.weight.dim() - 1))  # weight_norm's axis: wav2vec2 uses the kernel axis
    return NORMS[norm](conv, dim).train(draw(st.booleans())), shape, seed, norm


def _quiet(wrap):
    def wrapped(conv, dim):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the old hooks are deprecated, and still in checkpoints
            return wrap(conv, dim)

    return wrapped


NORMS = {
    "weight_norm": _quiet(lambda conv, dim: parametrizations.weight_norm(conv, dim=dim)),
    "old weight_norm": _quiet(lambda conv, dim: nn.utils.weight_norm(conv, dim=dim)),
    "spectral_norm": _quiet(lambda conv, dim: parametrizations.spectral_norm(conv)),
    "old spectral_norm": _quiet(lambda conv, dim: nn.utils.spectral_norm(conv)),
}


def _fit_input(conv, shape, seed, dtype):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn_like(p))
    return conv.to(dtype), torch.randn(shape, dtype=dtype)


@settings(max_examples=120, deadline=None)
@given(conv_configs(), st.sampled_from([torch.float32, torch.float64]))
def test_full_rank_pair_computes_the_original_conv(config, dtype):
    conv, shape, seed = config
    conv, x = _fit_input(conv, shape, seed, dtype)
    dims = conv.weight.dim() - 2
    pair = SEPARABLE[dims].from_conv(conv, rank="full")
    with torch.no_grad():
        expected, actual = conv(x), pair(x)
    assert actual.shape == expected.shape
    assume(expected.norm() > 0)
    assert relative_error(actual, expected) < (1e-5 if dtype == torch.float32 else 1e-10)


@settings(max_examples=60, deadline=None)
@given(normed_conv_configs())
def test_full_rank_pair_of_a_normed_conv_computes_its_eval_output_and_leaves_it_alone(config):
    conv, shape, seed, norm = config
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64)
    before = snapshot(conv)
    pair = SEPARABLE[len(shape) - 2].from_conv(conv, rank="full")
    assert_bitwise_equal(before, conv)  # spectral norm's u, v did not move, even in train mode
    with torch.no_grad():
        expected = conv.eval()(x)
        assume(expected.norm() > 0)
        assert relative_error(pair(x), expected) < 1e-10, norm


@settings(max_examples=80, deadline=None)
@given(conv_configs(), st.integers(1, 5))
def test_parameter_count_follows_the_closed_form(config, rank):
    conv, _, _ = config
    dims = conv.weight.dim() - 2
    pair = SEPARABLE[dims].from_conv(conv, rank=rank)
    r = min(rank, full_rank(conv.weight.shape, conv.groups))
    assert pair.rank == r
    expected = separable_params(
        conv.out_channels, conv.in_channels, math.prod(conv.kernel_size), conv.groups, r, conv.bias is not None
    )
    assert sum(p.numel() for p in pair.parameters()) == expected


def test_pair_keeps_attributes_of_the_conv():
    conv = nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2, padding_mode="reflect")
    pair = SeparableConv2d.from_conv(conv, rank=2)
    dw, pw = pair.depthwise, pair.pointwise
    assert (dw.in_channels, dw.out_channels, dw.groups) == (4, 8, 4)
    assert (dw.kernel_size, dw.stride, dw.padding, dw.dilation, dw.padding_mode) == (
        (3, 5), (2, 1), (1, 2), (1, 2), "reflect",
    )  # fmt: skip
    assert (pw.in_channels, pw.out_channels, pw.groups, pw.kernel_size) == (8, 6, 2, (1, 1))
    assert dw.bias is None and pw.bias is not None
    torch.testing.assert_close(pw.bias, conv.bias)
    assert (pair.in_channels, pair.out_channels, pair.kernel_size) == (4, 6, (3, 5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_kernels_convert(dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1).to(dtype)
    pair = SeparableConv2d.from_conv(conv, rank="full")
    assert pair.depthwise.weight.dtype == dtype and pair.pointwise.weight.dtype == dtype
    x = torch.randn(1, 8, 10, 10, dtype=dtype)
    with torch.no_grad():
        assert relative_error(pair(x), conv(x)) < 2e-2  # half precision rounding, not the maths


def test_requires_grad_and_mode_are_kept():
    conv = nn.Conv2d(4, 4, 3).eval()
    conv.weight.requires_grad_(False)
    pair = SeparableConv2d.from_conv(conv)
    assert not pair.training
    assert not pair.depthwise.weight.requires_grad and not pair.pointwise.weight.requires_grad
    assert pair.pointwise.bias.requires_grad


def test_random_init_uses_pytorch_defaults():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3)
    pair = SeparableConv2d.from_conv(conv, rank=1, init="random")
    assert not torch.allclose(pair.pointwise.bias, conv.bias)
    assert pair.depthwise.weight.std() > 0


def test_wrong_conv_type_and_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="Conv2d"):
        SeparableConv2d.from_conv(nn.Conv1d(2, 2, 3))
    with pytest.raises(ValueError, match="init"):
        SeparableConv2d.from_conv(nn.Conv2d(2, 2, 3), init="xavier")
    with pytest.raises(ValueError, match="rank"):
        SeparableConv2d.from_conv(nn.Conv2d(2, 2, 3), rank=0)


# The attributes and methods of nn.ConvNd that model code reads at run time.
CONV_READS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode",
              "transposed", "output_padding", "_reversed_padding_repeated_twice")  # fmt: skip


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(4, 6, 5, stride=3, padding=2, groups=2),
        nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2, padding_mode="reflect"),
        nn.Conv2d(3, 8, 3, padding="same", bias=False),
        nn.Conv3d(2, 4, 3, padding=1, padding_mode="circular"),
    ],
    ids=["1d-strided-grouped", "2d-reflect", "2d-same-no-bias", "3d-circular"],
)
def test_pair_answers_every_conv_attribute_as_the_conv_it_replaced(conv):
    pair = SEPARABLE[conv.weight.dim() - 2].from_conv(conv, rank="full")
    for name in CONV_READS:
        assert getattr(pair, name) == getattr(conv, name), name
    assert (pair.weight.shape, pair.weight.dtype, pair.weight.device) == (conv.weight.shape, conv.weight.dtype, conv.weight.device)
    assert (pair.bias is None) == (conv.bias is None)
    if conv.bias is not None:
        assert pair.bias is pair.pointwise.bias and torch.equal(pair.bias, conv.bias)


def test_pair_weight_is_the_composed_kernel_and_trains_both_halves():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, groups=2).double()
    pair = SeparableConv2d.from_conv(conv, rank="full")
    assert relative_error(pair.weight, conv.weight) < 1e-12
    assert not isinstance(pair.weight, nn.Parameter) and "weight" not in dict(pair.named_parameters())
    pair.weight.sum().backward()
    assert pair.depthwise.weight.grad is not None and pair.pointwise.weight.grad is not None


def test_pair_conv_forward_with_its_own_weight_computes_the_pair_and_with_another_the_conv():
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="replicate").double()
    pair = SeparableConv1d.from_conv(conv, rank=1)
    x = torch.randn(2, 4, 9, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(pair._conv_forward(x, pair.weight, pair.bias), pair(x)) < 1e-12
        other = torch.randn_like(conv.weight)
        torch.testing.assert_close(pair._conv_forward(x, other, None), conv._conv_forward(x, other, None))


@pytest.mark.parametrize("name", [*CONV_READS, "weight", "bias"])
def test_writing_a_conv_attribute_on_the_pair_raises_a_clear_error(name):
    pair = SeparableConv2d.from_conv(nn.Conv2d(4, 6, 3))
    value = nn.Parameter(torch.zeros(6)) if name in ("weight", "bias") else getattr(pair, name)
    with pytest.raises(AttributeError, match=rf"SeparableConv2d.{name} is read-only") as info:
        setattr(pair, name, value)
    assert isinstance(info.value, convsep.ReadOnlyAttributeError) and isinstance(info.value, convsep.ConvsepError)
    with pytest.raises(convsep.ReadOnlyAttributeError):
        delattr(pair, name)


def test_pair_keeps_working_as_a_module_after_copies_moves_and_loads():
    torch.manual_seed(0)
    pair = SeparableConv1d.from_conv(nn.Conv1d(4, 6, 3, stride=2), rank=2)
    pair.rank = 2  # its own attributes stay writable
    pair.eval()
    buffer = io.BytesIO()
    torch.save(pair, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(pair), torch.load(buffer, weights_only=False), copy.deepcopy(pair).double().float()):
        other.load_state_dict(pair.state_dict())
        assert other.stride == (2,) and other.groups == 1 and not other.training
    assert list(pair.state_dict()) == ["depthwise.weight", "pointwise.weight", "pointwise.bias"]


@pytest.mark.parametrize(
    "kwargs, says",
    [({"groups": 2}, "divisible by groups"), ({"groups": 0}, "groups must be a positive int"),
     ({"padding_mode": "mirror"}, "padding_mode"), ({"rank": 0}, "rank"), ({"padding": "same", "stride": 2}, "SeparableConv2d: ValueError: padding=.same.")],
)  # fmt: skip
def test_constructor_errors_are_convseps_and_name_the_value(kwargs, says):
    with pytest.raises(convsep.ConvsepValueError, match=says):
        SeparableConv2d(**{"in_channels": 3, "out_channels": 4, "kernel_size": 3, **kwargs})


def test_from_conv_errors_are_convseps():
    with pytest.raises(convsep.ConvsepTypeError, match="expects an nn.Conv2d, got Conv1d"):
        SeparableConv2d.from_conv(nn.Conv1d(2, 2, 3))
    with pytest.raises(convsep.ConvsepValueError, match="init must be one of .* got 'xavier'"):
        SeparableConv2d.from_conv(nn.Conv2d(2, 2, 3), init="xavier")
    with pytest.raises(convsep.ConvsepValueError, match="rank must be a positive int or 'full', got 0"):
        SeparableConv2d.from_conv(nn.Conv2d(2, 2, 3), rank=0)


def test_a_conv_called_with_its_input_by_keyword_still_runs_after_conversion():
    class ByKeyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3)

        def forward(self, x):
            return self.conv(input=x)

    torch.manual_seed(0)
    model, x = ByKeyword().eval(), torch.randn(1, 3, 8, 8)
    converted = convsep.convert(model, rank="full")
    torch.testing.assert_close(converted(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [
    {"init": "activation", "calibration_data": [torch.randn(4, 3, 8, 8)], "refit": False},
    {"budget": 0.7, "calibration_data": [torch.randn(4, 3, 8, 8)]},
    {"objective": "latency"},
], ids=["whitened", "refit_aware_budget", "latency"])  # fmt: skip
def test_a_conv_called_with_its_input_by_keyword_converts_with_data_and_timings(kwargs):
    """The statistics pass and the latency probe read a layer's input whether it comes positionally or as input=."""

    class ByKeyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.conv(input=self.stem(input=x))

    torch.manual_seed(0)
    model = ByKeyword().eval()
    ranks = {} if "budget" in kwargs else {"rank": 1}
    plan = convsep.convert(model, example_inputs=torch.randn(1, 3, 8, 8), **ranks, **kwargs).convsep_plan
    if "init" in kwargs:
        assert len(plan.converted) == 2 and all(d.whitening == "activation" for d in plan.converted)
    if "budget" in kwargs:
        assert plan.converted and all(d.predicted_refit_error is not None for d in plan.converted)
    if "objective" in kwargs:  # each layer timed on its input: converted, or kept with both timings
        assert all(d.converted or d.reason.startswith("kept for speed") for d in plan.layers)

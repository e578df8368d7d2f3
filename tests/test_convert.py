import copy
import math
import warnings

import pytest
import torch
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd

import convsep
from convsep import SeparableConv2d
from convsep.layers import _SeparableConvNd
from helpers import assert_bitwise_equal, relative_error, snapshot
from zoo import FunctionalConvNet, NestedFunctionalNet, SharedConvNet, SubclassConvNet, UntraceableNet


def test_full_rank_keeps_outputs_leaves_the_original_alone_and_trains(architecture):
    name, model, x = architecture
    before = snapshot(model)
    with torch.no_grad():
        expected = model(x)
    converted = convsep.convert(model, rank="full")
    with torch.no_grad():
        actual = converted(x)
    assert relative_error(actual, expected) < 1e-4, name
    assert_bitwise_equal(before, model)
    assert converted.convsep_plan.converted, f"{name}: nothing was converted"

    converted.train()
    converted(x).square().mean().backward()
    grads = [p.grad for n, p in converted.named_parameters() if "depthwise" in n or "pointwise" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def expected_reason_to_keep(conv):
    """Why convert must keep this conv at rank "full", from the conv itself; None if it must convert it."""
    if math.prod(conv.kernel_size) == 1:
        return "kernel has 1 element (already pointwise)"
    if conv.groups == conv.in_channels:
        return "already depthwise (groups == in_channels)"
    if type(conv) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and "forward" in vars(type(conv)):
        return f"{type(conv).__name__} overrides forward, so a plain pair may compute something else; name it in include to convert"
    return None


def test_every_standard_conv_becomes_a_pair(architecture):
    name, model, _ = architecture
    converted = convsep.convert(model, rank="full")
    plan = converted.convsep_plan
    assert plan.layers, name
    for decision in plan.layers:
        if decision.converted:
            assert isinstance(converted.get_submodule(decision.module), _SeparableConvNd), decision
            continue
        original = model.get_submodule(decision.name)
        assert decision.reason == expected_reason_to_keep(original), decision  # only 1x1, depthwise and custom forward stay


def test_rank_one_svd_beats_random_and_matches_eckart_young():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = torch.randn(4, 8, 12, 12)
    svd = convsep.convert(model, rank=1)
    random = convsep.convert(model, rank=1, init="random")
    with torch.no_grad():
        expected = model(x)
        assert relative_error(svd(x), expected) < relative_error(random(x), expected)
    for decision in svd.convsep_plan.converted:
        original = model.get_submodule(decision.name).weight.detach().double()
        pair = svd.get_submodule(decision.module)
        dense = convsep.factorize.compose(pair.depthwise.weight.double(), pair.pointwise.weight.double(), 1, 1)
        matrices = convsep.factorize.channel_matrices(original, 1)
        S = torch.linalg.svdvals(matrices)
        optimum = (S[:, 1:].square().sum() / S.square().sum()).sqrt()
        assert relative_error(dense, original) == pytest.approx(float(optimum), rel=1e-5)
        assert decision.relative_error == pytest.approx(float(optimum), rel=1e-5)


class ScaledConvForward(nn.Conv2d):
    """Overrides only _conv_forward (as some quantised convs do): a plain pair would drop the scaling."""

    def _conv_forward(self, x, weight, bias):
        return 2 * super()._conv_forward(x, weight, bias)


class NotAStandardConv(_ConvNd):
    """A conv that derives from _ConvNd directly, not from nn.Conv1d/2d/3d."""

    def __init__(self):
        super().__init__(8, 8, (3, 3), (1, 1), (0, 0), (1, 1), False, (0, 0), 1, True, "zeros")


def test_skipped_layers_carry_their_reason():
    model = nn.Sequential(
        nn.Conv2d(4, 8, 1),
        nn.Conv2d(8, 8, 3, groups=8),
        nn.Conv2d(8, 8, 3),
        nn.ConvTranspose2d(8, 8, 3),
        SubclassConvNet().same,
        nn.Conv2d(2, 4, 3, groups=2),
        nn.LazyConv2d(8, 3),
        ScaledConvForward(8, 8, 3),
        NotAStandardConv(),
        nn.Conv2d(1, 4, 3),
    )
    plan = convsep.convert(model, rank=1).convsep_plan
    assert {d.name: d.reason for d in plan.layers} == {
        "0": "kernel has 1 element (already pointwise)",
        "1": "already depthwise (groups == in_channels)",
        "2": "",
        "3": "transposed convolution (not supported)",
        "4": "SamePaddingConv overrides forward, so a plain pair may compute something else; name it in include to convert",
        "5": "already depthwise (groups == in_channels)",
        "6": "lazy convolution not yet initialised: run one forward pass first",
        "7": "ScaledConvForward overrides forward, so a plain pair may compute something else; name it in include to convert",
        "8": "NotAStandardConv is not a standard convolution",
        "9": "",  # one input channel: groups == in_channels, but a pair still has a choice of rank
    }


def test_include_and_exclude_callables_see_each_layers_name_and_module():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3))
    plan = convsep.convert(
        model, include=lambda name, module: name != "0", exclude=lambda name, module: module.out_channels == 16 and name == "2"
    ).convsep_plan
    assert {d.name: d.reason for d in plan.layers} == {
        "0": "not matched by include",
        "1": "",
        "2": "excluded by exclude callable",
    }


def test_patterns_that_match_do_not_warn():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convsep.convert(model, include=["0", "1*", "2"], exclude="2", ranks={"0": 2, "1*": 3})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"include": ["0", "head.*"]}, "include pattern 'head.*' matched no convolution; check the names with model.named_modules()"),
        ({"exclude": "head.*"}, "exclude pattern 'head.*' matched no convolution; check the names with model.named_modules()"),
        ({"ranks": {"head.*": 2}}, "ranks pattern 'head.*' matched no convertible convolution"),
    ],
)
def test_unmatched_pattern_warns_once_naming_it(kwargs, message):
    with pytest.warns(UserWarning) as record:
        convsep.convert(nn.Sequential(nn.Conv2d(3, 8, 3)), **kwargs)
    assert [str(w.message) for w in record] == [message]


@pytest.mark.parametrize("kwargs", [{"include": ["0", "head.*"]}, {"ranks": {"head.*": 2}}])
def test_unmatched_pattern_warning_points_at_the_callers_line(kwargs):
    # Deselected in mutation runs (pyproject): mutmut's trampolines add stack frames.
    with pytest.warns(UserWarning) as record:
        convsep.convert(nn.Sequential(nn.Conv2d(3, 8, 3)), **kwargs)
    assert record[0].filename == __file__


def test_conv_subclass_with_custom_forward_is_kept_unless_named():
    torch.manual_seed(0)
    model = SubclassConvNet().eval()
    x = torch.randn(2, 3, 13, 13)
    kept = convsep.convert(model, rank="full")
    assert type(kept.same).__name__ == "SamePaddingConv"
    assert isinstance(kept.plain, SeparableConv2d)  # adds nothing to forward: safe
    named = convsep.convert(model, rank="full", include=["same", "plain"])
    assert isinstance(named.same, SeparableConv2d)
    with torch.no_grad():
        assert relative_error(kept(x), model(x)) < 1e-5


def test_functional_conv_is_converted_and_its_parameters_dropped():
    torch.manual_seed(0)
    model = FunctionalConvNet().eval()
    converted = convsep.convert(model, rank="full")
    assert isinstance(converted, fx.GraphModule)
    assert isinstance(converted.stem_weight_separable, SeparableConv2d)
    assert "stem_weight" not in dict(converted.named_parameters())
    decision = next(d for d in converted.convsep_plan.layers if d.kind == "F.conv2d")
    assert decision.converted and decision.name == "stem_weight"


def test_nested_functional_conv_rewrites_only_the_calling_module():
    torch.manual_seed(0)
    model = NestedFunctionalNet().eval()
    x = torch.randn(2, 3, 12, 12)
    converted = convsep.convert(model, rank="full")
    assert type(converted) is NestedFunctionalNet and converted.extra_method() == "kept"
    assert isinstance(converted.inner[0], fx.GraphModule)
    assert isinstance(converted.conv, SeparableConv2d)
    with torch.no_grad():
        assert relative_error(converted(x), model(x)) < 1e-5


def test_shared_module_stays_shared():
    model = SharedConvNet()
    converted = convsep.convert(model, rank=1)
    assert isinstance(converted.conv, SeparableConv2d)
    assert converted.conv is converted.alias
    assert [d.name for d in converted.convsep_plan.converted] == ["conv", "head"]


def test_untraceable_model_still_converts_and_says_how():
    torch.manual_seed(0)
    model = UntraceableNet().eval()
    converted = convsep.convert(model, rank="full")
    plan = converted.convsep_plan
    assert type(converted) is UntraceableNet
    assert {d.name for d in plan.converted} == {"stem", "block.conv", "tail.1"}
    assert plan.path == "fx+module-tree"  # the root's assert stops fx; its children trace
    assert "<root>" in plan.untraceable
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert relative_error(converted(x), model(x)) < 1e-5


def test_untraceable_submodule_becomes_a_leaf():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = UntraceableNet().block
            self.head = nn.Conv2d(8, 2, 3)

        def forward(self, x):
            return self.head(self.net(x))

    plan = convsep.convert(Wrapper(), rank=1).convsep_plan
    assert plan.path == "fx+module-tree"
    assert "net" in plan.untraceable and "TraceError" in plan.untraceable["net"]
    assert {d.name for d in plan.converted} == {"net.conv", "head"}


def test_converting_twice_converts_nothing_new():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    once = convsep.convert(model, rank=2)
    twice = convsep.convert(once, rank=2)
    assert str(twice) == str(once)
    assert [d.name for d in twice.convsep_plan.converted] == ["0", "1"]


def test_inplace_changes_the_model_itself():
    model = nn.Sequential(nn.Conv2d(3, 8, 3))
    result = convsep.convert(model, inplace=True)
    assert result is model and isinstance(model[0], SeparableConv2d)


def test_include_and_exclude_select_layers():
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)), nn.Sequential(nn.Conv2d(8, 8, 3))
    )
    plan = convsep.convert(model, include="0.*", exclude=["0.1"]).convsep_plan
    assert [d.name for d in plan.converted] == ["0.0"]
    reasons = {d.name: d.reason for d in plan.skipped}
    assert "excluded by '0.1'" in reasons["0.1"] and "include" in reasons["1.0"]
    by_callable = convsep.convert(model, include=lambda name, m: m.in_channels == 3).convsep_plan
    assert [d.name for d in by_callable.converted] == ["0.0"]


def test_pattern_that_matches_nothing_warns():
    model = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.warns(UserWarning, match="'features.*' matched no convolution"):
        convsep.convert(model, exclude="features.*")


def test_numeric_rank_that_saves_nothing_keeps_the_layer():
    model = nn.Sequential(nn.Conv2d(16, 4, 3))  # 4 outputs: break-even rank 4*9/13 = 2.8
    plan = convsep.convert(model, rank=3).convsep_plan
    assert not plan.converted and "would not save MACs" in plan.layers[0].reason
    assert convsep.convert(model, rank="full").convsep_plan.converted


def test_energy_rank_picks_the_smallest_sufficient_rank():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 32, 3))
    plan = convsep.convert(model, rank=0.5).convsep_plan
    decision = plan.layers[0]
    assert decision.converted and 1 <= decision.rank < decision.full_rank
    assert decision.relative_error <= (1 - 0.5) ** 0.5 + 1e-6


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"rank": 0}, ValueError, "rank=0"),
        ({"rank": -2}, ValueError, "rank=-2"),
        ({"rank": 1.5}, ValueError, r"rank=1.5"),
        ({"rank": "half"}, ValueError, "'half'"),
        ({"rank": None}, TypeError, "None"),
        ({"rank": True}, TypeError, "True"),
        ({"init": "xavier"}, ValueError, "'xavier'"),
        ({"include": 3}, TypeError, "include=3"),
    ],
)
def test_bad_arguments_are_refused_before_touching_the_model(kwargs, error, match):
    model = nn.Sequential(nn.Conv2d(3, 8, 3))
    before = snapshot(model)
    with pytest.raises(error, match=match) as info:
        convsep.convert(model, inplace=True, **kwargs)
    assert isinstance(info.value, convsep.ConvsepError)
    assert isinstance(model[0], nn.Conv2d)
    assert_bitwise_equal(before, model)


def test_non_module_is_refused():
    with pytest.raises(TypeError, match="dict"):
        convsep.convert({"weight": torch.zeros(1)})


def test_model_without_convolutions_is_returned_as_a_copy():
    model = nn.Sequential(nn.Linear(3, 3))
    converted = convsep.convert(model)
    assert converted is not model and not converted.convsep_plan.layers


def test_converted_model_keeps_device_dtype_and_mode():
    model = nn.Sequential(nn.Conv2d(3, 8, 3)).double().train()
    converted = convsep.convert(model)
    pair = converted[0]
    assert pair.training and pair.depthwise.weight.dtype == torch.float64


def test_no_warnings_on_a_plain_model():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convsep.convert(copy.deepcopy(nn.Sequential(nn.Conv2d(3, 8, 3))))


def test_per_layer_rank_overrides():
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 4, 3))
    converted = convsep.convert(model, rank=1, ranks={"1": 3, "2": "full", "0*": 2})
    ranks = {d.name: d.rank for d in converted.convsep_plan.converted}
    assert ranks == {"0": 2, "1": 3, "2": 4}
    with pytest.warns(UserWarning, match="'head' matched no"):
        convsep.convert(model, ranks={"head": 2})
    with pytest.raises(ValueError, match=r"ranks\['1'\]=0"):
        convsep.convert(model, ranks={"1": 0})


def test_rebuild_reproduces_the_converted_architecture():
    from convsep.convert import rebuild

    torch.manual_seed(0)
    for model in (FunctionalConvNet().eval(), NestedFunctionalNet().eval(), SubclassConvNet().eval()):
        converted = convsep.convert(model, rank=2, include=lambda n, m: True)
        rebuilt = rebuild(model, converted.convsep_plan)
        assert str(rebuilt) == str(converted)
        rebuilt.load_state_dict(converted.state_dict())
        x = torch.randn(2, 3, 13, 13)
        with torch.no_grad():
            assert torch.equal(rebuilt(x), converted(x))


def test_calibration_batches_without_data_is_refused():
    with pytest.raises(ValueError, match="calibration_batches=4 needs calibration_data"):
        convsep.convert(nn.Sequential(nn.Conv2d(3, 8, 3)), calibration_batches=4)


def test_rank_override_exact_name_wins_over_a_glob_listed_before_it():
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3))
    converted = convsep.convert(model, rank=1, ranks={"*": 2, "1": 3})
    assert {d.name: d.rank for d in converted.convsep_plan.converted} == {"0": 2, "1": 3}


def test_rank_override_first_matching_glob_wins():
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3))
    converted = convsep.convert(model, rank=1, ranks={"1*": 3, "*": 2})
    assert {d.name: d.rank for d in converted.convsep_plan.converted} == {"0": 2, "1": 3}



@pytest.mark.parametrize(
    "parametrized, expected",
    [
        ("keep", [(False, "weight is computed by weight_norm: kept as it is by parametrized='keep'", ""), (True, "", "")]),
        ("fold", [(True, "", "weight_norm"), (True, "", "")]),
    ],
)
def test_weight_normed_conv_is_folded_or_kept_as_asked_and_plain_convs_convert_either_way(parametrized, expected):
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 8, 3)), nn.Conv2d(8, 8, 3))
    plan = convsep.convert(model, parametrized=parametrized).convsep_plan
    assert [(d.converted, d.reason, d.folded) for d in plan.layers] == expected


X = torch.randn(1, 3, 8, 8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"budget": 1.5}, "budget=1.5 must lie in (0, 1]: it is the share of the original macs the converted model may keep (0.3 keeps 30%)"),
        ({"budget": "0.3"}, "budget='0.3' (str) must be a number in (0, 1]: the share of the original cost to keep"),
        ({"budget": 0.3, "budget_on": "flops"}, "budget_on='flops' is not known: use one of 'macs', 'params'"),
        ({"budget": 0.3}, "budget=0.3 on MACs needs example_inputs, since MACs depend on the input size: pass e.g. "
         "example_inputs=torch.randn(1, 3, 224, 224), or budget_on='params'"),
        ({"budget": 0.3, "rank": 2, "example_inputs": X}, "rank=2 and budget=0.3 both choose the ranks: pass one of them "
         "(per-layer overrides in ranks= still apply under a budget)"),
        ({"rank": [1]}, "rank=[1] (list) is not a rank: use a positive int, 'full', or a float in (0, 1)"),
        ({"exclude": 3}, "exclude=3 must be a glob pattern, a list of them, or a callable (name, module) -> bool"),
        ({"exclude": ["a", 3]}, "exclude holds 3, which is not a string pattern"),
        ({"ranks": [("a", 1)]}, "ranks=[('a', 1)] must be a dict of name pattern -> rank, like {'layer3.*': 2}"),
        ({"ranks": {3: 1}}, "ranks has the key 3: keys must be name patterns (str)"),
    ],
)
def test_bad_arguments_are_refused_with_a_message_naming_them(kwargs, message):
    with pytest.raises(convsep.ConvsepError) as info:
        convsep.convert(nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3)), **kwargs)
    assert str(info.value) == message

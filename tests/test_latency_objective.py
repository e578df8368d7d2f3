"""objective='latency': correctness only (which layers win is the machine's business, not a test's)."""

import pytest
import torch
from torch import nn

import convsep
from convsep.convert import LATENCY_RUNS
from convsep.layers import _SeparableConvNd
from helpers import assert_bitwise_equal, relative_error, snapshot
from zoo import FunctionalConvNet


def test_latency_objective_converts_only_what_it_measured_faster():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)).eval()
    before = snapshot(model)
    x = torch.randn(1, 3, 32, 32)
    converted = convsep.convert(model, rank="full", objective="latency", example_inputs=x)
    assert_bitwise_equal(before, model)
    for decision in converted.convsep_plan.layers:
        module = converted.get_submodule(decision.name)
        if decision.converted:
            assert isinstance(module, _SeparableConvNd)
        else:
            assert isinstance(module, nn.Conv2d) and decision.reason.startswith("kept for speed")
    with torch.no_grad():
        assert relative_error(converted(x), model(x)) < 1e-5  # full rank: exact, whatever was kept


def test_latency_objective_keeps_functional_convs():
    model = FunctionalConvNet().eval()
    converted = convsep.convert(model, objective="latency", example_inputs=torch.randn(1, 3, 12, 12))
    functional = next(d for d in converted.convsep_plan.layers if d.kind == "F.conv2d")
    assert functional.converted is False
    assert functional.reason == "objective='latency' times module convs only; this functional conv stays"


def test_latency_objective_needs_inputs_and_a_known_objective():
    model = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match="example_inputs"):
        convsep.convert(model, objective="latency")
    with pytest.raises(ValueError, match="'speed'"):
        convsep.convert(model, objective="speed")


def test_latency_objective_on_inputs_the_model_cannot_take_names_them():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    with pytest.raises(convsep.InputShapeError) as info:
        convsep.convert(model, objective="latency", example_inputs=torch.randn(1, 5, 16, 16))
    assert str(info.value) == (
        "objective='latency': the model cannot run on inputs (1, 5, 16, 16) float32: RuntimeError: Given groups=1, "
        "weight of size [16, 3, 3, 3], expected input[1, 5, 16, 16] to have 3 channels, but got 5 channels instead"
    )


# --- which layers win, on scripted timings -----------------------------------------------------
# The clock is replaced by a script: each layer's time as a conv and as a pair, and a whole-model
# time that is the sum over layers plus a penalty for some layers converted. The tests then say
# exactly which layers convert, and in which order the whole-model loop reverts them.

LAYER_SECONDS = {  # out_channels (one per layer) -> (conv seconds, pair seconds)
    8: (1.0, 2.0),  # "0": the pair is slower: kept for speed
    16: (1.0, 0.5),  # "2": the pair saves 0.5 s
    12: (1.0, 0.875),  # "4": the pair saves 0.125 s, the smallest gain
}


def three_convs():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 12, 3, padding=1)
    ).eval()


def converted_names(model):
    return frozenset(name for name, module in model.named_modules() if isinstance(module, _SeparableConvNd))


@pytest.fixture
def scripted_clock(monkeypatch):
    """Replace the timer: returns the list of the converted-layer sets the whole-model timings saw.

    `penalty[name]` seconds are added to the whole converted model while layer `name` is converted
    (a pair that is fast alone and slow in context, as caches make it).
    """
    seen, penalty = [], {}

    def model_time(model):
        converted = converted_names(model)
        total = 0.0
        for name, module in model.named_modules():
            inside_a_pair = any(name.startswith(pair + ".") for pair in converted)
            if isinstance(module, (nn.Conv2d, _SeparableConvNd)) and not inside_a_pair:
                conv_seconds, pair_seconds = LAYER_SECONDS[module.out_channels]
                total += pair_seconds if name in converted else conv_seconds
        return total + sum(penalty.get(name, 0.0) for name in converted)

    def paired_medians(first, second, args, runs, warmup=2):
        assert not first.training and not second.training  # timed as deployed
        assert runs == LATENCY_RUNS and len(args) == 1 and args[0].shape[0] == 1
        if isinstance(first, nn.Conv2d):  # one layer: its conv, then its pair, on that layer's input
            assert args[0].shape[1] == first.in_channels
            return LAYER_SECONDS[first.out_channels]
        assert args[0].shape == (1, 3, 8, 8)  # the whole model: original, then converted, on the example inputs
        seen.append(converted_names(second))
        return model_time(first), model_time(second)

    monkeypatch.setattr("convsep.speed.paired_medians", paired_medians)
    return seen, penalty


def latency_convert(model):
    return convsep.convert(model, rank=1, objective="latency", example_inputs=torch.randn(1, 3, 8, 8))


def test_latency_objective_converts_exactly_the_layers_whose_pair_is_faster(scripted_clock):
    converted = latency_convert(three_convs())
    plan = {d.name: d for d in converted.convsep_plan.layers}
    assert converted_names(converted) == {"2", "4"}
    assert [d.name for d in converted.convsep_plan.converted] == ["2", "4"]
    assert plan["0"].reason == (
        "kept for speed: the pair took 2000.000 ms against 1000.000 ms for the original conv on this device and input"
    )
    assert isinstance(converted[0], nn.Conv2d) and plan["0"].converted is False and plan["0"].relative_error is None


def test_latency_objective_pairs_carry_the_svd_init(scripted_clock):
    model = three_convs()
    converted, by_macs = latency_convert(model), convsep.convert(model, rank=1)
    for name in ("2", "4"):
        assert_bitwise_equal(snapshot(by_macs.get_submodule(name)), converted.get_submodule(name))


def test_latency_objective_times_layers_in_eval_mode_and_restores_the_mode(scripted_clock):
    model = three_convs().train()
    converted = latency_convert(model)
    assert model.training and all(m.training for m in converted.modules())


class WithUnusedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.unused = nn.Conv2d(3, 16, 3)  # registered first, never called
        self.body = three_convs()

    def forward(self, x):
        return self.body(x)


def test_latency_objective_keeps_a_layer_that_never_runs_and_times_the_rest(scripted_clock):
    converted = latency_convert(WithUnusedConv().eval())
    unused = converted.convsep_plan.layers[0]
    assert (unused.name, unused.converted) == ("unused", False)
    assert unused.reason == "objective='latency': never ran on the example inputs, so not timed"
    assert converted_names(converted) == {"body.2", "body.4"}


class CalledTwice(nn.Module):
    """One conv run on the full input, then on a downsampled copy."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x).sum() + self.conv(x[..., ::2, ::2]).sum()


def test_latency_objective_times_a_layer_on_the_input_of_its_first_call(monkeypatch):
    shapes = []

    def paired_medians(first, second, args, runs, warmup=2):
        shapes.append(tuple(args[0].shape))
        return 1.0, 2.0

    monkeypatch.setattr("convsep.speed.paired_medians", paired_medians)
    latency_convert(CalledTwice().eval())
    assert shapes == [(1, 3, 8, 8)]


def test_latency_objective_needs_the_pair_faster_by_at_least_the_margin(scripted_clock, monkeypatch):
    monkeypatch.setitem(LAYER_SECONDS, 12, (1.0, 0.95))  # exactly 5% faster: not enough
    converted = latency_convert(three_convs())
    assert converted_names(converted) == {"2"}


def test_latency_objective_stops_reverting_once_the_whole_model_is_faster(scripted_clock):
    seen, _ = scripted_clock
    converted = latency_convert(three_convs())
    assert seen == [{"2", "4"}]  # faster at the first measurement: nothing reverted
    assert converted_names(converted) == {"2", "4"}


def test_latency_objective_reverts_the_smallest_gain_first_until_the_model_is_faster(scripted_clock):
    seen, penalty = scripted_clock
    penalty["4"] = 0.625  # with "4" converted the whole model takes as long as the original: not faster
    converted = latency_convert(three_convs())
    assert seen == [{"2", "4"}, {"2"}]
    assert converted_names(converted) == {"2"}
    assert isinstance(converted[4], nn.Conv2d)
    reverted = converted.convsep_plan.layers[2]
    assert (reverted.name, reverted.converted, reverted.relative_error) == ("4", False, None)
    assert reverted.reason == (
        "kept for speed: with it converted the whole model took 3000.00 ms against 3000.00 ms for the original"
    )


def test_latency_objective_reverts_every_layer_while_the_model_stays_slower(scripted_clock):
    seen, penalty = scripted_clock
    penalty["2"] = penalty["4"] = 1.0
    model = three_convs()
    converted = latency_convert(model)
    assert seen == [{"2", "4"}, {"2"}]  # "4" (smallest gain) goes first, then "2" without a new measurement
    assert converted_names(converted) == set() and not converted.convsep_plan.converted
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))  # the original convs are back, weights and all


def test_paired_medians_times_each_call_alternately_after_the_warmup(monkeypatch):
    from convsep.speed import paired_medians

    clock, calls = [0.0], []

    def takes(seconds, name):
        def call(x):
            calls.append(name)
            clock[0] += seconds
        return call

    monkeypatch.setattr("convsep.speed.time.perf_counter", lambda: clock[0])
    first, second = takes(1.0, "first"), takes(4.0, "second")
    assert paired_medians(first, second, (None,), runs=3) == (1.0, 4.0)
    assert calls == ["first", "second"] * 5  # 2 warm-up pairs, then 3 timed pairs, interleaved

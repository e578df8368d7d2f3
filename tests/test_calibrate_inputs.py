"""How calibrate reads its data and the models: the batches it takes, layers called unbatched or
several times, forwards stopped early, the device and the modes; and the messages for what it cannot use."""

import copy
import re

import pytest
import torch
from helpers import snapshot
from torch import nn
from zoo import Probe

import convsep
from convsep import least_squares


def one_conv(in_channels=3, out_channels=6, rank=1, **conv):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, **conv)).eval()
    return model, convsep.convert(model, rank=rank)


def pointwise_least_squares(pair, inputs, targets):
    """The pointwise weights and bias that best map the pair's depthwise outputs on `inputs` to `targets`."""
    with torch.no_grad():
        features = torch.cat(
            [pair.depthwise(x).movedim(1, -1).reshape(-1, pair.depthwise.out_channels) for x in inputs]
        )
        wanted = torch.cat([y.movedim(1, -1).reshape(-1, y.shape[1]) for y in targets])
    design = torch.cat([features, torch.ones(len(features), 1)], dim=1).double()
    solution = torch.linalg.lstsq(design, wanted.double()).solution.float()
    return solution[:-1].T, solution[-1]


def assert_pointwise_is(pair, weight, bias):
    torch.testing.assert_close(pair.pointwise.weight.flatten(1), weight, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pair.pointwise.bias, bias, rtol=1e-4, atol=1e-4)


class Twice(nn.Module):
    """One conv called twice per forward, on different inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Identity()

    def forward(self, x):
        return self.head(self.conv(torch.relu(self.conv(x))))


def test_a_layer_called_twice_is_fitted_on_both_calls():
    torch.manual_seed(0)
    model = Twice().eval()
    converted = convsep.convert(model, rank=1, example_inputs=torch.randn(1, 4, 6, 6))
    x = torch.randn(6, 4, 6, 6)
    with torch.no_grad():
        first = model.conv(x)
        init_first = converted.conv(x)  # the second call's input in the converted model, before the refit
    pair = copy.deepcopy(converted.conv)
    convsep.calibrate(converted, model, [x], ridge=0.0)
    # The two calls' inputs in the converted model (the second one from the pair as it was), against the original's outputs.
    assert_pointwise_is(
        converted.conv,
        *pointwise_least_squares(pair, [x, torch.relu(init_first)], [first, model.conv(torch.relu(first))]),
    )


class Unbatched(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)

    def forward(self, x):
        return torch.stack([self.conv(sample) for sample in x])  # (channels, height, width) per call


def test_a_layer_called_on_unbatched_inputs_is_fitted_like_a_batched_one():
    torch.manual_seed(0)
    model = Unbatched().eval()
    converted = convsep.convert(model, rank=1, example_inputs=torch.randn(1, 3, 7, 7))
    batched = nn.Sequential(model.conv)
    batched_converted = convsep.convert(batched, rank=1)
    x = torch.randn(5, 3, 7, 7)
    convsep.calibrate(converted, model, [x], ridge=0.0)
    convsep.calibrate(batched_converted, batched, [x], ridge=0.0)
    assert_pointwise_is(
        converted.conv, batched_converted[0].pointwise.weight.flatten(1), batched_converted[0].pointwise.bias
    )


def test_batches_larger_than_a_chunk_are_summed_chunk_by_chunk_to_the_same_fit(monkeypatch):
    model, converted = one_conv(in_channels=3, out_channels=4)
    x = torch.randn(16, 3, 6, 6)  # more samples than channels
    whole = convsep.calibrate(copy.deepcopy(converted), model, [x], ridge=0.0)
    monkeypatch.setattr(least_squares, "_CHUNK_ELEMENTS", 3 * 36)  # one sample per chunk
    features, sizes = least_squares.LayerStats._features, []
    monkeypatch.setattr(least_squares.LayerStats, "_features", lambda self, x, *how: sizes.append(len(x)) or features(self, x, *how))
    chunked = convsep.calibrate(copy.deepcopy(converted), model, [x], ridge=0.0)
    assert sizes == [1] * 16
    assert_pointwise_is(chunked[0], whole[0].pointwise.weight.flatten(1), whole[0].pointwise.bias)


@pytest.mark.parametrize("alternate", [1, 2])
def test_grouped_layers_with_a_bias_alternate_to_a_lower_error(alternate):
    model, converted = one_conv(in_channels=4, out_channels=6, rank=1, groups=2)
    data = [torch.randn(8, 4, 8, 8)]
    pointwise_only = convsep.calibrate(copy.deepcopy(converted), model, data)
    alternated = convsep.calibrate(copy.deepcopy(converted), model, data, alternate=alternate)
    after = alternated.convsep_plan.calibration["layers"]["0"]["after"]
    assert after < pointwise_only.convsep_plan.calibration["layers"]["0"]["after"]
    with torch.no_grad():
        measured = float((alternated(data[0]) - model(data[0])).norm() / model(data[0]).norm())
    assert after == pytest.approx(measured, rel=1e-4)


def test_each_forward_stops_once_the_layer_has_been_seen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), Probe()).eval()
    converted = convsep.convert(model, rank=1)
    model[2].calls = converted[2].calls = 0  # convert ran them to measure the layers
    convsep.calibrate(converted, model, [torch.randn(2, 3, 8, 8)] * 3)
    assert model[2].calls == 0  # the original's forwards end at the layer being fitted
    assert converted[2].calls == 1  # the converted model runs whole once, to learn the order of the layers


def test_a_one_shot_iterator_is_read_no_further_than_batches():
    def five_then_broken():
        yield from (torch.randn(2, 3, 8, 8) for _ in range(2))
        raise AssertionError("read past the batches asked for")

    model, converted = one_conv()
    convsep.calibrate(converted, model, five_then_broken(), batches=2)
    assert converted.convsep_plan.calibration["batches"] == 2


class IndexOnly:
    """Data with the old sequence protocol only: __getitem__ until IndexError."""

    def __init__(self, items):
        self.items = items

    def __getitem__(self, index):
        return self.items[index]


def test_data_that_is_only_indexable_is_read_like_a_list():
    model, converted = one_conv()
    data = [torch.randn(2, 3, 8, 8), torch.randn(3, 3, 8, 8)]
    from_list = convsep.calibrate(copy.deepcopy(converted), model, data)
    indexed = convsep.calibrate(copy.deepcopy(converted), model, IndexOnly(data))
    assert indexed.convsep_plan.calibration["samples"] == 5
    assert_pointwise_is(indexed[0], from_list[0].pointwise.weight.flatten(1), from_list[0].pointwise.bias)


def test_models_with_several_inputs_count_the_samples_of_the_first():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x, scale):
            return self.conv(x) * scale

    torch.manual_seed(0)
    model = TwoInputs().eval()
    converted = convsep.convert(model, rank=1, example_inputs=(torch.randn(1, 3, 8, 8), torch.ones(1)))
    data = [((torch.randn(3, 3, 8, 8), torch.ones(1)), None), ((torch.randn(4, 3, 8, 8), torch.ones(1)), None)]
    convsep.calibrate(converted, model, data)
    assert (converted.convsep_plan.calibration["batches"], converted.convsep_plan.calibration["samples"]) == (2, 7)


def test_device_given_runs_there_and_leaves_the_original_where_it_was():
    model, converted = one_conv()
    data = [torch.randn(4, 3, 8, 8)]
    here = convsep.calibrate(copy.deepcopy(converted), model, data)
    state = snapshot(model)
    there = convsep.calibrate(copy.deepcopy(converted), model, data, device="cpu")
    assert_pointwise_is(there[0], here[0].pointwise.weight.flatten(1), here[0].pointwise.bias)
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value)


def test_both_models_run_in_eval_mode_so_no_running_statistics_move():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3)).train()
    converted = convsep.convert(model, rank=1).train()
    running = converted[1].running_mean.clone(), converted[1].running_var.clone()
    convsep.calibrate(converted, model, [torch.ones(2, 3, 8, 8) + 0.1 * torch.randn(2, 3, 8, 8)])
    assert torch.equal(converted[1].running_mean, running[0]) and torch.equal(converted[1].running_var, running[1])
    assert converted.training and converted[1].training and model.training


def test_a_first_batch_the_models_cannot_take_names_the_converted_model_and_the_batch():
    model, converted = one_conv()
    with pytest.raises(convsep.InputShapeError) as info:
        convsep.calibrate(converted, model, [torch.randn(2, 5, 8, 8)])
    assert re.fullmatch(
        r"calibration batch 1: the converted model cannot run on inputs \(2, 5, 8, 8\) float32: RuntimeError: .+",
        str(info.value),
    )


def test_a_later_batch_the_models_cannot_take_names_the_original_model_the_batch_and_the_layer():
    model, converted = one_conv()
    with pytest.raises(convsep.InputShapeError) as info:
        convsep.calibrate(converted, model, [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 8, 8)])
    assert re.fullmatch(
        r"calibration batch 2 \(calibrating '0'\): the original model cannot run on inputs \(2, 5, 8, 8\) float32: "
        r"RuntimeError: .+",
        str(info.value),
    )


def test_a_single_tensor_as_data_is_refused_with_the_fix():
    model, converted = one_conv()
    with pytest.raises(convsep.ConvsepTypeError) as info:
        convsep.calibrate(converted, model, torch.randn(2, 3, 8, 8))
    assert str(info.value) == (
        "calibration data is a single tensor, which would be iterated sample by sample: pass a list of batches, e.g. [x]"
    )


def test_an_original_whose_layer_gives_other_shapes_is_refused_naming_the_layer_and_the_shapes():
    model, converted = one_conv(out_channels=6)
    with torch.no_grad():
        strided = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2)).eval()  # same names, other positions
        narrower = nn.Sequential(nn.Conv2d(3, 1, 3)).eval()  # same names, one channel
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(convsep.ConvsepValueError) as info:
        convsep.calibrate(copy.deepcopy(converted), strided, [x])
    assert str(info.value) == (
        "layer '0': the original layer's outputs (2, 6, 3, 3) do not match the pair's 6 channels at 36 positions"
    )
    with pytest.raises(convsep.ConvsepValueError) as info:
        convsep.calibrate(copy.deepcopy(converted), narrower, [x])
    assert str(info.value) == (
        "layer '0': the original layer's outputs (2, 1, 6, 6) do not match the pair's 6 channels at 36 positions"
    )


def test_a_batch_only_the_converted_model_cannot_take_names_the_converted_model_the_batch_and_the_layer():
    model, converted = one_conv()

    def refuse_three(_module, args):
        if args[0].shape[0] == 3:
            raise RuntimeError("three is too many")

    converted.register_forward_pre_hook(refuse_three)  # the original runs the batch; the converted model cannot
    with pytest.raises(convsep.InputShapeError) as info:
        convsep.calibrate(converted, model, [torch.randn(2, 3, 8, 8), torch.randn(3, 3, 8, 8)])
    assert str(info.value) == (
        "calibration batch 2 (calibrating '0'): the converted model cannot run on inputs (3, 3, 8, 8) float32: "
        "RuntimeError: three is too many"
    )


def test_an_original_that_calls_the_layer_less_often_is_refused():
    torch.manual_seed(0)
    model = Twice().eval()
    converted = convsep.convert(model, rank=1, example_inputs=torch.randn(1, 4, 6, 6))
    once = nn.Module()
    once.conv, once.head = model.conv, nn.Identity()
    once.forward = lambda x: model.conv(x)
    with pytest.raises(convsep.ConvsepValueError) as info:
        convsep.calibrate(converted, once, [torch.randn(2, 4, 6, 6)])
    assert str(info.value) == (
        "calibration batch 1 (calibrating 'conv'): the layer ran 2 times in the converted model and 1 times in the "
        "original: is `original` the model convert was given?"
    )


def test_a_plan_that_names_a_pair_converted_no_longer_has_is_refused():
    model, converted = one_conv()
    converted[0] = nn.Identity()
    with pytest.raises(convsep.ConvsepValueError) as info:
        convsep.calibrate(converted, model, [torch.randn(2, 3, 8, 8)])
    assert str(info.value) == "the plan says '0' became '0', but converted has no pair there"


def test_an_original_with_something_else_than_a_conv_under_the_layers_name_is_refused():
    model, converted = one_conv()
    with pytest.raises(convsep.ConvsepValueError) as info:
        convsep.calibrate(converted, nn.Sequential(nn.Identity()), [torch.randn(2, 3, 8, 8)])
    assert str(info.value) == (
        "original has no convolution '0', which converted's plan names: pass the model convert was given"
    )


def test_a_pair_that_makes_nan_is_refused_before_its_fit_and_left_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)).eval()
    converted = convsep.convert(model, rank=1)
    with torch.no_grad():
        converted[0].depthwise.weight[0].fill_(float("nan"))  # the original's outputs stay finite
    with pytest.raises(convsep.ConvsepValueError) as info:
        convsep.calibrate(converted, model, [torch.randn(2, 3, 8, 8)])
    assert str(info.value) == (
        "calibrating '0': its inputs or the original layer's outputs on the calibration data hold NaN or inf, so its "
        "fit would be NaN: the layer was left as it was. Look for NaN/inf in the calibration data"
    )
    assert bool(torch.isfinite(converted[0].pointwise.weight).all())


def test_an_original_that_gives_other_shapes_on_one_sample_of_one_channel_is_refused_the_same_way():
    model, converted = one_conv(in_channels=1, out_channels=6)
    strided = nn.Sequential(nn.Conv2d(1, 6, 3, stride=2)).eval()
    with pytest.raises(convsep.ConvsepValueError) as info:
        convsep.calibrate(converted, strided, [torch.randn(1, 1, 8, 8)])
    assert str(info.value) == (
        "layer '0': the original layer's outputs (1, 6, 3, 3) do not match the pair's 6 channels at 36 positions"
    )


@pytest.mark.parametrize(
    "converted, original, message",
    [
        ("model", None, "converted must be a torch.nn.Module, got str"),
        ("same", None, "converted and original are the same model: pass the model convert was given as original"),
        (
            "plain", None,
            "converted has no conversion plan (convsep_plan): pass a model returned by convsep.convert",
        ),
    ],
)  # fmt: skip
def test_models_that_cannot_be_calibrated_are_refused_with_the_whole_message(converted, original, message):
    model, pairs = one_conv()
    converted = {"model": "model", "same": pairs, "plain": copy.deepcopy(model)}[converted]
    original = pairs if converted is pairs else model
    with pytest.raises((convsep.ConvsepTypeError, convsep.ConvsepValueError)) as info:
        convsep.calibrate(converted, original, [torch.randn(2, 3, 8, 8)])
    assert str(info.value) == message


@pytest.mark.parametrize(
    "keyword, value, message",
    [
        ("batches", True, "batches=True must be a positive int (or None for all batches)"),
        ("batches", 2.5, "batches=2.5 must be a positive int (or None for all batches)"),
        ("batches", 0, "batches=0 must be a positive int (or None for all batches)"),
        ("ridge", True, "ridge=True must be a finite number >= 0"),
        ("ridge", float("inf"), "ridge=inf must be a finite number >= 0"),
        ("ridge", float("nan"), "ridge=nan must be a finite number >= 0"),
        ("alternate", True, "alternate=True must be an int >= 0 (rounds of depthwise + pointwise refits)"),
        ("alternate", 1.0, "alternate=1.0 must be an int >= 0 (rounds of depthwise + pointwise refits)"),
    ],
)
def test_bad_settings_are_refused_with_the_whole_message(keyword, value, message):
    model, converted = one_conv()
    with pytest.raises(convsep.ConvsepValueError) as info:
        convsep.calibrate(converted, model, [torch.randn(2, 3, 8, 8)], **{keyword: value})
    assert str(info.value) == message


def test_one_batch_is_a_valid_limit():
    model, converted = one_conv()
    convsep.calibrate(converted, model, [torch.randn(2, 3, 8, 8)] * 3, batches=1)
    assert converted.convsep_plan.calibration["batches"] == 1


def two_convs():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()


def test_a_second_conversion_calibrates_its_own_pairs_against_the_first():
    model, data = two_convs(), [torch.randn(4, 3, 8, 8) for _ in range(3)]
    first = convsep.convert(model, rank=2, include=["0"])
    before = copy.deepcopy(first.state_dict())
    second = convsep.convert(first, rank=1, calibration_data=data)  # its plan names "0" (the first's) and "2"
    assert [d.name for d in second.convsep_plan.converted] == ["0", "2"]
    assert set(second.convsep_plan.calibration["layers"]) == {"2"}
    for key, value in first.state_dict().items():
        assert torch.equal(value, before[key]), key
        if key.startswith("0."):
            assert torch.equal(second.state_dict()[key], value), key  # the first's pair, left as it was
    # the same as fitting the second's pair by hand against the first: a pair after the first's pair
    direct = convsep.calibrate(convsep.convert(first, rank=1), first, data)
    for key, value in direct.state_dict().items():
        torch.testing.assert_close(second.state_dict()[key], value)
    # against the model itself, every pair is calibrated
    both = convsep.calibrate(convsep.convert(first, rank=1), model, data)
    assert set(both.convsep_plan.calibration["layers"]) == {"0", "2"}


def test_an_original_that_holds_every_pair_already_calibrates_nothing_and_says_so():
    model, data = two_convs(), [torch.randn(4, 3, 8, 8)]
    converted = convsep.convert(model, rank=1)
    with pytest.warns(UserWarning) as record:
        convsep.calibrate(converted, copy.deepcopy(converted), data)
    assert [str(w.message) for w in record] == [
        "nothing calibrated: `original` holds every pair of converted already (0, 2). Pass the model convert was "
        "given (for a model converted twice, the first conversion's result calibrates the second's pairs)"
    ]
    assert converted.convsep_plan.calibration["layers"] == {}

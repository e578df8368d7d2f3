"""calibrate(sequential=False): every pair fitted at once on its inputs in the original model, from one
forward of the original per batch."""

import copy

import pytest
import torch
from helpers import relative_error
from torch import nn
from zoo import ARCHITECTURES, Branch, Probe

import convsep


def two_convs():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3), Probe()).eval()


def data():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(size, 3, 8, 8, generator=generator) for size in (3, 5)]


def least_squares_pointwise(pair, inputs, targets):
    with torch.no_grad():
        features = torch.cat([pair.depthwise(x).movedim(1, -1).flatten(0, -2) for x in inputs])
        wanted = torch.cat([y.movedim(1, -1).flatten(0, -2) for y in targets])
    design = torch.cat([features, torch.ones(len(features), 1)], dim=1).double()
    solution = torch.linalg.lstsq(design, wanted.double()).solution.float()
    return solution[:-1].T, solution[-1]


def test_each_pair_is_the_least_squares_fit_on_its_inputs_in_the_original_model():
    model, batches = two_convs(), data()
    calibrated = convsep.calibrate(convsep.convert(model, rank=1), model, batches, ridge=0.0, sequential=False)
    init = convsep.convert(model, rank=1)
    with torch.no_grad():
        hidden = [model[1](model[0](x)) for x in batches]  # the original's, not the calibrated first pair's
        expected = {
            0: least_squares_pointwise(init[0], batches, [model[0](x) for x in batches]),
            2: least_squares_pointwise(init[2], hidden, [model[2](h) for h in hidden]),
        }
    for index, (weight, bias) in expected.items():
        torch.testing.assert_close(calibrated[index].pointwise.weight.flatten(1), weight, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(calibrated[index].pointwise.bias, bias, rtol=1e-4, atol=1e-4)


def test_the_first_layer_gets_the_same_fit_either_way_and_the_later_ones_do_not():
    model, batches = two_convs(), data()
    in_order = convsep.calibrate(convsep.convert(model, rank=1), model, batches)
    at_once = convsep.calibrate(convsep.convert(model, rank=1), model, batches, sequential=False)
    torch.testing.assert_close(at_once[0].pointwise.weight, in_order[0].pointwise.weight, rtol=1e-5, atol=1e-6)
    assert relative_error(at_once[2].pointwise.weight, in_order[2].pointwise.weight) > 1e-3


def test_the_original_runs_once_per_batch_and_the_converted_model_not_at_all():
    model, batches = two_convs(), data()
    converted = convsep.convert(model, rank=1)
    model[3].calls = converted[3].calls = 0  # convert ran them to measure the layers
    convsep.calibrate(converted, model, batches * 2, sequential=False)
    assert (model[3].calls, converted[3].calls) == (4, 0)


def test_the_recorded_errors_are_measured_on_the_original_models_inputs():
    model, batches = two_convs(), data()
    init = convsep.convert(model, rank=1)
    calibrated = convsep.calibrate(copy.deepcopy(init), model, batches, sequential=False)
    calibration = calibrated.convsep_plan.calibration
    assert {key: value for key, value in calibration.items() if key != "layers"} == {
        "batches": 2,
        "samples": 8,
        "ridge": 1e-3,
        "alternate": 0,
        "sequential": False,
    }
    with torch.no_grad():
        inputs = {"0": batches, "2": [model[1](model[0](x)) for x in batches]}
        for name, index in (("0", 0), ("2", 2)):
            targets = [model[index](x) for x in inputs[name]]
            energy = sum(float(t.double().square().sum()) for t in targets)

            def error(pair, inputs=inputs[name], targets=targets, energy=energy):
                return (
                    sum(float((pair(x) - t).double().square().sum()) for x, t in zip(inputs, targets)) / energy
                ) ** 0.5

            before, after = error(init[index]), error(calibrated[index])
            assert calibration["layers"][name] == pytest.approx(
                {"before": before, "after": after, "initial": before}, rel=1e-4
            )


@pytest.mark.parametrize("name", ["functional", "shared", "mixed_dims"])
def test_odd_models_improve(name):
    torch.manual_seed(0)
    factory, shape = ARCHITECTURES[name]
    model, x = factory().eval(), torch.randn(shape)
    converted = convsep.convert(model, rank=1)
    with torch.no_grad():
        before = relative_error(converted(x), model(x))
    convsep.calibrate(converted, model, [x], sequential=False)
    with torch.no_grad():
        assert relative_error(converted(x), model(x)) < before


def test_layers_the_data_never_reaches_are_named_in_one_warning_and_left_as_they_are():
    torch.manual_seed(0)
    model = Branch().eval()
    converted = convsep.convert(model, rank=1, example_inputs=torch.randn(1, 3, 12, 12))
    wide = copy.deepcopy(converted.wide.state_dict())
    with pytest.warns(UserWarning) as record:
        convsep.calibrate(converted, model, [torch.randn(2, 3, 8, 8)], sequential=False)
    assert [str(w.message) for w in record] == ["not calibrated, since the data never reached them: wide"]
    assert list(converted.convsep_plan.calibration["layers"]) == ["stem"]
    assert all(torch.equal(converted.wide.state_dict()[key], value) for key, value in wide.items())


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("data", [[], iter([])])
def test_data_without_batches_is_refused(data, sequential):
    model = two_convs()
    with pytest.raises(convsep.ConvsepValueError) as info:
        convsep.calibrate(convsep.convert(model, rank=1), model, data, sequential=sequential)
    assert str(info.value) == "calibration data yielded no batches: nothing to calibrate on"


def test_a_batch_the_original_cannot_take_names_the_batch():
    model = two_convs()
    with pytest.raises(convsep.InputShapeError) as info:
        convsep.calibrate(
            convsep.convert(model, rank=1), model, [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 8, 8)], sequential=False
        )
    assert str(info.value).startswith("calibration batch 2: the original model cannot run on inputs (2, 5, 8, 8) ")


@pytest.mark.parametrize("sequential", ["no", 0, None])
def test_sequential_must_be_a_bool(sequential):
    model = two_convs()
    with pytest.raises(convsep.ConvsepTypeError) as info:
        convsep.calibrate(convsep.convert(model, rank=1), model, data(), sequential=sequential)
    assert str(info.value) == f"sequential={sequential!r} must be True or False"


def test_convert_calibrates_at_once_when_asked():
    model, batches = two_convs(), data()
    through_convert = convsep.convert(model, rank=1, calibration_data=batches, calibration_sequential=False)
    direct = convsep.calibrate(convsep.convert(model, rank=1), model, batches, sequential=False)
    assert through_convert.convsep_plan.calibration["sequential"] is False
    for key, value in direct.state_dict().items():
        torch.testing.assert_close(through_convert.state_dict()[key], value)


def test_convert_refuses_a_calibration_sequential_that_is_not_a_bool_before_any_work():
    with pytest.raises(convsep.ConvsepTypeError) as info:
        convsep.convert(two_convs(), rank=1, calibration_data=data(), calibration_sequential="no")
    assert str(info.value) == "calibration_sequential='no' must be True or False"


def test_an_original_whose_layer_gives_other_shapes_is_refused_naming_the_layer():
    torch.manual_seed(0)
    converted = convsep.convert(nn.Sequential(nn.Conv2d(3, 6, 3)).eval(), rank=1)
    strided = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2)).eval()  # same names, other positions
    with pytest.raises(convsep.ConvsepValueError) as info:
        convsep.calibrate(converted, strided, [torch.randn(2, 3, 8, 8)], sequential=False)
    assert str(info.value) == (
        "layer '0': the original layer's outputs (2, 6, 3, 3) do not match the pair's 6 channels at 36 positions"
    )

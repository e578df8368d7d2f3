"""What calibrate records and says: the errors in the plan are the ones measured on the data, what it
prints, logs and shows on a progress bar, and where its warnings point."""

import copy
import logging
import math
import sys
import warnings

import pytest
import torch
from helpers import assert_bitwise_equal
from torch import nn
from zoo import Branch

import convsep
from convsep import least_squares

calibrate_module = sys.modules["convsep.calibrate"]  # `convsep.calibrate` is the function


def two_convs(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=bias), nn.ReLU(), nn.Conv2d(6, 4, 3, bias=bias)).eval()


def batches(scale=1.0):
    generator = torch.Generator().manual_seed(1)
    return [scale * torch.randn(size, 3, 8, 8, generator=generator) for size in (3, 5)]  # two sizes: the sums add up


def relative(outputs, targets):
    """sqrt(sum of squared errors / sum of squared targets) over all batches."""
    error = sum(float((o - t).double().square().sum()) for o, t in zip(outputs, targets))
    return math.sqrt(error / sum(float(t.double().square().sum()) for t in targets))


def measured_errors(model, init, calibrated, data):
    """Each layer's errors as calibrate defines them, measured by running the models."""
    with torch.no_grad():
        first_targets = [model[0](x) for x in data]
        original_hidden = [model[1](y) for y in first_targets]
        second_targets = [model[2](h) for h in original_hidden]
        converted_hidden = [calibrated[1](calibrated[0](x)) for x in data]  # the first pair already calibrated
        return {
            "0": {
                "before": relative([init[0](x) for x in data], first_targets),
                "after": relative([calibrated[0](x) for x in data], first_targets),
                "initial": relative([init[0](x) for x in data], first_targets),
            },
            "2": {
                "before": relative([init[2](h) for h in converted_hidden], second_targets),
                "after": relative([calibrated[2](h) for h in converted_hidden], second_targets),
                "initial": relative([init[2](h) for h in original_hidden], second_targets),  # on the original's inputs
            },
        }


@pytest.mark.parametrize("scale, bias", [(1.0, True), (1e-3, False)])  # 1e-3: output energies below 1
def test_the_recorded_errors_are_the_relative_output_errors_measured_on_all_the_data(scale, bias):
    model, data = two_convs(bias), batches(scale)
    init = convsep.convert(model, rank=1)
    calibrated = convsep.calibrate(copy.deepcopy(init), model, data)
    expected = measured_errors(model, init, calibrated, data)
    recorded = calibrated.convsep_plan.calibration["layers"]
    assert recorded.keys() == expected.keys()
    for name, errors in expected.items():
        assert recorded[name] == pytest.approx(errors, rel=1e-4), name
        assert errors["after"] < errors["before"], name


def test_the_plan_records_the_batches_samples_and_settings_used():
    model, data = two_convs(), batches()
    calibrated = convsep.calibrate(convsep.convert(model, rank=1), model, data, alternate=1)
    calibration = calibrated.convsep_plan.calibration
    assert {key: value for key, value in calibration.items() if key != "layers"} == {
        "batches": 2,
        "samples": 8,
        "ridge": 1e-3,  # the default
        "alternate": 1,
        "sequential": True,
        "kept": {},  # kept layers are refitted by default in order: none runs after a pair here
    }
    assert list(calibration["layers"]) == ["0", "2"]
    assert all(set(errors) == {"before", "after", "initial"} for errors in calibration["layers"].values())


def test_a_layer_whose_outputs_are_zero_is_met_exactly_and_says_so():
    model = two_convs()
    with torch.no_grad():
        model[2].weight.zero_()  # a pruned layer: its outputs are zero on every input
        model[2].bias.zero_()
    calibrated = convsep.calibrate(convsep.convert(model, rank=1), model, batches())
    assert calibrated.convsep_plan.calibration["layers"]["2"] == {"before": 0.0, "after": 0.0, "initial": 0.0}
    assert all(bool(torch.isfinite(p).all()) for p in calibrated.parameters())


def test_batches_without_samples_leave_the_weights_and_record_no_errors():
    model = two_convs()
    converted = convsep.convert(model, rank=1)
    init = copy.deepcopy(converted.state_dict())
    convsep.calibrate(converted, model, [torch.randn(0, 3, 8, 8)])
    for errors in converted.convsep_plan.calibration["layers"].values():
        assert all(math.isnan(value) for value in errors.values())
    for key, value in init.items():
        assert torch.equal(converted.state_dict()[key], value), key


def test_one_output_position_is_enough_to_fit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()  # 3x3 inputs: one output position
    converted = convsep.convert(model, rank=1)
    convsep.calibrate(converted, model, [torch.randn(1, 3, 3, 3)], ridge=0.0)
    errors = converted.convsep_plan.calibration["layers"]["0"]
    assert errors["after"] < 1e-3 < errors["before"]  # 2 unknowns per output (weight, bias) and 1 equation: exact


def expected_lines(calibrated):
    return [
        f"calibrated {name}: relative output error {errors['before']:.4f} -> {errors['after']:.4f}"
        for name, errors in calibrated.convsep_plan.calibration["layers"].items()
    ]


def test_verbose_prints_one_line_per_layer_with_its_errors(capsys):
    model = two_convs()
    calibrated = convsep.calibrate(convsep.convert(model, rank=1), model, batches(), verbose=True)
    assert capsys.readouterr().out.splitlines() == expected_lines(calibrated)


def test_verbose_with_predictions_prints_what_was_predicted_next_to_what_was_measured(capsys):
    model, data = two_convs(), batches()
    converted = convsep.convert(model, rank=1, calibration_data=data, refit=False, init="activation")  # whitened predictions
    calibrated = convsep.calibrate(converted, model, data, verbose=True)
    lines = []
    for line, decision in zip(expected_lines(calibrated), calibrated.convsep_plan.converted):
        measured = calibrated.convsep_plan.calibration["layers"][decision.name]["initial"]
        assert decision.predicted_output_error is not None
        line += f" (as converted, on the original's inputs: predicted {decision.predicted_output_error:.4f}, measured {measured:.4f})"
        if decision.predicted_refit_error is not None:
            line += f" (predicted after the refit: {decision.predicted_refit_error:.4f})"
        lines.append(line)
    assert capsys.readouterr().out.splitlines() == lines


def test_refit_aware_predictions_are_printed_too(capsys):
    model, data = two_convs(), batches()
    calibrated = convsep.convert(model, budget=0.5, budget_on="params", calibration_data=data, verbose=False)
    predicted = {d.name: d.predicted_refit_error for d in calibrated.convsep_plan.converted}
    assert any(value is not None for value in predicted.values())
    convsep.calibrate(calibrated, model, data, verbose=True)
    expected = [
        line
        + (
            f" (predicted after the refit: {d.predicted_refit_error:.4f})"
            if d.predicted_refit_error is not None
            else ""
        )
        for line, d in zip(expected_lines(calibrated), calibrated.convsep_plan.converted)
    ]
    assert all(d.predicted_output_error is None for d in calibrated.convsep_plan.converted)  # refit-aware only
    assert capsys.readouterr().out.splitlines() == expected


def test_each_layers_line_is_logged_at_info_whether_verbose_or_not(caplog):
    model = two_convs()
    with caplog.at_level(logging.INFO, logger="convsep.calibrate"):
        calibrated = convsep.calibrate(convsep.convert(model, rank=1), model, batches())
    logged = [record.getMessage() for record in caplog.records if record.name == "convsep.calibrate"]
    assert logged == expected_lines(calibrated)


class FakeBar:
    def __init__(self, total, verbose, desc, unit, leave=True):
        self.settings = {"total": total, "verbose": verbose, "desc": desc, "unit": unit, "leave": leave}
        self.updates, self.written, self.closed = 0, [], False

    def update(self):
        self.updates += 1

    def write(self, line):
        self.written.append(line)

    def close(self):
        self.closed = True


@pytest.mark.parametrize("sequential, passes", [(True, 2 * 4), (False, 4)])  # 2 layers x 4 batches, or 4 batches
def test_the_progress_bar_counts_every_pass_over_a_batch_and_carries_the_lines(monkeypatch, capsys, sequential, passes):
    bars = []
    monkeypatch.setattr(
        calibrate_module, "progress_bar", lambda *args, **kwargs: bars.append(FakeBar(*args, **kwargs)) or bars[-1]
    )
    model = two_convs()
    calibrated = convsep.calibrate(
        convsep.convert(model, rank=1), model, batches() * 2, verbose=True, sequential=sequential
    )
    (bar,) = bars
    assert bar.settings == {"total": passes, "verbose": True, "desc": "calibrating", "unit": "batch", "leave": False}
    assert bar.updates == passes and bar.closed
    assert bar.written == expected_lines(calibrated)  # through the bar, so that it is not torn
    assert capsys.readouterr().out == ""


def test_the_progress_bar_of_a_generator_has_no_total_and_is_closed_after_an_error(monkeypatch):
    bars = []
    monkeypatch.setattr(
        calibrate_module, "progress_bar", lambda *args, **kwargs: bars.append(FakeBar(*args, **kwargs)) or bars[-1]
    )
    model = two_convs()
    data = [torch.randn(2, 3, 8, 8), torch.full((2, 3, 8, 8), float("nan"))]
    with pytest.raises(convsep.ConvsepValueError):
        convsep.calibrate(convsep.convert(model, rank=1), model, iter(data), verbose=True)
    (bar,) = bars
    assert (
        bar.settings["total"] == 2 * 2 and bar.closed
    )  # 2 layers x 2 batches: a generator is read into a list first: its length is known
    bars.clear()
    with pytest.raises(convsep.ConvsepValueError):
        convsep.calibrate(convsep.convert(model, rank=1), model, Unsized(data), verbose=True)
    assert bars[0].settings["total"] == 0 and bars[0].closed  # unknown length
    bars.clear()
    with pytest.raises(convsep.ConvsepValueError):
        convsep.calibrate(convsep.convert(model, rank=1), model, Unsized(data), verbose=True, sequential=False)
    assert bars[0].settings["total"] == 0 and bars[0].closed  # at once too


class Unsized:
    """Re-iterable data without a length (a streaming dataset)."""

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


def test_layers_the_data_never_reaches_are_named_in_one_warning():
    torch.manual_seed(0)
    model = Branch().eval()
    converted = convsep.convert(model, rank=1, example_inputs=torch.randn(1, 3, 12, 12))
    with pytest.warns(UserWarning) as record:
        convsep.calibrate(converted, model, [torch.randn(2, 3, 8, 8)])
    assert [str(w.message) for w in record] == ["not calibrated, since the data never reached them: wide"]
    assert list(converted.convsep_plan.calibration["layers"]) == ["stem"]


def test_data_that_reaches_no_layer_records_that_nothing_was_used():
    torch.manual_seed(0)

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x) if x.shape[0] > 4 else x

    model = Skips().eval()
    converted = convsep.convert(model, rank=1, example_inputs=torch.randn(8, 3, 8, 8))
    with pytest.warns(UserWarning, match="never reached them: conv$"):
        convsep.calibrate(converted, model, [torch.randn(2, 3, 8, 8)] * 3)
    calibration = converted.convsep_plan.calibration
    assert (calibration["batches"], calibration["samples"], calibration["layers"]) == (0, 0, {})


def test_the_depthwise_size_warning_names_the_layer_and_its_size(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)).eval()  # unknowns per group: 3x1x9 = 27, 4x1x9 = 36
    monkeypatch.setattr(least_squares, "MAX_DEPTHWISE_UNKNOWNS", 27)
    with pytest.warns(UserWarning) as record:
        convsep.calibrate(convsep.convert(model, rank=1), model, [torch.randn(2, 3, 8, 8)], alternate=1)
    assert [str(w.message) for w in record] == [
        "layer '1': refitting its depthwise filters means 36 unknowns per group (more than 27); only its pointwise "
        "weights were refitted"
    ]


def test_depthwise_filters_at_the_size_limit_are_refitted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    converted = convsep.convert(model, rank=1)
    init = converted[0].depthwise.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        original_limit = least_squares.MAX_DEPTHWISE_UNKNOWNS
        try:
            least_squares.MAX_DEPTHWISE_UNKNOWNS = 27  # exactly this layer's 3 x 1 x 9
            convsep.calibrate(converted, model, [torch.randn(4, 3, 8, 8)], alternate=1)
        finally:
            least_squares.MAX_DEPTHWISE_UNKNOWNS = original_limit
    assert not torch.equal(converted[0].depthwise.weight, init)


@pytest.mark.parametrize("sequential", [True, False])
def test_over_the_size_limit_only_the_pointwise_weights_move_as_without_alternating(monkeypatch, sequential):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    converted = convsep.convert(model, rank=1)
    data = [torch.randn(4, 3, 8, 8)]
    pointwise_only = convsep.calibrate(copy.deepcopy(converted), model, data, sequential=sequential)
    init = converted[0].depthwise.weight.detach().clone()
    monkeypatch.setattr(least_squares, "MAX_DEPTHWISE_UNKNOWNS", 26)
    with pytest.warns(UserWarning, match="27 unknowns per group"):
        convsep.calibrate(converted, model, data, alternate=1, sequential=sequential)
    assert torch.equal(converted[0].depthwise.weight, init)
    # the same sums as without alternating: the patch sums (the costly ones) are not taken for a refit that won't run
    assert_bitwise_equal(pointwise_only.state_dict(), converted)


def test_the_progress_bar_counts_only_the_batches_asked_for(monkeypatch):
    bars = []
    monkeypatch.setattr(
        calibrate_module, "progress_bar", lambda *args, **kwargs: bars.append(FakeBar(*args, **kwargs)) or bars[-1]
    )
    model = two_convs()
    convsep.calibrate(convsep.convert(model, rank=1), model, batches() * 2, batches=3, verbose=True)
    assert (bars[0].settings["total"], bars[0].updates) == (2 * 3, 2 * 3)


def test_two_layers_never_reached_are_listed_in_one_warning():
    torch.manual_seed(0)

    class Stem(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.left, self.right = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)

        def forward(self, x):
            y = self.stem(x)
            return self.right(self.left(y)) if x.shape[0] > 4 else y

    model = Stem().eval()
    converted = convsep.convert(model, rank=1, example_inputs=torch.randn(8, 3, 9, 9))
    with pytest.warns(UserWarning) as record:
        convsep.calibrate(converted, model, [torch.randn(2, 3, 9, 9)])
    assert [str(w.message) for w in record] == ["not calibrated, since the data never reached them: left, right"]


def test_a_pair_that_makes_outputs_where_the_original_makes_none_has_an_infinite_relative_error():
    model = two_convs()
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.zero_()
    converted = convsep.convert(model, rank=1)
    with torch.no_grad():
        converted[2].pointwise.bias.fill_(1.0)  # the pair's outputs are not zero, the original's are
    convsep.calibrate(converted, model, batches())
    assert converted.convsep_plan.calibration["layers"]["2"]["initial"] == math.inf

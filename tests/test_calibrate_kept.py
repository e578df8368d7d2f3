"""calibrate(refit_kept=True): the layers conversion kept that run after a converted one are refitted on their
inputs in the converted model, against the original layer's outputs, by the same least squares as the pairs."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convsep
import convsep.kept

calibrate_module = __import__("convsep.calibrate", fromlist=["MAX_KEPT_UNKNOWNS"])


def head_after_conv():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5)
    ).eval()  # fmt: skip


def images(count=8, size=16, channels=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, channels, 8, 8, generator=generator) for _ in range(count)]


def least_squares(features, targets):
    design = torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype)], dim=1).double()
    solution = torch.linalg.lstsq(design, targets.double()).solution
    return solution[:-1].T, solution[-1]


def test_a_kept_linear_after_a_pair_is_the_least_squares_fit_on_its_inputs_in_the_converted_model():
    model, data = head_after_conv(), images()
    calibrated = convsep.calibrate(convsep.convert(model, rank=1), model, data, ridge=0.0, refit_kept=True)
    with torch.no_grad():
        features = torch.cat([calibrated[:4](x) for x in data])
        wanted = torch.cat([model(x) for x in data])
    weight, bias = least_squares(features, wanted)
    torch.testing.assert_close(calibrated[4].weight.double(), weight, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(calibrated[4].bias.double(), bias, atol=1e-4, rtol=1e-4)
    record = calibrated.convsep_plan.calibration["kept"]
    assert set(record) == {"4"} and record["4"]["refitted"] is True
    assert record["4"]["after"] < record["4"]["before"]
    with torch.no_grad():
        measured = float((calibrated(torch.cat(data)) - model(torch.cat(data))).norm() / model(torch.cat(data)).norm())
    assert record["4"]["after"] == pytest.approx(measured, rel=1e-3)


def test_a_kept_conv_after_a_pair_is_the_least_squares_fit_on_its_patches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2, groups=2)).eval()
    data = images()
    calibrated = convsep.calibrate(
        convsep.convert(model, rank=1, exclude=["2"]), model, data, ridge=0.0, refit_kept=True
    )
    with torch.no_grad():
        inputs = [calibrated[:2](x) for x in data]
        targets = torch.cat([model(x).movedim(1, -1).flatten(0, -2) for x in data])  # (positions, 4)
    for group in range(2):  # each group: its 3 input channels' patches -> its 2 outputs
        patches = torch.cat(
            [F.unfold(x[:, 3 * group : 3 * group + 3], 3, stride=2).movedim(1, -1).flatten(0, -2) for x in inputs]
        )
        weight, bias = least_squares(patches, targets[:, 2 * group : 2 * group + 2])
        kept = calibrated[2]
        torch.testing.assert_close(
            kept.weight[2 * group : 2 * group + 2].flatten(1).double(), weight, atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(kept.bias[2 * group : 2 * group + 2].double(), bias, atol=1e-4, rtol=1e-4)


def test_a_kept_linear_on_every_position_of_a_sequence_is_fitted_over_every_row():
    torch.manual_seed(0)

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv1d(4, 6, 5, padding=2), nn.Linear(6, 3)

        def forward(self, x):
            return self.head(torch.relu(self.conv(x)).transpose(1, 2))

    model = Tagger().eval()
    generator = torch.Generator().manual_seed(1)
    data = [torch.randn(3, 4, 10, generator=generator) for _ in range(2)]
    calibrated = convsep.calibrate(convsep.convert(model, rank=1), model, data, ridge=0.0, refit_kept=True)
    with torch.no_grad():
        features = torch.cat([torch.relu(calibrated.conv(x)).transpose(1, 2).flatten(0, 1) for x in data])
        wanted = torch.cat([model(x).flatten(0, 1) for x in data])
    weight, bias = least_squares(features, wanted)
    torch.testing.assert_close(calibrated.head.weight.double(), weight, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(calibrated.head.bias.double(), bias, atol=1e-4, rtol=1e-4)


def test_after_an_exact_conversion_the_kept_layers_stay_as_they_were():
    model, data = head_after_conv(), images()
    calibrated = convsep.calibrate(convsep.convert(model, rank="full"), model, data, refit_kept=True)
    record = calibrated.convsep_plan.calibration["kept"]["4"]
    # Errors measured from float32 sums have a floor near 1e-4 (1.5e-4 on one machine); at rank 1 it is 0.50.
    assert record["before"] < 1e-3 and record["after"] < 1e-3
    torch.testing.assert_close(calibrated[4].weight, model[4].weight, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [dict(refit_kept=False), dict(sequential=False)])
def test_without_refit_kept_nothing_but_the_pairs_changes(options):
    model, data = head_after_conv(), images()
    calibrated = convsep.calibrate(convsep.convert(model, rank=1), model, data, **options)
    assert "kept" not in calibrated.convsep_plan.calibration
    assert torch.equal(calibrated[4].weight, model[4].weight) and torch.equal(calibrated[4].bias, model[4].bias)


def test_in_order_the_kept_layers_are_refitted_by_default():
    model, data = head_after_conv(), images()
    default = convsep.calibrate(convsep.convert(model, rank=1), model, data)
    asked = convsep.calibrate(convsep.convert(model, rank=1), model, data, refit_kept=True)
    assert default.convsep_plan.calibration["kept"] == asked.convsep_plan.calibration["kept"]
    assert default.convsep_plan.calibration["kept"]["4"]["refitted"] is True
    assert torch.equal(default[4].weight, asked[4].weight) and not torch.equal(default[4].weight, model[4].weight)


def test_a_kept_layer_that_runs_before_every_pair_is_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.Flatten(), nn.Linear(384, 2)
    )
    model.eval()
    converted = convsep.convert(model, rank=1, exclude=["0"])
    calibrated = convsep.calibrate(converted, model, images(4, 32), refit_kept=True)
    assert set(calibrated.convsep_plan.calibration["kept"]) == {"4"}  # not "0", which sees the original's inputs
    assert torch.equal(calibrated[0].weight, model[0].weight)


class TiedHead(nn.Module):
    """A conv, two linear layers sharing one weight (tied), weight-normed ones (new and old style), a plain one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)
        self.second.weight = self.first.weight
        self.normed = nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
        with pytest.warns(FutureWarning):
            self.old_style = nn.utils.weight_norm(nn.Linear(4, 2))
        self.last = nn.Linear(2, 2)

    def forward(self, x):
        pooled = self.conv(x).mean(dim=(2, 3))
        return self.last(self.old_style(self.normed(self.second(torch.relu(self.first(pooled))))))


def test_tied_and_parametrized_layers_are_not_refitted():
    model = TiedHead().eval()
    before = copy.deepcopy(model.state_dict())
    calibrated = convsep.calibrate(convsep.convert(model, rank=1), model, images(8, 16), refit_kept=True)
    assert set(calibrated.convsep_plan.calibration["kept"]) == {"last"}  # the only plain one
    assert calibrated.convsep_plan.calibration["kept"]["last"]["refitted"] is True
    names = (
        "first.weight",
        "first.bias",
        "second.bias",
        "normed.parametrizations.weight.original0",
        "old_style.weight_v",
    )
    for name in names:
        assert torch.equal(calibrated.state_dict()[name], before[name]), name


def test_unbatched_calls_of_a_kept_conv_are_fitted_as_batches_of_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3)).eval()
    data = images(2, 4)
    batched = convsep.calibrate(convsep.convert(model, rank=1, exclude=["2"]), model, data, refit_kept=True)
    unbatched = [x for batch in data for x in batch]
    one_by_one = convsep.calibrate(convsep.convert(model, rank=1, exclude=["2"]), model, unbatched, refit_kept=True)
    assert one_by_one.convsep_plan.calibration["kept"]["2"]["refitted"] is True
    for key, value in batched.state_dict().items():
        torch.testing.assert_close(one_by_one.state_dict()[key], value, atol=1e-5, rtol=1e-4)


def test_too_few_samples_per_weight_leave_the_layer_as_it_was_with_the_reason():
    model = head_after_conv()
    calibrated = convsep.calibrate(convsep.convert(model, rank=1), model, images(count=2, size=8), refit_kept=True)
    assert calibrated.convsep_plan.calibration["kept"]["4"] == {
        "refitted": False,
        "reason": "16 samples for 25 weights per output (fewer than 4 per weight): refitting would fit the calibration "
        "data, not the layer",
    }
    assert torch.equal(calibrated[4].weight, model[4].weight)


def test_too_many_weights_per_output_leave_the_layer_as_it_was_with_the_reason(monkeypatch):
    monkeypatch.setattr(calibrate_module, "MAX_KEPT_UNKNOWNS", 24)
    model = head_after_conv()
    calibrated = convsep.calibrate(convsep.convert(model, rank=1), model, images(), refit_kept=True)
    assert calibrated.convsep_plan.calibration["kept"]["4"] == {
        "refitted": False,
        "reason": "25 weights per output (more than 24)",
    }
    assert torch.equal(calibrated[4].weight, model[4].weight)


def test_refit_kept_needs_the_ordered_fit():
    model = head_after_conv()
    with pytest.raises(convsep.ConvsepValueError) as info:
        convsep.calibrate(convsep.convert(model, rank=1), model, images(), refit_kept=True, sequential=False)
    assert str(info.value) == (
        "refit_kept=True needs sequential=True: fitted at once, every layer sees the original model's inputs, "
        "which the kept layers already fit"
    )


@pytest.mark.parametrize("value", ["yes", 1, 0.0])
def test_refit_kept_must_be_a_bool_or_none(value):
    model = head_after_conv()
    with pytest.raises(convsep.ConvsepTypeError) as info:
        convsep.calibrate(convsep.convert(model, rank=1), model, images(), refit_kept=value)
    assert str(info.value) == f"refit_kept={value!r} must be True, False or None (True in order)"


def test_convert_refits_the_kept_layers_when_asked():
    model, data = head_after_conv(), images()
    through_convert = convsep.convert(model, rank=1, calibration_data=data, calibration_refit_kept=True)
    direct = convsep.calibrate(convsep.convert(model, rank=1), model, data, refit_kept=True)
    assert through_convert.convsep_plan.calibration["kept"] == direct.convsep_plan.calibration["kept"]
    for key, value in direct.state_dict().items():
        torch.testing.assert_close(through_convert.state_dict()[key], value)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            dict(calibration_data=None),
            "calibration_refit_kept=True needs calibration_data and refit=True: it shapes the refit",
        ),
        (dict(refit=False), "calibration_refit_kept=True needs calibration_data and refit=True: it shapes the refit"),
        (dict(calibration_sequential=False), "calibration_refit_kept=True needs calibration_sequential=True"),
    ],
)
def test_convert_refuses_refit_kept_where_it_cannot_apply(arguments, message):
    arguments = {"calibration_data": images(), **arguments}
    with pytest.raises(convsep.ConvsepValueError) as info:
        convsep.convert(head_after_conv(), rank=1, calibration_refit_kept=True, **arguments)
    assert str(info.value).startswith(message)


class Bar:
    """A stand-in for the tqdm bar: what it was told to expect and how far it got."""

    def __init__(self, total, *_args, **_kwargs):
        self.total, self.n = total, 0

    def update(self, steps=1):
        self.n += steps

    def write(self, _message):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("limit, count", [(None, 8), (24, 8), (None, 2)])  # refitted, too large, too few samples
def test_the_progress_bar_counts_only_the_passes_calibration_makes(monkeypatch, limit, count):
    bars = []
    monkeypatch.setattr(calibrate_module, "progress_bar", lambda *a, **k: bars.append(Bar(*a, **k)) or bars[-1])
    if limit is not None:
        monkeypatch.setattr(calibrate_module, "MAX_KEPT_UNKNOWNS", limit)
    model = head_after_conv()
    convsep.calibrate(convsep.convert(model, rank=1), model, images(count=count, size=8), refit_kept=True)
    assert len(bars) == 1 and bars[0].total == bars[0].n >= count


class KeywordHead(nn.Module):
    """A head called with its input by keyword (`head(input=x)`), or positionally."""

    def __init__(self, keyword):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head, self.keyword = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6, 2), keyword

    def forward(self, x):
        features = self.conv(x).mean(dim=(2, 3))
        return self.head(input=features) if self.keyword else self.head(features)


def test_a_kept_layer_called_with_its_input_by_keyword_is_refitted_as_one_called_positionally():
    data = images(count=4)
    fitted = {}
    for keyword in (True, False):
        model = KeywordHead(keyword).eval()
        fitted[keyword] = convsep.calibrate(convsep.convert(model, rank=1), model, data, refit_kept=True)
    assert fitted[True].convsep_plan.calibration["kept"]["head"]["refitted"] is True
    for key, value in fitted[False].state_dict().items():
        torch.testing.assert_close(fitted[True].state_dict()[key], value)


def test_a_kept_layer_shared_with_the_original_model_is_left_as_it_is():
    """Refitting it would change the user's original model (kept layers are refitted by default)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    model.eval()
    converted = convsep.convert(model, rank=1)
    converted[4] = model[4]  # the same head in both
    before = {name: value.clone() for name, value in model.state_dict().items()}
    calibrated = convsep.calibrate(converted, model, images(64, 8))
    assert calibrated.convsep_plan.calibration["kept"] == {}
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name

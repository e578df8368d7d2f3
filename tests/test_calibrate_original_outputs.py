"""In-order calibration keeps the original's outputs for several layers at a time (model_runs.OriginalOutputs): the
same fits as running the original's prefix again for every layer, with one forward of the original per batch and
window of layers, and never more than the memory budget allows."""

import pytest
import torch
import torch.nn.functional as F
from helpers import Alternating, Shuffled
from torch import nn

import convsep
import convsep.model_runs


class Shared(nn.Module):
    """A conv called twice, an in-place ReLU right after a conv (a kept output must be a copy), a functional conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.twice = nn.Conv2d(8, 8, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.stem(x), inplace=True)
        x = self.twice(torch.relu_(self.twice(x)))
        x = F.conv2d(x, self.weight, padding=1).relu_()
        return self.head(x.mean(dim=(2, 3)))


def _data(count=4):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(6, 3, 8, 8, generator=generator) for _ in range(count)]


def _original_forwards(model):
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def _converted(monkeypatch, budget):
    """Shared and its rank-1 conversion, with at most `budget` bytes of the original's outputs kept."""
    torch.manual_seed(0)
    model = Shared().eval()
    converted = convsep.convert(model, rank=1)
    monkeypatch.setattr(convsep.model_runs, "ORIGINAL_OUTPUTS_BYTES", budget)
    return model, converted


def _calibrate(monkeypatch, budget, **kwargs):
    model, converted = _converted(monkeypatch, budget)
    forwards = _original_forwards(model)
    kwargs.setdefault("refit_kept", False)  # the pairs only, unless a test asks for the kept head too
    calibrated = convsep.calibrate(converted, model, _data(), **kwargs)
    return calibrated, len(forwards)


@pytest.mark.parametrize("kwargs", [{}, {"alternate": 1}, {"refit_kept": True}], ids=["plain", "alternate", "kept"])
def test_kept_outputs_give_the_fits_of_the_original_run_for_every_layer(monkeypatch, kwargs):
    cached, cached_forwards = _calibrate(monkeypatch, 1 << 30, **kwargs)
    streamed, streamed_forwards = _calibrate(monkeypatch, 0, **kwargs)
    layers = 3 + ("refit_kept" in kwargs)  # stem, twice, the functional conv (and the head)
    assert len(cached.convsep_plan.converted) == 3
    assert cached_forwards == 4 and streamed_forwards == 4 * layers  # 4 batches: one window, or one per layer
    for name, value in cached.state_dict().items():
        assert torch.equal(value, streamed.state_dict()[name]), name
    assert cached.convsep_plan.calibration == streamed.convsep_plan.calibration


# Each conv's outputs: 4 batches x 6 x 8 x 8 x 8 floats = 49,152 bytes (the twice-called one, twice that). With room
# for three of those: a window of stem and twice, then one of the functional conv. With room for one: stem alone,
# then twice streamed (after one batch showed it does not fit: 1 + 4 forwards), then the functional conv.
@pytest.mark.parametrize("budget, forwards", [(3 * 49_152, 4 + 4), (49_152, 4 + 1 + 4 + 4)])
def test_a_window_holds_as_many_layers_as_the_budget_allows(monkeypatch, budget, forwards):
    windowed, every_layer = _calibrate(monkeypatch, budget), _calibrate(monkeypatch, 1 << 30)
    assert every_layer[1] == 4 and windowed[1] == forwards
    for name, value in windowed[0].state_dict().items():
        assert torch.equal(value, every_layer[0].state_dict()[name]), name


def test_a_layer_whose_outputs_alone_exceed_the_budget_is_streamed():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)).eval()
    data = _data()
    outputs = convsep.model_runs.OriginalOutputs(model, [(model[0], 1)], data, lambda *_: None, 1000)
    outputs.begin(0, "0")
    assert outputs.current is None
    streamed = outputs.outputs(1, data[0], "batch 1")
    with torch.no_grad():
        assert len(streamed) == 1 and torch.equal(streamed[0][0], model(data[0]))


def test_a_window_stops_keeping_outputs_within_the_first_batch_once_the_budget_is_reached():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(6)]).eval()
    data = [torch.randn(2, 8, 4, 4) for _ in range(4)]  # each conv's outputs: 4 x 2 x 8 x 4 x 4 floats = 4,096 bytes
    kept = []
    order = [(conv, 1) for conv in model]
    outputs = convsep.model_runs.OriginalOutputs(model, order, data, lambda position, *_: kept.append(position), 8192)
    outputs.begin(0, "0")
    assert sorted(kept) == [0] * 4 + [1] * 4  # two layers' outputs, projected over the 4 batches, from the first
    assert outputs.end == 2 and len(outputs.current) == 4


def test_data_that_comes_in_another_order_on_each_pass_is_fitted_as_in_a_fixed_order():
    torch.manual_seed(0)
    model = Shared().eval()
    fixed = convsep.calibrate(convsep.convert(model, rank=1), model, _data(), refit_kept=True)
    shuffled = convsep.calibrate(convsep.convert(model, rank=1), model, Shuffled(_data()), refit_kept=True)
    for name, value in fixed.state_dict().items():  # the same sums, added in another order
        torch.testing.assert_close(shuffled.state_dict()[name], value, rtol=1e-4, atol=1e-5)


class Flipping(Shuffled):
    """The same batches, mirrored left to right on every other pass (a random flip, the common augmentation, keeps
    each batch's plain sum)."""

    def __iter__(self):
        self.passes += 1
        return iter(self.batches if self.passes % 2 else [x.flip(-1) for x in self.batches])


def test_a_batch_mirrored_on_another_pass_is_told_apart(caplog):
    torch.manual_seed(0)
    model = Shared().eval()
    with caplog.at_level("INFO", logger="convsep.model_runs"):
        convsep.calibrate(convsep.convert(model, rank=1), model, Flipping(_data()))
    said = [r.getMessage() for r in caplog.records if r.name == "convsep.model_runs"]
    assert len(said) == 1 and "the data gave other batches than on the pass before (shuffled?)" in said[0]


def test_a_pair_that_cannot_run_on_the_original_layers_input_is_named(monkeypatch):
    torch.manual_seed(0)
    model = Shared().eval()
    converted = convsep.convert(model, rank=1)

    (functional,) = [d for d in converted.convsep_plan.converted if d.kind.startswith("F.")]
    pair, calls = converted.get_submodule(functional.module), []
    working = pair.forward

    def broken(x):  # runs in the pass that finds the layers' order, then fails
        calls.append(x.shape)
        if len(calls) > 1:
            raise RuntimeError("expected all tensors to be on the same device")
        return working(x)

    # The last layer, called once: after that first pass, only its initial error runs it (the fits stop before it).
    monkeypatch.setattr(pair, "forward", broken)
    with pytest.raises(convsep.ConvsepValueError) as info:
        convsep.calibrate(converted, model, _data())
    assert str(info.value).startswith(
        "layer 'weight': its pair cannot run on the original layer's input (6, 8, 8, 8): RuntimeError: expected all"
    )


def test_on_a_gpu_the_outputs_kept_are_at_most_a_quarter_of_its_free_memory(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(device) or (4_000_001, 16 << 20))
    budget = convsep.model_runs.outputs_budget(torch.device("cuda", 1))
    assert budget == 1_000_000 and isinstance(budget, int) and asked == [torch.device("cuda", 1)]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 40, 1 << 41))
    assert convsep.model_runs.outputs_budget(torch.device("cuda", 0)) == convsep.model_runs.ORIGINAL_OUTPUTS_BYTES
    assert convsep.model_runs.outputs_budget(torch.device("cpu")) == convsep.model_runs.ORIGINAL_OUTPUTS_BYTES


@pytest.mark.parametrize("budget", [1 << 30, 0], ids=["kept", "streamed"])
def test_the_original_runs_only_as_far_as_the_layers_being_fitted(monkeypatch, budget):
    model, converted = _converted(monkeypatch, budget)
    heads = []
    model.head.register_forward_pre_hook(lambda *_: heads.append(1))
    convsep.calibrate(converted, model, _data(), refit_kept=False)  # (refitting the head needs its outputs)
    assert heads == []  # the head runs after the last pair: no forward of the original gets there


@pytest.mark.parametrize("budget", [1 << 30, 0], ids=["kept", "streamed"])
def test_a_batch_the_original_cannot_take_is_named_with_the_layer_being_fitted(monkeypatch, budget):
    model, converted = _converted(monkeypatch, budget)
    data = _data()
    data[1] = torch.randn(6, 5, 8, 8)  # five channels for a stem that takes three
    with pytest.raises(convsep.InputShapeError) as info:
        convsep.calibrate(converted, model, data)
    assert str(info.value).startswith("calibration batch 2 (calibrating 'stem'): the original model cannot run on")


def test_data_that_changes_between_passes_is_said_once_and_streamed_from_then_on(caplog):
    torch.manual_seed(0)
    model = Shared().eval()
    converted = convsep.convert(model, rank=1)
    forwards = _original_forwards(model)
    with caplog.at_level("INFO", logger="convsep.model_runs"):
        convsep.calibrate(converted, model, Alternating(_data()), refit_kept=False)
    said = [r.getMessage() for r in caplog.records if r.name == "convsep.model_runs"]
    assert len(said) == 1 and said[0] == (
        "calibration batch 1 (calibrating 'stem'): the data gave other batches than on the pass before (shuffled?): "
        "the original's outputs are computed layer by layer from here on"
    )
    # Pass 1 finds the order, pass 2 gathers the three layers (4 forwards), pass 3 (reversed) misses at batch 1:
    # stem streams its 4 batches, and so do the two layers after it, with no window tried again.
    assert len(forwards) == 4 + 4 + 4 + 4


def test_a_window_cut_between_two_calls_of_a_shared_layer_still_gets_both():
    class AroundOthers(nn.Module):
        """conv1 runs, then conv2 and conv3, then conv1 again: cutting the window at conv2 leaves a call to come."""

        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
            self.conv3 = nn.Conv2d(16, 8, 3, padding=1)

        def forward(self, x):
            return self.conv1(self.conv3(self.conv2(self.conv1(x))))

    torch.manual_seed(0)
    model = AroundOthers().eval()
    data = [torch.randn(6, 8, 8, 8) for _ in range(4)]  # conv1's outputs: 49,152 bytes per call, conv2's twice that
    fitted = {}
    for budget in (100_000, 0):  # conv1's two calls fit, conv2 does not; nothing kept
        converted = convsep.convert(model, rank=1)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(convsep.model_runs, "ORIGINAL_OUTPUTS_BYTES", budget)
            fitted[budget] = convsep.calibrate(converted, model, data).state_dict()
    for name, value in fitted[0].items():
        assert torch.equal(fitted[100_000][name], value), name


class Batches:
    """Re-iterable batches with a length and nothing else (no `count`)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def _walk(model, order, data, budget):
    """Every layer of `order` through OriginalOutputs, as calibration does: (original forwards, bytes kept at most)."""
    forwards, kept = [], []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    outputs = convsep.model_runs.OriginalOutputs(model, order, data, lambda *_: None, budget)
    for position in range(len(order)):
        outputs.begin(position, str(position))
        held = [outputs.current] + list(outputs.cached.values())
        kept.append(sum(y.numel() * y.element_size() for layer in held if layer for _, seen in layer for y, _ in seen))
        for index, x in enumerate(data, 1):
            outputs.outputs(index, x, f"batch {index}")
    return len(forwards), max(kept)


def test_after_a_layer_too_large_to_keep_the_next_window_starts_right_after_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 64, 3, padding=1), nn.Conv2d(64, 8, 3, padding=1),
                          *[nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)]).eval()  # fmt: skip
    data = Batches(
        [torch.randn(2, 8, 4, 4) for _ in range(4)]
    )  # 8 channels: 4,096 bytes over the 4 batches; 64: 32,768
    with torch.no_grad():
        forwards, kept = _walk(model, [(conv, 1) for conv in model], data, 16_384)
    # conv 0 alone (4); conv 1 tried (1) and streamed (4); convs 2-5 in one window (4)
    assert forwards == 4 + 1 + 4 + 4 and kept <= 16_384


def test_a_window_shrinks_when_later_batches_are_larger_than_the_first():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(6)]).eval()
    data = [torch.randn(n, 8, 4, 4) for n in (1,) * 7 + (5,)]  # the first batch promises 8 x 512 bytes per layer
    with torch.no_grad():
        forwards, kept = _walk(model, [(conv, 1) for conv in model], data, 8_192)
    # 6,144 bytes per layer in all: one layer at a time, not the two the first batch allowed
    assert kept <= 8_192 and forwards == 6 * 8

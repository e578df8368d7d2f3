"""Models as they come from hubs: 1-d audio encoders, weight-normed convs, forwards that read conv
attributes, and the compiled forms (TorchScript, torch.export) convsep cannot rewrite."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import convsep
from audio_zoo import ELIGIBLE, HUB_ARCHITECTURES, EncodecEncoder, Wav2Vec2Encoder, old_weight_norm
from convsep.cli import main
from convsep.layers import _SeparableConvNd
from helpers import assert_bitwise_equal, relative_error, snapshot

KEPT_BY_DESIGN = ("kernel has 1 element (already pointwise)", "already depthwise")


@pytest.fixture(params=sorted(HUB_ARCHITECTURES))
def hub_model(request):
    """(name, model in float64 and eval mode, example input), seeded."""
    torch.manual_seed(0)
    factory, shape = HUB_ARCHITECTURES[request.param]
    return request.param, factory().double().eval(), torch.randn(shape, dtype=torch.float64)


def test_hub_model_matches_at_full_rank_runs_at_rank_one_and_is_left_alone(hub_model):
    name, model, x = hub_model
    before = snapshot(model)
    with torch.no_grad():
        expected = model(x)
    exact = convsep.convert(model, rank="full")
    lean = convsep.convert(model, rank=1)
    with torch.no_grad():
        assert relative_error(exact(x), expected) < 1e-4, name
        assert lean(x).shape == expected.shape and torch.isfinite(lean(x)).all()
    assert_bitwise_equal(before, model)


def test_every_eligible_conv_of_a_hub_model_is_replaced(hub_model):
    name, model, _ = hub_model
    plan = convsep.convert(model, rank=1).convsep_plan
    assert len(plan.converted) == ELIGIBLE[name], plan.summary()
    assert all(layer.reason.startswith(KEPT_BY_DESIGN) for layer in plan.skipped), plan.summary()


def test_whisper_forward_reads_the_pair_stride():
    model = HUB_ARCHITECTURES["whisper"][0]().eval()
    converted = convsep.convert(model, rank=1)
    assert isinstance(converted.conv1, _SeparableConvNd) and converted.conv2.stride == (2,)
    converted(torch.randn(1, 8, 16))  # raised AttributeError: no attribute 'stride'


@pytest.mark.parametrize("old_style", [False, True], ids=["parametrizations", "hooks"])
def test_weight_normed_convs_fold_and_the_plan_says_so(old_style):
    torch.manual_seed(0)
    model = EncodecEncoder(old_style=old_style).double().eval()
    plan = convsep.convert(model, rank="full").convsep_plan
    assert {layer.folded for layer in plan.converted} == {"weight_norm"}
    assert "folded into their pairs, not carried over" in plan.summary()
    assert plan.parametrized == "fold"


def test_old_style_weight_norm_converts_from_its_parameters_not_a_stale_weight():
    # The hook keeps the weight it computed last as a plain attribute; changing g without a forward leaves it stale.
    torch.manual_seed(0)
    model = nn.Sequential(old_weight_norm(nn.Conv1d(3, 6, 3))).double().eval()
    with torch.no_grad():
        model[0].weight_g.mul_(2)
    x = torch.randn(2, 3, 9, dtype=torch.float64)
    converted = convsep.convert(model, rank="full")
    with torch.no_grad():
        assert relative_error(converted(x), model(x)) < 1e-10


@pytest.mark.parametrize("old_style", [False, True], ids=["parametrizations", "hooks"])
def test_spectral_norm_folds_at_its_current_value_without_a_power_iteration(old_style):
    torch.manual_seed(0)
    norm = nn.utils.spectral_norm if old_style else parametrizations.spectral_norm
    model = nn.Sequential(norm(nn.Conv1d(4, 6, 3)), nn.ReLU(), nn.Conv1d(6, 6, 3)).double()
    model.train()  # a read of the weight in train mode would run a power iteration and move u, v
    before = snapshot(model)
    converted = convsep.convert(model, rank="full")
    assert_bitwise_equal(before, model)
    assert converted.convsep_plan.layers[0].folded == "spectral_norm"
    x = torch.randn(2, 4, 9, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(converted.eval()(x), model.eval()(x)) < 1e-10


def test_parametrized_keep_leaves_weight_normed_convs_as_they_are():
    model = EncodecEncoder()
    converted = convsep.convert(model, rank=1, parametrized="keep")
    plan = converted.convsep_plan
    assert not plan.converted and plan.parametrized == "keep"
    assert any("kept as it is by parametrized='keep'" in layer.reason for layer in plan.skipped)
    assert nn.utils.parametrize.is_parametrized(converted.layers[0])


def test_unknown_parametrized_setting_is_refused():
    with pytest.raises(ValueError, match="parametrized='drop'"):
        convsep.convert(EncodecEncoder(), parametrized="drop")


def test_from_conv_folds_a_weight_normed_conv():
    torch.manual_seed(0)
    conv = parametrizations.weight_norm(nn.Conv1d(4, 6, 3, padding=1)).double()
    pair = convsep.SeparableConv1d.from_conv(conv, rank="full")
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(pair(x), conv(x)) < 1e-10
    assert pair.depthwise.weight.requires_grad  # weight_g / weight_v train, so the pair does


@pytest.mark.parametrize("factory", [EncodecEncoder, lambda: EncodecEncoder(old_style=True), Wav2Vec2Encoder])
def test_weight_normed_checkpoint_loads_back_into_a_fresh_weight_normed_model(factory, tmp_path):
    torch.manual_seed(0)
    model = factory().eval()
    converted = convsep.convert(model, rank=2)
    convsep.save(converted, tmp_path / "sep.pt")
    loaded = convsep.load(tmp_path / "sep.pt", model=factory())
    assert loaded.convsep_plan.to_dict() == converted.convsep_plan.to_dict()
    x = torch.randn(HUB_ARCHITECTURES["wav2vec2" if factory is Wav2Vec2Encoder else "encodec"][1])
    with torch.no_grad():
        assert torch.equal(loaded(x), converted(x))


def test_calibration_finds_the_calls_of_weight_normed_convs():
    torch.manual_seed(0)
    model = EncodecEncoder().eval()
    data = [torch.randn(4, 1, 64) for _ in range(2)]
    converted = convsep.convert(model, rank=1, calibration_data=data)
    errors = converted.convsep_plan.calibration["layers"]
    assert len(errors) == ELIGIBLE["encodec"]
    assert all(e["after"] <= e["before"] + 1e-6 for e in errors.values())


def test_report_on_a_weight_normed_model_uses_the_effective_weight():
    torch.manual_seed(0)
    model = EncodecEncoder().double().eval()
    converted = convsep.convert(model, rank="full")
    rows = convsep.report(model, converted, torch.randn(1, 1, 64, dtype=torch.float64)).rows
    errors = [row["weight_error"] for row in rows if row["weight_error"] is not None]
    assert len(errors) == ELIGIBLE["encodec"] and max(errors) < 1e-10


def test_cli_parametrized_keep(tmp_path):
    torch.save(EncodecEncoder().state_dict(), tmp_path / "codec.pt")
    argv = ["convert", str(tmp_path / "codec.pt"), "--model", "audio_zoo:EncodecEncoder"]
    assert main([*argv, "-o", str(tmp_path / "keep.pt"), "--parametrized", "keep"]) == 0
    assert not convsep.load(tmp_path / "keep.pt").plan.converted
    assert main([*argv, "-o", str(tmp_path / "fold.pt")]) == 0
    assert len(convsep.load(tmp_path / "fold.pt").plan.converted) == ELIGIBLE["encodec"]


# --- compiled models: one clear error ------------------------------------------------------


def _small():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()


@pytest.mark.parametrize(
    "compiled",
    [
        lambda: torch.jit.script(_small()),
        lambda: torch.jit.trace(_small(), torch.randn(1, 3, 8, 8)),
    ],
    ids=["script", "trace"],
)
def test_torchscript_module_is_refused_with_the_way_to_the_eager_model(compiled):
    model = compiled()
    for call in (lambda: convsep.convert(model), lambda: convsep.report(model, model, torch.randn(1, 3, 8, 8))):
        with pytest.raises(convsep.ConvsepTypeError, match=r"TorchScript module .*needs the eager nn.Module.*state_dict"):
            call()


def test_exported_program_and_its_module_are_refused():
    exported = torch.export.export(_small(), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(convsep.ConvsepTypeError, match=r"ExportedProgram: convsep needs the eager nn.Module"):
        convsep.convert(exported)
    with pytest.raises(convsep.ConvsepTypeError, match=r"graph of aten ops .*no conv modules"):
        convsep.convert(exported.module())


def test_calibrate_and_load_refuse_a_torchscript_model(tmp_path):
    converted = convsep.convert(_small())
    scripted = torch.jit.script(_small())
    with pytest.raises(convsep.ConvsepTypeError, match="original is a TorchScript module"):
        convsep.calibrate(converted, scripted, [torch.randn(1, 3, 8, 8)])
    convsep.save(converted, tmp_path / "sep.pt")
    with pytest.raises(convsep.ConvsepTypeError, match="TorchScript module"):
        convsep.load(tmp_path / "sep.pt", model=scripted)


@pytest.mark.parametrize("kind", ["torchscript", "export"])
def test_cli_on_a_compiled_archive_says_it_needs_the_eager_model(kind, tmp_path, capsys):
    path = tmp_path / "model.pt"
    if kind == "torchscript":
        torch.jit.save(torch.jit.script(_small()), str(path))
    else:
        torch.export.save(torch.export.export(_small(), (torch.randn(1, 3, 8, 8),)), str(path))
    assert main(["convert", str(path), "-o", str(tmp_path / "out.pt"), "--trust-pickle"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("convsep: error:")
    assert "needs the eager nn.Module" in err[0] and "state_dict" in err[0]
    assert not (tmp_path / "out.pt").exists()

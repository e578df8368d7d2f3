import copy
import math
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_bitwise_equal, relative_error, snapshot
from torch import nn
from zoo import ARCHITECTURES, FunctionalConvNet, MixedDimsNet, SharedConvNet

import convsep
from convsep import least_squares
from convsep.models import small_cnn


@pytest.fixture
def one_thread():
    """Training in a test: one thread is much faster than two when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gratings(n, generator, size=16):
    """Noisy oriented gratings, 4 classes by orientation: a task a small CNN learns in a second."""
    labels = torch.randint(0, 4, (n,), generator=generator)
    angle = labels * math.pi / 4 + 0.2 * torch.randn(n, generator=generator)
    phase = 2 * math.pi * torch.rand(n, generator=generator)
    frequency = 0.6 + 0.4 * torch.rand(n, generator=generator)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    along = xs * torch.cos(angle)[:, None, None] + ys * torch.sin(angle)[:, None, None]
    wave = torch.cos(frequency[:, None, None] * along + phase[:, None, None])
    return (wave + 0.5 * torch.randn(n, size, size, generator=generator)).unsqueeze(1), labels


def test_calibration_lowers_the_held_out_output_error_of_a_trained_model(one_thread):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x, y = gratings(1024, generator)
    held_out, _ = gratings(256, generator)
    model = small_cnn(num_classes=4, width=8)
    optimiser = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(40):
        batch = torch.randint(0, len(x), (64,), generator=generator)
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    before = snapshot(model)
    data = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 512, 128)]  # labels are ignored

    svd = convsep.convert(model, rank=1)
    calibrated = convsep.calibrate(copy.deepcopy(svd), model, data)
    alternated = convsep.calibrate(copy.deepcopy(svd), model, data, alternate=2)
    with torch.no_grad():
        expected = model(held_out)
        svd_error = relative_error(svd(held_out), expected)
        calibrated_error = relative_error(calibrated(held_out), expected)
        alternated_error = relative_error(alternated(held_out), expected)
    assert calibrated_error < 0.8 * svd_error
    assert alternated_error < calibrated_error
    assert_bitwise_equal(before, model)
    for name, errors in calibrated.convsep_plan.calibration["layers"].items():
        assert errors["after"] <= errors["before"] + 1e-9, name
        assert alternated.convsep_plan.calibration["layers"][name]["after"] <= errors["after"] + 1e-9, name


def single_conv_model(groups, bias, rank):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=groups, bias=bias)).eval()
    with torch.no_grad():
        model[0].weight.normal_()
    return model, convsep.convert(model, rank=rank)


@pytest.mark.parametrize("groups, bias", [(1, True), (2, True), (2, False)])
def test_pointwise_refit_is_the_least_squares_solution(groups, bias):
    model, converted = single_conv_model(groups, bias, rank=1)
    # Inputs with structure (correlated channels), so that the data-aware fit differs from the SVD.
    x = torch.randn(8, 2, 7, 7).repeat_interleave(2, dim=1) + 0.3 * torch.randn(8, 4, 7, 7)
    pair = converted[0]
    with torch.no_grad():
        depthwise = pair.depthwise(x)
        target = model(x)
    convsep.calibrate(converted, model, [x[:4], x[4:]], ridge=0.0)
    per_group_in, per_group_out = depthwise.shape[1] // groups, 6 // groups
    for g in range(groups):
        features = depthwise[:, g * per_group_in : (g + 1) * per_group_in].permute(0, 2, 3, 1).reshape(-1, per_group_in)
        wanted = target[:, g * per_group_out : (g + 1) * per_group_out].permute(0, 2, 3, 1).reshape(-1, per_group_out)
        if bias:
            features = torch.cat([features, torch.ones(len(features), 1)], dim=1)
        solution = torch.linalg.lstsq(features.double(), wanted.double()).solution.float()
        rows = slice(g * per_group_out, (g + 1) * per_group_out)
        torch.testing.assert_close(pair.pointwise.weight[rows, :, 0, 0], solution[:per_group_in].T, rtol=1e-4, atol=1e-4)
        if bias:
            torch.testing.assert_close(pair.pointwise.bias[rows], solution[-1], rtol=1e-4, atol=1e-4)


def test_depthwise_refit_is_the_least_squares_solution_given_the_pointwise_weights():
    model, converted = single_conv_model(groups=2, bias=True, rank=2)
    x = torch.randn(6, 4, 6, 6)
    pair = converted[0]
    convsep.calibrate(converted, model, [x], ridge=0.0)  # pointwise refit: now P and bias are fixed
    fitted_pointwise, fitted_bias = pair.pointwise.weight.detach().clone(), pair.pointwise.bias.detach().clone()
    with torch.no_grad():
        target = model(x)

    def output_of(depthwise_weight):
        hidden = F.conv2d(x, depthwise_weight, None, padding=1, groups=4)
        return F.conv2d(hidden, fitted_pointwise, fitted_bias, groups=2)

    # The output is affine in the depthwise weights: one column of the design matrix per weight.
    start = pair.depthwise.weight.detach().clone()
    with torch.no_grad():
        offset = output_of(torch.zeros_like(start)).reshape(-1)
        basis = torch.eye(start.numel()).reshape(-1, *start.shape)
        jacobian = torch.stack([output_of(unit).reshape(-1) - offset for unit in basis], dim=1)
    expected = torch.linalg.lstsq(jacobian.double(), (target.reshape(-1) - offset).double().unsqueeze(1)).solution

    from convsep.least_squares import LayerStats, _refit_depthwise
    from convsep.model_runs import pair_inputs as _pair_inputs
    from convsep.probe import eval_mode

    stats = LayerStats(pair, patches=True)
    with eval_mode(converted), torch.no_grad():
        stats.add(_pair_inputs(converted, pair, x, 1, "test batch")[0], target, "0")
    _refit_depthwise(pair, stats, ridge=0.0)
    torch.testing.assert_close(pair.depthwise.weight.reshape(-1).double(), expected.reshape(-1), rtol=1e-4, atol=1e-4)


def test_each_layer_is_fitted_on_the_converted_models_own_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(16, 3, 8, 8)
    converted = convsep.calibrate(convsep.convert(model, rank=1), model, [x], ridge=0.0)
    with torch.no_grad():
        # The second pair's inputs come from the calibrated first pair; its targets from the original.
        hidden = converted[1](converted[0](x))
        features = converted[2].depthwise(hidden).permute(0, 2, 3, 1).reshape(-1, 8)
        target = model(x).permute(0, 2, 3, 1).reshape(-1, 8)
    design = torch.cat([features, torch.ones(len(features), 1)], dim=1).double()
    solution = torch.linalg.lstsq(design, target.double()).solution.float()
    torch.testing.assert_close(converted[2].pointwise.weight[:, :, 0, 0], solution[:8].T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("name", ["small_cnn", "functional", "nested_functional", "shared", "untraceable", "subclass", "mixed_dims"])
def test_full_rank_stays_exact(name, sequential):
    torch.manual_seed(0)
    factory, shape = ARCHITECTURES[name]
    model, x = factory().eval(), torch.randn(shape)
    converted = convsep.convert(model, rank="full")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convsep.calibrate(converted, model, [x, x * 0.5], alternate=1, sequential=sequential)
    assert set(converted.convsep_plan.calibration["layers"]) == {d.name for d in converted.convsep_plan.converted}
    with torch.no_grad():
        assert relative_error(converted(x), model(x)) < 1e-4, name


@pytest.mark.parametrize("factory, shape", [(FunctionalConvNet, (4, 3, 12, 12)), (SharedConvNet, (4, 4, 10, 10)), (MixedDimsNet, (4, 4, 144))])
def test_odd_models_calibrate_and_improve(factory, shape):
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(*shape)
    converted = convsep.convert(model, rank=1)
    with torch.no_grad():
        before = relative_error(converted(x), model(x))
    convsep.calibrate(converted, model, [x], alternate=1)
    with torch.no_grad():
        assert relative_error(converted(x), model(x)) < before


def test_original_is_untouched_and_modes_are_restored():
    torch.manual_seed(0)
    model = small_cnn(width=4).train()
    converted = convsep.convert(model, rank=1)
    state, converted_modes = snapshot(model), [m.training for m in converted.modules()]
    result = convsep.calibrate(converted, model, [torch.randn(4, 1, 12, 12)])
    assert result is converted
    assert_bitwise_equal(state, model)  # BatchNorm running statistics too
    assert all(m.training for m in model.modules())
    assert [m.training for m in converted.modules()] == converted_modes


def test_convert_with_calibration_data_calibrates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    data = [torch.randn(4, 3, 10, 10) for _ in range(3)]
    one_step = convsep.convert(model, rank=1, calibration_data=data, calibration_batches=2)
    two_steps = convsep.calibrate(convsep.convert(model, rank=1), model, data, batches=2)
    assert one_step.convsep_plan.calibration["batches"] == 2
    for key, value in two_steps.state_dict().items():
        torch.testing.assert_close(one_step.state_dict()[key], value)
    all_batches = convsep.calibrate(convsep.convert(model, rank=1), model, data)
    inplace = convsep.convert(model, rank=1, calibration_data=data, inplace=True)  # calibrated against a copy
    assert inplace is model
    for key, value in all_batches.state_dict().items():
        torch.testing.assert_close(inplace.state_dict()[key], value)


def test_generator_data_is_read_once_and_reused_for_every_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)).eval()
    batches = (torch.randn(2, 3, 9, 9) for _ in range(5))
    converted = convsep.calibrate(convsep.convert(model, rank=1), model, batches, batches=3)
    calibration = converted.convsep_plan.calibration
    assert calibration["batches"] == 3 and calibration["samples"] == 6
    assert set(calibration["layers"]) == {"0", "1"}


def test_verbose_prints_each_layer(capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)).eval()
    convsep.calibrate(convsep.convert(model, rank=1), model, [torch.randn(2, 3, 9, 9)], verbose=True)
    printed = capsys.readouterr().out
    assert "calibrated 0: relative output error" in printed and "calibrated 1:" in printed
    convsep.calibrate(convsep.convert(model, rank=1), model, [torch.randn(2, 3, 9, 9)])
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "data, kwargs, error, match",
    [
        ([], {}, ValueError, "yielded no batches"),
        (iter([]), {}, ValueError, "yielded no batches"),
        ([torch.randn(2, 5, 9, 9)], {}, convsep.InputShapeError, r"calibration batch 1.*\(2, 5, 9, 9\)"),
        (
            [torch.randn(2, 3, 9, 9), torch.randn(2, 3, 9)], {}, convsep.InputShapeError,
            r"calibration batch 2 \(calibrating '0'\).*\(2, 3, 9\)",
        ),  # fmt: skip
        (torch.randn(2, 3, 9, 9), {}, TypeError, "single tensor"),
        (5, {}, TypeError, "int"),
        ([{"x": 1}], {}, TypeError, "calibration batch 1: .*got dict"),
        ([torch.randn(2, 3, 9, 9), ()], {}, TypeError, "calibration batch 2: .*got an empty tuple"),
        ([torch.randn(2, 3, 9, 9)], {"ridge": -1.0}, ValueError, "ridge=-1.0"),
        ([torch.randn(2, 3, 9, 9)], {"alternate": -1}, ValueError, "alternate=-1"),
        ([torch.randn(2, 3, 9, 9)], {"batches": 0}, ValueError, "batches=0"),
        ([torch.randn(2, 3, 9, 9)], {"device": "tpu9"}, ValueError, "device='tpu9' is not a device"),
    ],
)
def test_bad_calibration_input_is_refused_clearly(data, kwargs, error, match):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)).eval()
    converted = convsep.convert(model, rank=1)
    with pytest.raises(error, match=match) as info:
        convsep.calibrate(converted, model, data, **kwargs)
    assert isinstance(info.value, convsep.ConvsepError)


def test_models_that_do_not_fit_together_are_refused():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)).eval()
    converted = convsep.convert(model, rank=1)
    data = [torch.randn(2, 3, 9, 9)]
    with pytest.raises(ValueError, match="no conversion plan"):
        convsep.calibrate(model, copy.deepcopy(model), data)
    with pytest.raises(ValueError, match="same model"):
        convsep.calibrate(converted, converted, data)
    with pytest.raises(ValueError, match="original has no convolution '1'"):
        convsep.calibrate(converted, nn.Sequential(nn.Conv2d(3, 8, 3)), data)
    with pytest.raises(TypeError, match="original must be"):
        convsep.calibrate(converted, "model", data)


@pytest.mark.parametrize("has_tqdm", [True, False])
def test_progress_bar_on_a_terminal_and_silent_fallback_without_tqdm(monkeypatch, capsys, has_tqdm):
    if not has_tqdm:
        monkeypatch.setitem(sys.modules, "tqdm", None)
        monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    else:
        pytest.importorskip("tqdm")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)).eval()
    convsep.calibrate(convsep.convert(model, rank=1), model, [torch.randn(2, 3, 9, 9)] * 3, verbose=True)
    captured = capsys.readouterr()
    assert "calibrated 1:" in captured.out
    assert ("calibrating" in captured.err) == has_tqdm


def test_non_finite_data_stops_calibration_with_a_clear_error_and_no_nan_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    converted = convsep.convert(model, rank=1)
    data = [torch.randn(2, 3, 8, 8), torch.full((2, 3, 8, 8), float("inf"))]
    with pytest.raises(convsep.ConvsepValueError, match="calibrating '0': .* NaN or inf"):
        convsep.calibrate(converted, model, data)
    assert all(bool(torch.isfinite(p).all()) for p in converted.parameters())


def correlated_inputs(n=8):
    """Inputs with structure (correlated channels), so that the data-aware fit differs from the SVD."""
    torch.manual_seed(1)
    return torch.randn(n, 2, 7, 7).repeat_interleave(2, dim=1) + 0.3 * torch.randn(n, 4, 7, 7)


def test_huge_ridge_keeps_the_svd_init():
    model, converted = single_conv_model(groups=1, bias=True, rank=1)
    init = snapshot(converted)
    convsep.calibrate(converted, model, [correlated_inputs()], ridge=1e9)
    for key, value in init.items():
        torch.testing.assert_close(converted.state_dict()[key], value, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("groups", [1, 2])
def test_pointwise_refit_with_ridge_is_the_closed_form_solve(groups):
    model, converted = single_conv_model(groups=groups, bias=True, rank=1)
    # The second group's inputs 10x larger: each group's ridge follows its own Gram matrix.
    pair, x, ridge = converted[0], correlated_inputs() * torch.tensor([1.0, 1.0, 10.0, 10.0]).reshape(1, 4, 1, 1), 0.5
    with torch.no_grad():
        hidden, target = pair.depthwise(x).double(), model(x).double()
    convsep.calibrate(converted, model, [x], ridge=ridge)
    inputs, outputs = 4 // groups, 6 // groups
    for g in range(groups):
        features = hidden[:, g * inputs : (g + 1) * inputs].permute(0, 2, 3, 1).reshape(-1, inputs)
        wanted = target[:, g * outputs : (g + 1) * outputs].permute(0, 2, 3, 1).reshape(-1, outputs)
        features = torch.cat([features, torch.ones(len(features), 1, dtype=torch.float64)], dim=1)
        rows = slice(g * outputs, (g + 1) * outputs)
        init = convsep.convert(model, rank=1)[0]  # the SVD init the ridge pulls towards
        current = torch.cat([init.pointwise.weight[rows, :, 0, 0].T, init.pointwise.bias[None, rows]]).detach().double()
        gram = features.T @ features
        lam = ridge * gram[:inputs, :inputs].diagonal().mean()  # relative to the mean diagonal of the weights' block
        eye = torch.eye(inputs + 1, dtype=torch.float64)
        expected = torch.linalg.solve(gram + lam * eye, features.T @ wanted + lam * current)
        torch.testing.assert_close(pair.pointwise.weight[rows, :, 0, 0].double(), expected[:inputs].T, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pair.pointwise.bias[rows].double(), expected[inputs], rtol=1e-5, atol=1e-6)


def test_a_system_cholesky_cannot_factor_is_still_solved():
    # Group 0 positive definite, group 1 indefinite (as rounding can leave a nearly singular Gram matrix):
    # Cholesky fails on one group, and every group is still solved exactly.
    a = torch.tensor([[[4.0, 1.0], [1.0, 3.0]], [[1.0, 2.0], [2.0, 1.0]]], dtype=torch.float64)
    b = torch.tensor([[[1.0], [2.0]], [[3.0], [-1.0]]], dtype=torch.float64)
    solution = least_squares._ridge_solve(a, b, torch.zeros_like(b), ridge=0.0, width=2)
    torch.testing.assert_close(a @ solution, b, rtol=1e-9, atol=1e-9)


def test_ridge_zero_is_plain_least_squares_even_for_tiny_activations():
    model, converted = single_conv_model(groups=1, bias=False, rank=1)
    x = 1e-5 * correlated_inputs()
    with torch.no_grad():
        features = converted[0].depthwise(x).permute(0, 2, 3, 1).reshape(-1, 4).double()
        wanted = model(x).permute(0, 2, 3, 1).reshape(-1, 6).double()
    convsep.calibrate(converted, model, [x], ridge=0.0)
    expected = torch.linalg.lstsq(features, wanted).solution
    torch.testing.assert_close(converted[0].pointwise.weight[:, :, 0, 0].double(), expected.T, rtol=1e-4, atol=1e-6)


def test_ridge_is_relative_so_scaling_the_inputs_leaves_the_fit_unchanged():
    model, converted = single_conv_model(groups=2, bias=False, rank=1)
    small = convsep.calibrate(copy.deepcopy(converted), model, [1e-3 * correlated_inputs()], ridge=0.5)
    large = convsep.calibrate(copy.deepcopy(converted), model, [1e3 * correlated_inputs()], ridge=0.5)
    assert relative_error(small[0].pointwise.weight, converted[0].pointwise.weight) > 1e-2  # the ridge did not freeze it
    torch.testing.assert_close(small[0].pointwise.weight, large[0].pointwise.weight, rtol=1e-5, atol=1e-6)

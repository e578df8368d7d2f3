"""The converted model is an ordinary nn.Module: torch.compile, torch.export and ONNX take it."""

import pytest
import torch

import convsep
from convsep.models import small_cnn
from helpers import relative_error
from zoo import FunctionalConvNet


def _converted(factory=lambda: small_cnn(width=8), rank="full"):
    torch.manual_seed(0)
    model = factory().eval()
    return model, convsep.convert(model, rank=rank)


def test_torch_compile_runs_the_converted_model():
    model, converted = _converted()
    x = torch.randn(2, 1, 28, 28)
    compiled = torch.compile(converted)
    with torch.no_grad():
        assert relative_error(compiled(x), model(x)) < 1e-4


@pytest.mark.parametrize("factory", [lambda: small_cnn(width=8), FunctionalConvNet], ids=["small_cnn", "functional"])
def test_torch_export_captures_the_converted_model(factory):
    model, converted = _converted(factory)
    x = torch.randn(2, 1, 28, 28) if factory is not FunctionalConvNet else torch.randn(2, 3, 12, 12)
    exported = torch.export.export(converted, (x,))
    with torch.no_grad():
        assert relative_error(exported.module()(x), model(x)) < 1e-4
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("convolution" in t or "conv2d" in t for t in targets)


def test_onnx_export(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    _, converted = _converted()
    path = tmp_path / "model.onnx"
    torch.onnx.export(converted, (torch.randn(1, 1, 28, 28),), str(path), dynamo=True)
    onnx.checker.check_model(onnx.load(str(path)))


@pytest.mark.parametrize("name", ["reads_conv_attributes", "patch_embedding"])
def test_compile_export_and_fx_take_a_converted_model_that_reads_conv_attributes(name):
    from audio_zoo import HUB_ARCHITECTURES

    factory, shape = HUB_ARCHITECTURES[name]
    model, converted = _converted(factory)
    x = torch.randn(shape)
    with torch.no_grad():
        expected = model(x)
        assert relative_error(torch.compile(converted)(x), expected) < 1e-4
        assert relative_error(torch.export.export(converted, (x,)).module()(x), expected) < 1e-4
        if name == "patch_embedding":  # the other's forward branches on input shapes, which fx cannot trace
            assert relative_error(torch.fx.symbolic_trace(converted)(x), expected) < 1e-4

import csv
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import convsep
from convsep.models import resnet18, small_cnn
from convsep.plan import PLAN_ATTRIBUTE
from helpers import assert_bitwise_equal, snapshot
from zoo import FunctionalConvNet, MixedDimsNet, SamePaddingConv, SharedConvNet, UntraceableNet


def flop_counter(model, x):
    """torch's own count of one forward pass: the reference every total must equal."""
    args = x if isinstance(x, tuple) else (x,)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*args)
    return counter


def module_flops(counter, model, name):
    """FlopCounterMode's FLOPs inside one submodule (it names them '<RootClass>.<qualified name>')."""
    counts = counter.get_flop_counts().get(f"{type(model).__name__}.{name}", {})
    return sum(counts.values())


def out_size(size, kernel, stride=1, padding=0, dilation=1):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def row(report, name):
    return next(r for r in report.rows if r["name"] == name)


@pytest.mark.parametrize("rank", [1, "full"])
def test_totals_and_per_layer_macs_equal_flop_counter_mode_before_and_after(architecture, rank):
    name, model, x = architecture
    converted = convsep.convert(model, rank=rank)
    report = convsep.report(model, converted, x)
    counters = {}
    for side, m in (("before", model), ("after", converted)):
        counters[side] = flop_counter(m, x)
        flops = counters[side].get_total_flops()
        assert report.totals[f"flops_{side}"] == flops, (name, side)
        assert report.totals[f"macs_{side}"] * 2 == flops, (name, side)
        assert report.totals[f"params_{side}"] == sum(p.numel() for p in m.parameters()), (name, side)
        assert all(isinstance(report.totals[f"{q}_{side}"], int) for q in ("params", "macs", "flops"))
    assert report.totals["macs_ratio"] == pytest.approx(report.totals["macs_after"] / report.totals["macs_before"])

    # One row per planned layer, and each module's MACs are what FlopCounterMode saw inside that module.
    assert {d.name for d in converted.convsep_plan.layers} <= {r["name"] for r in report.rows}, name
    for r in report.rows:
        if not r["kind"].startswith("F."):
            assert 2 * r["macs_before"] == module_flops(counters["before"], model, r["name"]), (name, r["name"])
        if r["converted"] or not r["kind"].startswith("F."):
            assert 2 * r["macs_after"] == module_flops(counters["after"], converted, r["module"]), (name, r["name"])


def test_grouped_depthwise_strided_dilated_macs_follow_the_closed_form():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, stride=2, padding=1, dilation=2, groups=2),  # grouped, strided, dilated
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: kept
        nn.Conv2d(8, 6, (3, 5), stride=(2, 1), dilation=(1, 2), bias=False),
    ).eval()
    x = torch.randn(4, 4, 17, 19)
    converted = convsep.convert(model, rank=2)
    report = convsep.report(model, converted, x)

    h, w = out_size(17, 3, 2, 1, 2), out_size(19, 3, 2, 1, 2)
    first = row(report, "0")
    assert first["shape_in"] == [4, 4, 17, 19] and first["shape_out"] == [4, 8, h, w]
    assert first["macs_before"] == 4 * h * w * 8 * (4 // 2) * 9
    assert first["macs_after"] == 4 * h * w * (4 * 2 * 9 + 8 * (4 * 2 // 2))
    assert first["params_after"] == 4 * 2 * 9 + 8 * (4 * 2 // 2) + 8
    assert first["groups"] == 2 and first["kernel"] == [3, 3] and first["rank"] == 2

    depthwise = row(report, "1")
    assert not depthwise["converted"] and "depthwise" in depthwise["reason"]
    assert depthwise["macs_before"] == depthwise["macs_after"] == 4 * h * w * 8 * 9

    h2, w2 = out_size(h, 3, 2, 0, 1), out_size(w, 5, 1, 0, 2)
    last = row(report, "2")
    assert last["macs_before"] == 4 * h2 * w2 * 6 * 8 * 15
    assert last["macs_after"] == 4 * h2 * w2 * (8 * 2 * 15 + 6 * 8 * 2)
    assert report.totals["flops_after"] == flop_counter(converted, x).get_total_flops()


def test_one_and_three_dimensional_convs():
    torch.manual_seed(0)
    model = MixedDimsNet().eval()
    x = torch.randn(3, 4, 144)
    converted = convsep.convert(model, rank=1)
    report = convsep.report(model, converted, x)
    c1, c2, c3 = row(report, "c1"), row(report, "c2"), row(report, "c3")
    assert (c1["kind"], c1["kernel"], c1["shape_out"]) == ("Conv1d", [5], [3, 8, 144])
    assert c1["macs_before"] == 3 * 144 * 8 * 4 * 5 and c1["macs_after"] == 3 * 144 * (4 * 5 + 8 * 4)
    assert c2["macs_before"] == 3 * 24 * 6 * 8 * 8 * 15
    assert (c3["kind"], c3["kernel"], c3["shape_in"]) == ("Conv3d", [3, 3, 3], [3, 8, 4, 6, 6])
    assert c3["macs_before"] == 3 * 4 * 6 * 6 * 4 * 8 * 27 and c3["macs_after"] == 3 * 144 * (8 * 27 + 4 * 8)
    assert report.totals["macs_before"] == c1["macs_before"] + c2["macs_before"] + c3["macs_before"]


def test_linear_layers_and_matmuls_are_in_the_totals():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.proj = nn.Parameter(torch.randn(6, 5))
            self.fc = nn.Linear(64 * 5, 7)
            self.head = nn.Linear(7, 3, bias=False)

        def forward(self, x):
            y = self.conv(x).flatten(2).transpose(1, 2)  # (B, 64, 6)
            y = torch.matmul(y, self.proj)  # (B, 64, 5)
            gram = torch.bmm(y.transpose(1, 2), y)  # (B, 5, 5)
            return self.head(F.relu(self.fc(y.flatten(1)))) + gram.sum()

    model = Net().eval()
    b = 4
    x = torch.randn(b, 3, 8, 8)
    converted = convsep.convert(model, rank=1)
    report = convsep.report(model, converted, x)
    conv_before = b * 64 * 6 * 3 * 9
    conv_after = b * 64 * (3 * 9 + 6 * 3)
    rest = b * 64 * 6 * 5 + b * 5 * 64 * 5 + b * 320 * 7 + b * 7 * 3
    assert report.totals["macs_before"] == conv_before + rest
    assert report.totals["macs_after"] == conv_after + rest
    assert report.totals["flops_before"] == flop_counter(model, x).get_total_flops()
    assert report.totals["flops_after"] == flop_counter(converted, x).get_total_flops()
    assert [r["name"] for r in report.rows] == ["conv"]


def test_counts_scale_with_the_batch_and_the_header_says_which():
    torch.manual_seed(0)
    model = SharedConvNet().eval()
    converted = convsep.convert(model, rank=1)
    one = convsep.report(model, converted, torch.randn(1, 4, 10, 10))
    four = convsep.report(model, converted, torch.randn(4, 4, 10, 10))
    for key in ("macs_before", "macs_after", "flops_before", "flops_after"):
        assert four.totals[key] == 4 * one.totals[key]
    assert four.totals["params_before"] == one.totals["params_before"]
    assert [r["macs_before"] * 4 for r in one.rows] == [r["macs_before"] for r in four.rows]
    assert "per sample" in str(one) and "per batch of 4" in str(four)
    assert four.header["batch_size"] == 4
    shared = row(four, "conv")
    assert shared["calls"] == 2 and "x2 calls" in str(four)


def test_skipped_layers_appear_with_their_reasons():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ConvTranspose2d(8, 4, 3, stride=2),
        SamePaddingConv(4, 8, 3, stride=2),
        nn.Conv2d(8, 8, 3, padding=1),
    ).eval()
    x = torch.randn(2, 3, 9, 9)
    converted = convsep.convert(model, rank=1, exclude="5")
    report = convsep.report(model, converted, x)
    reasons = {r["name"]: r["reason"] for r in report.rows}
    assert "already pointwise" in reasons["0"]
    assert "already depthwise" in reasons["1"]
    assert reasons["2"] == "" and row(report, "2")["converted"]
    assert "transposed" in reasons["3"]
    assert "overrides forward" in reasons["4"]
    assert "excluded by '5'" in reasons["5"]
    text = report.to_markdown()
    for reason in reasons.values():
        assert reason in text
    transposed = row(report, "3")
    assert transposed["macs_before"] == 2 * 9 * 9 * 8 * 4 * 9  # every input position meets the whole kernel
    counter = flop_counter(model, x)
    for r in report.rows:
        assert 2 * r["macs_before"] == module_flops(counter, model, r["name"]), r["name"]


def test_untraceable_models_are_counted_by_running_them():
    torch.manual_seed(0)
    model = UntraceableNet().eval()
    x = torch.randn(2, 3, 12, 12)
    converted = convsep.convert(model, rank=1)
    assert converted.convsep_plan.path != "fx"
    report = convsep.report(model, converted, x)
    assert [r["name"] for r in report.rows] == ["stem", "block.conv", "tail.1"]
    assert all(r["converted"] for r in report.rows)
    assert report.totals["flops_after"] == flop_counter(converted, x).get_total_flops()


def test_functional_convs_get_rows_with_the_closed_form():
    torch.manual_seed(0)
    model = FunctionalConvNet().eval()
    x = torch.randn(2, 3, 12, 12)
    converted = convsep.convert(model, rank=1)
    report = convsep.report(model, converted, x)
    stem = row(report, "stem_weight")
    assert stem["kind"] == "F.conv2d" and stem["converted"]
    assert stem["shape_in"] == [2, 3, 12, 12] and stem["shape_out"] == [2, 8, 12, 12]
    assert stem["macs_before"] == 2 * 144 * 8 * 3 * 9 and stem["macs_after"] == 2 * 144 * (3 * 9 + 8 * 3)
    assert stem["params_before"] == 8 * 3 * 9 + 8 and stem["params_after"] == 3 * 9 + 8 * 3 + 8
    assert stem["weight_error"] == pytest.approx(converted.convsep_plan.layers[0].relative_error, rel=1e-5)
    # Without a plan, a functional conv on a parameter is still found, by running the model.
    plain = convsep.report(model, model, x)
    assert row(plain, "stem_weight")["macs_before"] == stem["macs_before"]
    assert row(plain, "stem_weight")["macs_after"] == stem["macs_before"]


def test_an_unconverted_model_reports_its_convs_as_they_are():
    torch.manual_seed(0)
    model = small_cnn(width=8).eval()
    x = torch.randn(2, 1, 28, 28)
    report = convsep.report(model, model, x)
    assert len(report.rows) == 4 and not any(r["converted"] for r in report.rows)
    assert report.totals["macs_before"] == report.totals["macs_after"]
    assert all(r["macs_before"] == r["macs_after"] for r in report.rows)
    assert "0 of 4 convolutions converted (no conversion plan)" in str(report)
    # A converted model that lost its plan still shows its pairs as converted layers.
    converted = convsep.convert(model, rank=1, exclude="0.0")
    delattr(converted, PLAN_ATTRIBUTE)
    lost = convsep.report(model, converted, x)
    assert [r["converted"] for r in lost.rows] == [False, True, True, True]
    assert lost.totals["flops_after"] == flop_counter(converted, x).get_total_flops()


def test_weight_error_is_measured_on_the_current_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    x = torch.randn(1, 4, 10, 10)
    exact = convsep.convert(model, rank="full")
    assert all(r["weight_error"] < 1e-6 for r in convsep.report(model, exact, x).rows)

    converted = convsep.convert(model, rank=1)
    fresh = convsep.report(model, converted, x)
    for r, d in zip(fresh.rows, converted.convsep_plan.layers):
        assert r["weight_error"] == pytest.approx(d.relative_error, rel=1e-5)
        assert r["weight_error_source"] == "weights"
    with torch.no_grad():
        converted[0].pointwise.weight.zero_()  # as if training had moved the weights
    moved = convsep.report(model, converted, x)
    assert row(moved, "0")["weight_error"] == pytest.approx(1.0)
    assert row(moved, "2")["weight_error"] == pytest.approx(row(fresh, "2")["weight_error"])


def test_without_the_original_weights_the_errors_come_from_the_plan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    converted = convsep.convert(model, rank=1)
    fresh = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()  # as rebuilt from --model
    report = convsep.report(fresh, converted, torch.randn(1, 4, 10, 10), original_weights=False)
    for r, d in zip(report.rows, converted.convsep_plan.layers):
        assert (r["weight_error"], r["weight_error_source"]) == (d.relative_error, "plan")
    compared = convsep.report(fresh, converted, torch.randn(1, 4, 10, 10))
    assert row(compared, "0")["weight_error"] > 0.9  # against unrelated kernels: what the option avoids


def test_the_models_are_left_as_they_were():
    torch.manual_seed(0)
    model = small_cnn(width=8).train()
    converted = convsep.convert(model, rank=1).train()
    before, after = snapshot(model), snapshot(converted)
    convsep.report(model, converted, torch.randn(2, 1, 28, 28), latency=True, latency_runs=1)
    assert_bitwise_equal(before, model)  # BatchNorm running statistics included
    assert_bitwise_equal(after, converted)
    assert all(m.training for m in model.modules()) and all(m.training for m in converted.modules())


def test_formats_parse_back():
    torch.manual_seed(0)
    model = SharedConvNet().eval()
    converted = convsep.convert(model, rank=1, exclude="head")
    report = convsep.report(model, converted, torch.randn(2, 4, 10, 10))

    data = json.loads(report.render("json"))
    assert data["totals"] == report.totals and data["rows"] == report.rows
    assert json.loads(json.dumps(report.to_dict())) == data
    assert "FLOPs = 2 x MACs" in data["conventions"]

    lines = [line for line in report.to_markdown().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:3] == ["layer", "kind", "shape in -> out"]
    assert set(lines[1].replace("|", "").replace(":", "")) == {"-"}
    layer_lines = lines[2 : 2 + len(report.rows)]
    assert [line.strip("|").split("|")[0].strip() for line in layer_lines] == [r["name"] for r in report.rows]

    parsed = list(csv.DictReader(io.StringIO(report.render("csv"))))
    assert len(parsed) == len(report.rows) + 1
    for got, r in zip(parsed, report.rows):
        assert got["name"] == r["name"] and int(got["macs_after"]) == r["macs_after"]
        assert got["shape_in"] == "x".join(map(str, r["shape_in"]))
    assert parsed[-1]["name"] == "(whole model)" and int(parsed[-1]["flops_after"]) == report.totals["flops_after"]

    table = report.render("table")
    assert table == str(report) and "MACs = multiply-accumulates; FLOPs = 2 x MACs; bias adds are not counted" in table
    assert f"{report.totals['macs_before']:,}" in table
    with pytest.raises(convsep.ConvsepValueError, match="'xml'"):
        report.render("xml")


def test_latency_is_measured_per_layer_and_in_total():
    torch.manual_seed(0)
    model = small_cnn(width=8).eval()
    converted = convsep.convert(model, rank=1)
    report = convsep.report(model, converted, torch.randn(2, 1, 28, 28), latency=True, latency_runs=2)
    assert report.totals["latency_before_ms"] > 0 and report.totals["latency_after_ms"] > 0
    assert all(r["latency_before_ms"] > 0 and r["latency_after_ms"] > 0 for r in report.rows)
    assert report.header["latency"] == {
        "device": "cpu", "threads": torch.get_num_threads(), "runs": 2, "warmup": 1, "statistic": "median"
    }  # fmt: skip
    text = str(report)
    assert "ms before" in text and f"on cpu, {torch.get_num_threads()} thread" in text and "latency (ms)" in text
    assert "latency_after_ms" in report.to_csv().splitlines()[0]


def test_convert_prints_the_report_only_when_asked(capsys):
    torch.manual_seed(0)
    model = small_cnn(width=8).eval()
    x = torch.randn(1, 1, 28, 28)
    convsep.convert(model, rank=1, example_inputs=x)
    assert capsys.readouterr().out == ""
    convsep.convert(model, rank=1, example_inputs=x, verbose=True)
    out = capsys.readouterr().out
    assert "convsep report: 4 of 4 convolutions converted" in out and "per sample" in out
    convsep.convert(model, rank=1, verbose=True)
    assert "converted 4 of 4 convolutions" in capsys.readouterr().out

    same = convsep.convert(model, rank=1, example_inputs=x, verbose=True, inplace=True)
    out = capsys.readouterr().out
    assert same is model
    before_params = f"{sum(p.numel() for p in small_cnn(width=8).parameters()):,}"
    assert before_params in out  # the report compared against the model as it was
    with pytest.raises(convsep.ConvsepTypeError):
        convsep.convert(model, example_inputs=[1, 2], verbose=True)


def test_inputs_that_do_not_fit_name_the_expected_input_and_the_failing_layer():
    torch.manual_seed(0)
    model = resnet18(width=8, num_classes=10).eval()
    converted = convsep.convert(model, rank=1)
    with pytest.raises(convsep.InputShapeError) as info:
        convsep.report(model, converted, torch.randn(2, 1, 32, 32))
    message = str(info.value)
    assert "(2, 1, 32, 32)" in message and "(batch, 3, H, W)" in message
    assert "failed in conv1 (Conv2d, expects 3 input channels)" in message
    assert "\n" not in message

    with pytest.raises(convsep.InputShapeError, match=r"float64.*expects \(batch, 3, H, W\) float32"):
        convsep.report(model, converted, torch.randn(2, 3, 32, 32, dtype=torch.float64))

    flat = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    with pytest.raises(convsep.InputShapeError, match=r"failed in 2 \(Linear, expects 144 input features\)"):
        convsep.report(flat, flat, torch.randn(1, 3, 10, 10))  # the convs take any size; the Linear does not

    untraceable = UntraceableNet().eval()
    with pytest.raises(convsep.InputShapeError, match="failed in its own forward.*AssertionError: expects RGB"):
        convsep.report(untraceable, untraceable, torch.randn(1, 4, 8, 8))


@pytest.mark.parametrize("bad", [[1, 2], None, {"x": torch.zeros(1)}, (), "image.png", (torch.zeros(1), 3)])
def test_example_inputs_must_be_tensors(bad):
    model = nn.Conv2d(3, 4, 3)
    with pytest.raises(convsep.ConvsepTypeError, match="example_inputs must be a tensor or a tuple of tensors"):
        convsep.report(model, model, bad)


def test_models_must_be_modules():
    with pytest.raises(convsep.ConvsepTypeError, match="after must be a torch.nn.Module"):
        convsep.report(nn.Conv2d(1, 1, 3), "converted.pt", torch.zeros(1, 1, 5, 5))


def test_a_tuple_of_inputs_is_passed_as_positional_arguments():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(2, 4, 3)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    model = TwoInputs().eval()
    inputs = (torch.randn(2, 3, 7, 7), torch.randn(2, 2, 7, 7))
    converted = convsep.convert(model, rank=1)
    report = convsep.report(model, converted, inputs)
    assert report.totals["flops_after"] == flop_counter(converted, inputs).get_total_flops()
    assert row(report, "b")["macs_before"] == 2 * 25 * 4 * 2 * 9
    assert "(2, 3, 7, 7) float32, (2, 2, 7, 7) float32" in str(report)


def test_lazy_layers_initialised_by_the_report_stay_trainable():
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    x = torch.randn(1, 3, 8, 8)
    report = convsep.report(model, model, x, latency=True, latency_runs=1)
    assert row(report, "0")["macs_before"] == 36 * 4 * 3 * 9
    model(x).sum().backward()  # inference tensors (had the pass run under inference_mode) would refuse this
    assert model[0].weight.grad is not None

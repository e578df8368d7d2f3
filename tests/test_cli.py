import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from cli_support import run, spec, trained
import convsep
import convsep.cli
from convsep.cli import main
from convsep.imports import resolve_callable
from convsep.models import small_cnn
from helpers import assert_bitwise_equal, snapshot


FACTORIES = """
import torch
from torch import nn
from convsep.models import small_cnn

def build():
    return small_cnn(width=4)

def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))

def pointwise_only():
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))

def returns_a_list():
    return [1, 2]

class TwoInputs(nn.Module):  # a conv branch and a vector branch, added: two positional inputs

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.vector = nn.Linear(5, 8)

    def forward(self, image, vector):
        return self.conv(image).mean((2, 3)) + self.vector(vector)

def two_inputs():
    return TwoInputs()

def broken():
    raise RuntimeError("the factory is broken")

NOT_CALLABLE = 42
"""


@pytest.fixture
def work(tmp_path):
    """A folder with a factory file and a state_dict of small_cnn(width=4) saved from it."""
    (tmp_path / "nets.py").write_text(FACTORIES)
    torch.manual_seed(0)
    model = small_cnn(width=4).eval()
    torch.save(model.state_dict(), tmp_path / "in.pt")
    return tmp_path


# --- convert -------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_convert_writes_a_checkpoint_that_loads_back(work, suffix, capsys):
    out = work / f"out{suffix}"
    code, stdout, err = run(["convert", work / "in.pt", "-o", out, "--model", spec(work), "--input-shape", "2,1,28,28"], capsys)
    assert code == 0, err
    assert f"wrote {out}" in err
    model = trained(work)
    expected = convsep.convert(model, rank=1)
    loaded = convsep.load(out, model=small_cnn(width=4))
    assert loaded.convsep_plan.to_dict() == expected.convsep_plan.to_dict()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), expected(x))
    assert convsep.load(out).input_shape == (2, 1, 28, 28)


def test_convert_reads_safetensors_and_honours_rank_init_and_patterns(work, capsys):
    from safetensors.torch import save_file

    save_file(trained(work).state_dict(), str(work / "in.safetensors"))
    argv = ["convert", work / "in.safetensors", "-o", work / "out.pt", "--model", spec(work), "--rank", "2"]
    argv += ["--init", "random", "--include", "0.*", "--include", "1.*", "--exclude", "1.*"]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    plan = convsep.load(work / "out.pt").plan
    assert [(d.name, d.rank) for d in plan.converted] == [("0.0", 2)]
    assert plan.init == "random" and plan.rank == 2


def test_convert_resumes_a_converted_checkpoint(work, capsys):
    assert run(["convert", work / "in.pt", "-o", work / "a.pt", "--model", spec(work), "--include", "0.0"], capsys)[0] == 0
    code, stdout, err = run(["convert", work / "a.pt", "-o", work / "b.pt", "--model", spec(work)], capsys)
    assert code == 0, err
    assert [d.name for d in convsep.load(work / "b.pt").plan.converted] == ["0.0", "1.0", "3.0", "4.0"]
    loaded = convsep.load(work / "b.pt", model=small_cnn(width=4))
    expected = convsep.convert(convsep.convert(trained(work), include="0.0"))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), expected(x))


def test_convert_a_whole_pickled_model_with_trust_pickle(work, capsys):
    torch.save(trained(work), work / "whole.pt")
    code, stdout, err = run(["convert", work / "whole.pt", "-o", work / "out.pt", "--trust-pickle"], capsys)
    assert code == 0, err
    assert len(convsep.load(work / "out.pt").plan.converted) == 4


def test_convert_with_a_wrapped_state_dict_and_an_import_string(work, capsys):
    torch.manual_seed(0)
    from zoo import FunctionalConvNet

    model = FunctionalConvNet().eval()
    torch.save({"model": model.state_dict(), "epoch": 7}, work / "wrapped.pth")
    code, stdout, err = run(["convert", work / "wrapped.pth", "-o", work / "out.pt", "--model", "zoo:FunctionalConvNet"], capsys)
    assert code == 0, err
    loaded = convsep.load(work / "out.pt", model=FunctionalConvNet())
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), convsep.convert(model)(x))


def test_convert_without_input_shape_prints_the_plan(work, capsys):
    code, stdout, err = run(["convert", work / "in.pt", "-o", work / "out.pt", "--model", spec(work)], capsys)
    assert code == 0, err
    assert "converted 4 of 4 convolutions" in stdout and "params:" in stdout
    assert "convsep: pass --input-shape (like 1,3,224,224) for MACs and FLOPs in the report" in err.splitlines()


def test_convert_json_output_is_json_only(work, capsys):
    argv = ["convert", work / "in.pt", "-o", work / "out.pt", "--model", spec(work), "--format", "json"]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    assert json.loads(stdout)["plan"]["layers"][0]["name"] == "0.0"
    code, stdout, err = run(argv + ["--input-shape", "1,1,28,28", "--force"], capsys)
    assert code == 0, err
    json.loads(stdout)


def test_existing_output_needs_force(work, capsys):
    (work / "out.pt").write_bytes(b"precious")
    argv = ["convert", work / "in.pt", "-o", work / "out.pt", "--model", spec(work)]
    code, stdout, err = run(argv, capsys)
    assert code == 1 and "--force" in err and (work / "out.pt").read_bytes() == b"precious"
    assert run(argv + ["--force"], capsys)[0] == 0
    assert convsep.load(work / "out.pt").converted


def test_unmatched_pattern_is_a_one_line_warning(work, capsys):
    argv = ["convert", work / "in.pt", "-o", work / "out.pt", "--model", spec(work), "--exclude", "nothing.*"]
    code, stdout, err = run(argv, capsys)
    assert code == 0
    warning_lines = [line for line in err.splitlines() if line.startswith("convsep: warning:")]
    assert len(warning_lines) == 1 and "nothing.*" in warning_lines[0]


@pytest.mark.parametrize("factory", ["mlp", "pointwise_only"])
def test_model_without_convertible_convs_is_a_warning_and_a_copy(factory, work, capsys):
    torch.manual_seed(0)
    model = resolve_callable(spec(work, factory))().eval()
    torch.save(model.state_dict(), work / "plain.pt")
    code, stdout, err = run(["convert", work / "plain.pt", "-o", work / "out.pt", "--model", spec(work, factory)], capsys)
    assert code == 0
    why = {"mlp": "has no convolution convsep can convert;", "pointwise_only": "no convolution of"}[factory]
    assert err.startswith("convsep: warning:") and why in err.splitlines()[0] and "holds the same weights" in err
    assert_bitwise_equal(snapshot(model), convsep.load(work / "out.pt", model=model))


# --- report --------------------------------------------------------------------------------


def test_report_without_input_shape_prints_the_plan(work, capsys):
    assert run(["convert", work / "in.pt", "-o", work / "out.pt", "--model", spec(work)], capsys)[0] == 0
    code, stdout, err = run(["report", work / "out.pt", "--model", spec(work)], capsys)
    assert code == 0, err
    assert "converted 4 of 4 convolutions" in stdout
    code, stdout, err = run(["report", work / "in.pt", "--model", spec(work), "--format", "json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["plan"] is None


def test_report_calls_the_report_api(work, capsys, monkeypatch):
    """The wiring: before/after models, a seeded input of the recorded shape, latency and format."""
    calls = []

    class FakeReport:
        def render(self, fmt):
            return f"FAKE REPORT as {fmt}"

    def fake_report(before, after, example_inputs, *, latency=False, original_weights=True):
        calls.append((before, after, example_inputs, latency, original_weights))
        return FakeReport()

    monkeypatch.setattr(convsep.cli, "report", fake_report)
    argv = ["convert", work / "in.pt", "-o", work / "out.pt", "--model", spec(work), "--input-shape", "3,1,28,28"]
    code, stdout, err = run(argv + ["--format", "markdown", "--latency"], capsys)
    assert code == 0, err
    assert stdout == "FAKE REPORT as markdown\n"
    before, after, x, latency, original_weights = calls[-1]
    assert x.shape == (3, 1, 28, 28) and latency is True and original_weights
    assert not hasattr(before, "convsep_plan") and len(after.convsep_plan.converted) == 4
    assert_bitwise_equal(snapshot(trained(work)), before)

    code, stdout, err = run(["report", work / "out.pt", "--model", spec(work), "--format", "csv"], capsys)
    assert code == 0, err
    assert stdout == "FAKE REPORT as csv\n"
    before, after, x, latency, original_weights = calls[-1]
    assert x.shape == (3, 1, 28, 28) and latency is False  # the shape recorded at conversion
    assert original_weights is False  # only the converted weights are in the file
    assert not hasattr(before, "convsep_plan") and len(after.convsep_plan.converted) == 4

    code, stdout, err = run(["report", work / "in.pt", "--model", spec(work), "--input-shape", "1,1,28,28"], capsys)
    assert code == 0, err
    before, after, x, latency, original_weights = calls[-1]
    assert before is after and x.shape == (1, 1, 28, 28) and original_weights


def test_convert_report_matches_the_python_api(work, capsys):
    argv = ["convert", work / "in.pt", "-o", work / "out.pt", "--model", spec(work), "--input-shape", "2,1,28,28"]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    model = trained(work)
    x = torch.randn((2, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    expected = convsep.report(model, convsep.convert(model), x).render("table")
    assert stdout == expected + "\n"
    assert "MACs" in stdout


TOTALS = ("params_before", "params_after", "macs_before", "macs_after", "flops_before", "flops_after")


@pytest.mark.parametrize("fmt", ["table", "markdown", "json", "csv"])
def test_report_of_a_converted_checkpoint_has_the_totals_convert_printed(fmt, work, capsys):
    argv = ["convert", work / "in.pt", "-o", work / "out.pt", "--model", spec(work), "--input-shape", "2,1,28,28"]
    code, printed, err = run(argv + ["--format", "json"], capsys)
    assert code == 0, err
    code, stdout, err = run(["report", work / "out.pt", "--model", spec(work), "--format", "json"], capsys)
    assert code == 0, err
    at_conversion, read_back = json.loads(printed)["totals"], json.loads(stdout)["totals"]
    assert {k: read_back[k] for k in TOTALS} == {k: at_conversion[k] for k in TOTALS}
    code, stdout, err = run(["report", work / "out.pt", "--model", spec(work), "--format", fmt], capsys)
    assert code == 0 and stdout.strip(), err
    if fmt == "markdown":
        assert "|" in stdout


def test_report_of_a_converted_checkpoint_shows_the_weight_errors_of_conversion(work, capsys):
    argv = ["convert", work / "in.pt", "-o", work / "out.pt", "--model", spec(work), "--input-shape", "2,1,28,28"]
    code, printed, err = run(argv + ["--format", "json"], capsys)
    assert code == 0, err
    code, stdout, err = run(["report", work / "out.pt", "--model", spec(work), "--format", "json"], capsys)
    assert code == 0, err
    plan = convsep.load(work / "out.pt").plan
    expected = {d.name: d.relative_error for d in plan.converted}
    for rows in (json.loads(printed)["rows"], json.loads(stdout)["rows"]):
        errors = {row["name"]: row["weight_error"] for row in rows if row["converted"]}
        assert errors == pytest.approx(expected, rel=1e-4)


def test_report_of_an_unconverted_checkpoint_is_the_model_against_itself(work, capsys):
    code, stdout, err = run(["report", work / "in.pt", "--model", spec(work), "--input-shape", "1,1,28,28"], capsys)
    assert code == 0, err
    model = trained(work)
    x = torch.randn((1, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    assert stdout == convsep.report(model, model, x).render("table") + "\n"


def test_convert_with_latency_times_every_layer_and_the_whole_model(work, capsys):
    argv = ["convert", work / "in.pt", "-o", work / "out.pt", "--model", spec(work), "--input-shape", "1,1,28,28"]
    code, stdout, err = run(argv + ["--latency", "--format", "json"], capsys)
    assert code == 0, err
    shown = json.loads(stdout)
    for key in ("latency_before_ms", "latency_after_ms"):
        assert shown["totals"][key] > 0
        assert all(row[key] > 0 for row in shown["rows"]), key


def test_a_model_with_two_inputs_takes_one_input_shape_each(work, capsys):
    torch.manual_seed(0)
    two = resolve_callable(spec(work, "two_inputs"))().eval()
    torch.save(two.state_dict(), work / "two.pt")
    argv = ["convert", work / "two.pt", "-o", work / "two_sep.safetensors", "--model", spec(work, "two_inputs")]
    code, stdout, err = run(argv + ["--input-shape", "2,3,6,6", "--input-shape", "2,5", "--format", "json"], capsys)
    assert code == 0, err
    assert [i["shape"] for i in json.loads(stdout)["header"]["inputs"]] == [[2, 3, 6, 6], [2, 5]]
    assert convsep.load(work / "two_sep.safetensors").input_shape == ((2, 3, 6, 6), (2, 5))

    # the recorded shapes serve the report later; a shape that does not fit is named
    code, stdout, err = run(["report", work / "two_sep.safetensors", "--model", spec(work, "two_inputs"), "--format", "json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["totals"]["macs_before"] > json.loads(stdout)["totals"]["macs_after"]
    code, _, err = run(argv + ["--input-shape", "2,3,6,6", "--force"], capsys)
    assert code == 1 and "input shape 2,3,6,6 does not fit" in err, err
    code, _, err = run(argv + ["--input-shape", "2,3,6,6", "--input-shape", "2,4", "--force"], capsys)
    assert code == 1 and "--input-shape 2,3,6,6 --input-shape 2,4 does not fit" in err, err
    code, _, err = run(argv + ["--input-shape", "2,3,6,6;2,5"], capsys)
    assert code == 2 and "one shape per --input-shape" in err, err


# --- demo, help, version -------------------------------------------------------------------


def test_demo_converts_a_built_in_model(capsys):
    code, out, err = run(["demo", "--model", "small_cnn"], capsys)
    assert code == 0, err
    torch.manual_seed(0)
    model = small_cnn().eval()
    x = torch.randn(1, 1, 28, 28)
    converted = convsep.convert(model, rank=1)
    with torch.no_grad():
        error = (converted(x) - model(x)).norm() / model(x).norm()
    assert out == (
        "small_cnn (random weights), rank=1, input 1,1,28,28\n"
        + convsep.report(model, converted, x).render("table")
        + f"\nrelative output error on a random input: {error:.2e}\n"
    )


def test_demo_full_rank_is_exact(capsys):
    assert main(["demo", "--model", "small_cnn", "--rank", "full"]) == 0
    error = float(capsys.readouterr().out.rsplit(":", 1)[1])
    assert error < 1e-5


def test_version(capsys):
    assert main(["--version"]) == 0
    assert convsep.__version__ in capsys.readouterr().out


def test_python_dash_m_is_the_same_cli():
    result = subprocess.run([sys.executable, "-m", "convsep", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"convsep {convsep.__version__}"


@pytest.mark.parametrize("command", [[], ["convert"], ["report"], ["demo"]])
def test_help_has_examples(command, capsys):
    assert main(command + ["--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "convsep " in out.split("examples:")[1]


def test_bad_rank_is_one_line_and_exit_1(capsys):
    assert main(["demo", "--model", "small_cnn", "--rank", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("convsep: error: rank=0") and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["demo", "--rank", "abc"], ["nonsense"], []])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


# --- bad input: one line on stderr, exit 1 (2 for usage), nothing written, input untouched -----


def _not_a_checkpoint(folder):
    (folder / "notes.txt").write_text("these are my notes, not a model\n")
    return ["convert", folder / "notes.txt", "-o", folder / "out.pt", "--model", spec(folder)]


def _truncated(folder):
    content = (folder / "in.pt").read_bytes()
    (folder / "cut.pt").write_bytes(content[: len(content) // 3])
    return ["convert", folder / "cut.pt", "-o", folder / "out.pt", "--model", spec(folder)]


def _pickled(folder):
    torch.save(trained(folder), folder / "whole.pt")
    return ["convert", folder / "whole.pt", "-o", folder / "out.pt", "--model", spec(folder)]


def _wrong_model(folder):
    (folder / "other.py").write_text("from convsep.models import small_cnn\ndef build():\n    return small_cnn(width=8)\n")
    return ["convert", folder / "in.pt", "-o", folder / "out.pt", "--model", f"{folder / 'other.py'}:build"]


def _empty(folder):
    (folder / "empty.pt").write_bytes(b"")
    return ["convert", folder / "empty.pt", "-o", folder / "out.pt", "--model", spec(folder)]


def _directory(folder):
    (folder / "adir").mkdir()
    return ["convert", folder / "adir", "-o", folder / "out.pt", "--model", spec(folder)]


def _converted_without_original(folder):
    convsep.save(convsep.convert(trained(folder)), folder / "sep.pt")
    return ["report", folder / "sep.pt"]


def _in_as_out(folder):
    os.symlink(folder / "in.pt", folder / "link.pt")
    return ["convert", folder / "in.pt", "-o", folder / "link.pt", "--model", spec(folder), "--force"]


def _out_in_a_file(folder):
    return ["convert", folder / "in.pt", "-o", folder / "in.pt" / "out.pt", "--model", spec(folder)]


def _convert(folder, *extra, out="out.pt"):
    return ["convert", folder / "in.pt", "-o", folder / out, "--model", spec(folder), *extra]


BAD_INPUTS = {
    # name: (argv builder, exit code, text the error line must contain)
    "missing file": (lambda f: ["convert", f / "nope.pt", "-o", f / "out.pt", "--model", spec(f)], 1, "no such file"),
    "directory": (_directory, 1, "is a directory"),
    "empty file": (_empty, 1, "is empty"),
    "truncated file": (_truncated, 1, "truncated or corrupt"),
    "not a checkpoint": (_not_a_checkpoint, 1, "is not a checkpoint"),
    "pickle without --trust-pickle": (_pickled, 1, "pass --trust-pickle"),
    "state_dict without --model": (lambda f: ["convert", f / "in.pt", "-o", f / "out.pt"], 1, "pass --model"),
    "converted without --model": (_converted_without_original, 1, "pass --model"),
    "--model does not import": (lambda f: _convert(f)[:-1] + ["no_such_package.models:build"], 1, "cannot import"),
    "--model file missing": (lambda f: _convert(f)[:-1] + [f"{f / 'missing.py'}:build"], 1, "no such file"),
    "--model attribute missing": (lambda f: _convert(f)[:-1] + [spec(f, "nothing")], 1, "has no attribute"),
    "--model not callable": (lambda f: _convert(f)[:-1] + [spec(f, "NOT_CALLABLE")], 1, "not callable"),
    "--model without colon": (lambda f: _convert(f)[:-1] + ["convsep.models.small_cnn"], 1, "must look like"),
    "--model returns no module": (lambda f: _convert(f)[:-1] + [spec(f, "returns_a_list")], 1, "returned a list"),
    "--model raises": (lambda f: _convert(f)[:-1] + [spec(f, "broken")], 1, "the factory is broken"),
    "state_dict does not fit": (_wrong_model, 1, "0.0.weight is (4, 1, 3, 3) in the file but (8, 1, 3, 3)"),
    "malformed --input-shape": (lambda f: _convert(f, "--input-shape", "1,3,x"), 2, "is not an input shape"),
    "negative --input-shape": (lambda f: _convert(f, "--input-shape", "1,-3,28,28"), 2, "is not an input shape"),
    "input shape does not fit": (lambda f: _convert(f, "--input-shape", "1,3,28,28"), 1, "input shape 1,3,28,28 does not fit"),
    "report input shape does not fit": (
        lambda f: ["report", f / "in.pt", "--model", spec(f), "--input-shape", "1,3,28,28"],
        1,
        "does not fit",
    ),
    "rank not a number": (lambda f: _convert(f, "--rank", "high"), 2, "is not a rank"),
    "rank zero": (lambda f: _convert(f, "--rank", "0"), 1, "rank=0 must be >= 1"),
    "rank float above 1": (lambda f: _convert(f, "--rank", "1.5"), 1, "must lie in (0, 1)"),
    "bad --init": (lambda f: _convert(f, "--init", "zeros"), 2, "invalid choice"),
    "bad --format": (lambda f: _convert(f, "--format", "yaml"), 2, "argument --format: invalid choice: 'yaml'"),
    "OUT folder missing": (lambda f: _convert(f, out="no/such/dir/out.pt"), 1, "does not exist"),
    "OUT folder is a file": (_out_in_a_file, 1, "is a file, not a folder"),
    "OUT is a directory": (lambda f: _convert(f, out="."), 1, "is a directory"),
    "OUT equal to IN": (lambda f: _convert(f, "--force", out="in.pt"), 1, "is the input"),
    "OUT equal to IN by another path": (lambda f: _convert(f, "--force", out="sub/../in.pt"), 1, "is the input"),
    "OUT a link to IN": (_in_as_out, 1, "is the input"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(case, work, capsys):
    (work / "sub").mkdir()
    build, expected_code, expected_text = BAD_INPUTS[case]
    argv = build(work)
    listing = sorted(os.listdir(work))
    contents = {name: (work / name).read_bytes() for name in listing if (work / name).is_file()}
    code, stdout, err = run(argv, capsys)
    assert code == expected_code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    if expected_code == 1:
        assert len(lines) == 1 and lines[0].startswith("convsep: error:"), err
    else:
        assert lines[0].startswith("usage:") and lines[-1].startswith("convsep convert: error:"), err
    assert expected_text in lines[-1]
    assert sorted(os.listdir(work)) == listing  # nothing written, no temp file left
    for name, content in contents.items():
        assert (work / name).read_bytes() == content, name


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_output_folder(work, capsys):
    (work / "ro").mkdir()
    os.chmod(work / "ro", 0o555)
    try:
        code, stdout, err = run(_convert(work, out="ro/out.pt"), capsys)
    finally:
        os.chmod(work / "ro", 0o755)
    assert code == 1 and "not writable" in err and os.listdir(work / "ro") == []


def test_safetensors_output_without_the_package(work, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    code, stdout, err = run(_convert(work, out="out.safetensors"), capsys)
    assert code == 1 and "pip install convsep[safetensors]" in err
    assert not (work / "out.safetensors").exists()


def test_failure_while_writing_leaves_nothing(work, capsys, monkeypatch):
    def no_space(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    listing = sorted(os.listdir(work))
    code, stdout, err = run(_convert(work), capsys)
    assert code == 1 and err.strip() == f"convsep: error: cannot write {work / 'out.pt'}: No space left on device"
    assert sorted(os.listdir(work)) == listing


def test_convert_with_budget_and_rank_overrides(work, capsys):
    argv = _convert(work, "--input-shape", "1,1,28,28", "--budget", "0.5", "--rank-for", "0.0=full", "--format", "json")
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    totals = json.loads(stdout)["totals"]
    assert totals["macs_after"] <= 0.5 * totals["macs_before"]
    plan = convsep.load(work / "out.pt").plan
    assert (plan.budget["fraction"], plan.budget["on"]) == (0.5, "macs")
    assert next(d for d in plan.layers if d.name == "0.0").rank == plan.layers[0].full_rank


def test_convert_budget_on_params_needs_no_input_shape(work, capsys):
    code, _, err = run(_convert(work, "--budget", "0.4", "--budget-on", "params"), capsys)
    assert code == 0, err
    budget = convsep.load(work / "out.pt").plan.budget
    assert (budget["fraction"], budget["on"]) == (0.4, "params") and budget["reached"] <= 0.4
    assert budget["original"] == sum(p.numel() for p in trained(work).parameters())


CALIBRATION_DATA = "import torch\n\ndef batches():\n    return [torch.randn(4, 1, 28, 28) for _ in range(3)]\n"


def test_convert_calibrates_on_the_batches_of_calibrate_with(work, capsys):
    (work / "calib.py").write_text(CALIBRATION_DATA)
    code, _, err = run(_convert(work, "--calibrate-with", f"{work / 'calib.py'}:batches"), capsys)
    assert code == 0, err
    calibration = convsep.load(work / "out.pt").plan.calibration
    assert (calibration["batches"], calibration["samples"]) == (3, 12)
    assert set(calibration["layers"]) == {"0.0", "1.0", "3.0", "4.0"}


def test_convert_calibration_batches_limits_the_batches_used(work, capsys):
    (work / "calib.py").write_text(CALIBRATION_DATA)
    argv = _convert(work, "--calibrate-with", f"{work / 'calib.py'}:batches", "--calibration-batches", "2")
    code, _, err = run(argv, capsys)
    assert code == 0, err
    calibration = convsep.load(work / "out.pt").plan.calibration
    assert (calibration["batches"], calibration["samples"]) == (2, 8)


def test_convert_calibrate_at_once_reaches_calibrate(work, capsys):
    (work / "calib.py").write_text(CALIBRATION_DATA)
    code, _, err = run(_convert(work, "--calibrate-with", f"{work / 'calib.py'}:batches", "--calibrate-at-once"), capsys)
    assert code == 0, err
    calibration = convsep.load(work / "out.pt").plan.calibration
    assert (calibration["sequential"], calibration["batches"], calibration["samples"]) == (False, 3, 12)


def test_convert_refit_kept_reaches_calibrate(work, capsys):
    (work / "calib.py").write_text(CALIBRATION_DATA)
    code, _, err = run(_convert(work, "--calibrate-with", f"{work / 'calib.py'}:batches", "--refit-kept"), capsys)
    assert code == 0, err
    kept = convsep.load(work / "out.pt").plan.calibration["kept"]
    assert set(kept) == {"8"} and kept["8"]["refitted"] is False  # 12 images for the 9 weights of each output


@pytest.mark.parametrize("flag, refitted", [([], True), (["--no-refit-kept"], False)])
def test_convert_refits_kept_layers_by_default_and_no_refit_kept_leaves_them(work, capsys, flag, refitted):
    (work / "calib.py").write_text(CALIBRATION_DATA)
    code, _, err = run(_convert(work, "--calibrate-with", f"{work / 'calib.py'}:batches", *flag), capsys)
    assert code == 0, err
    assert ("kept" in convsep.load(work / "out.pt").plan.calibration) is refitted


def test_convert_calibration_alternate_reaches_calibrate(work, capsys):
    (work / "calib.py").write_text(CALIBRATION_DATA)
    code, _, err = run(_convert(work, "--calibrate-with", f"{work / 'calib.py'}:batches", "--calibration-alternate", "2"), capsys)
    assert code == 0, err
    assert convsep.load(work / "out.pt").plan.calibration["alternate"] == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--calibration-alternate", "2"], "--calibration-alternate needs --calibrate-with DATA and no --no-refit"),
        (["--calibration-alternate", "2", "--calibrate-with", "CALIB", "--no-refit"], "--calibration-alternate needs"),
        (["--calibration-alternate", "-1", "--calibrate-with", "CALIB"], "--calibration-alternate -1 must be 0 or more"),
        (["--refit-kept"], "--refit-kept needs --calibrate-with DATA and no --no-refit"),
        (["--refit-kept", "--calibrate-with", "CALIB", "--calibrate-at-once"], "--refit-kept and --calibrate-at-once cannot"),
    ],
)
def test_convert_calibration_alternate_without_a_refit_is_refused(extra, message, work, capsys):
    (work / "calib.py").write_text(CALIBRATION_DATA)
    extra = [f"{work / 'calib.py'}:batches" if item == "CALIB" else item for item in extra]
    code, _, err = run(_convert(work, *extra), capsys)
    assert code == 1 and message in err, err
    assert not (work / "out.pt").exists()


@pytest.mark.parametrize(
    "shape, expected",
    [
        (["--input-shape", "2,1,12,16"], {"channels": 1, "size": (12, 16)}),  # images: as the model takes them
        (["--input-shape", "2,1,12,16", "--input-shape", "2,5"], {}),  # several inputs: the source's own sizes
        ([], {}),
    ],
)
def test_calibrate_with_reads_images_at_the_input_shape(shape, expected, work, capsys, monkeypatch):
    asked = []

    def load_batches(source, **kwargs):
        asked.append((source, kwargs))
        return [torch.randn(2, 1, 12, 16)]

    monkeypatch.setattr(convsep.cli, "load_batches", load_batches)
    monkeypatch.setattr(convsep.cli, "_example_input", lambda model, shape: torch.randn(2, 1, 12, 16))
    code, _, err = run(_convert(work, "--calibrate-with", "images/", *shape), capsys)
    assert code == 0, err
    assert asked == [("images/", expected)]
    assert convsep.load(work / "out.pt").plan.calibration["batches"] == 1


def test_converting_a_converted_checkpoint_again_says_nothing_new_was_converted(work, capsys):
    assert run(_convert(work, out="once.pt"), capsys)[0] == 0
    code, _, err = run(["convert", work / "once.pt", "-o", work / "twice.pt", "--model", spec(work)], capsys)
    assert code == 0
    assert err.splitlines()[0] == (
        f"convsep: warning: {work / 'once.pt'} has no convolution convsep can convert; {work / 'twice.pt'} holds the same weights"
    )


def test_converting_only_some_layers_again_converts_the_rest_without_a_warning(work, capsys):
    assert run(_convert(work, "--include", "0.0", out="once.pt"), capsys)[0] == 0
    code, _, err = run(["convert", work / "once.pt", "-o", work / "twice.pt", "--model", spec(work)], capsys)
    assert code == 0 and "warning" not in err
    assert err.splitlines()[-1] == f"convsep: wrote {work / 'twice.pt'} (4 of 4 convolutions converted)"


def test_converting_some_layers_again_calibrates_the_new_pairs_against_the_checkpoint(work, capsys):
    (work / "calib.py").write_text(CALIBRATION_DATA)
    assert run(_convert(work, "--include", "0.0", out="once.pt"), capsys)[0] == 0
    argv = ["convert", work / "once.pt", "-o", work / "twice.pt", "--model", spec(work)]
    code, _, err = run(argv + ["--calibrate-with", f"{work / 'calib.py'}:batches"], capsys)
    assert code == 0, err
    assert set(convsep.load(work / "twice.pt").plan.calibration["layers"]) == {"1.0", "3.0", "4.0"}


def test_converting_again_with_every_other_layer_excluded_warns_that_nothing_new_converted(work, capsys):
    assert run(_convert(work, "--include", "0.0", out="once.pt"), capsys)[0] == 0
    argv = ["convert", work / "once.pt", "-o", work / "twice.pt", "--model", spec(work), "--exclude", "*"]
    code, _, err = run(argv, capsys)
    assert code == 0 and err.splitlines()[0] == (
        f"convsep: warning: no convolution of {work / 'once.pt'} was converted (reasons below); "
        f"{work / 'twice.pt'} holds the same weights"
    )


def test_converting_a_converted_checkpoint_reports_against_the_original_architecture(work, capsys):
    assert run(_convert(work, "--include", "0.0", out="once.pt"), capsys)[0] == 0
    argv = ["convert", work / "once.pt", "-o", work / "twice.pt", "--model", spec(work), "--input-shape", "1,1,28,28"]
    code, stdout, err = run(argv + ["--format", "json"], capsys)
    assert code == 0, err
    shown = json.loads(stdout)
    original = convsep.report(trained(work), trained(work), torch.randn(1, 1, 28, 28)).totals
    assert shown["totals"]["macs_before"] == original["macs_before"]  # the dense convs, not the pair of the first pass
    plan = convsep.load(work / "twice.pt").plan
    errors = {row["name"]: row["weight_error"] for row in shown["rows"]}
    assert errors == pytest.approx({d.name: d.relative_error for d in plan.converted}, rel=1e-4)  # from the plan


def test_a_pickled_converted_model_converts_the_rest(work, capsys):
    torch.save(convsep.convert(trained(work), include="0.0"), work / "whole_sep.pt")
    argv = ["convert", work / "whole_sep.pt", "-o", work / "out.pt", "--trust-pickle", "--input-shape", "1,1,28,28"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert [d.name for d in convsep.load(work / "out.pt").plan.converted] == ["0.0", "1.0", "3.0", "4.0"]


def test_convert_parametrized_keep_reaches_convert(work, capsys):
    assert run(_convert(work, "--parametrized", "keep"), capsys)[0] == 0
    assert convsep.load(work / "out.pt").plan.parametrized == "keep"


def test_convert_objective_latency_keeps_the_layers_measured_slower(work, capsys, monkeypatch):
    monkeypatch.setattr("convsep.speed.paired_medians", lambda first, second, args, runs: (1.0, 2.0))  # pairs slower
    code, _, err = run(_convert(work, "--input-shape", "1,1,28,28", "--objective", "latency"), capsys)
    assert code == 0, err
    assert "convsep: warning: no convolution of" in err
    plan = convsep.load(work / "out.pt").plan
    assert [d.reason[:32] for d in plan.layers] == ["kept for speed: the pair took 20"] * 4


def test_objective_latency_without_input_shape_is_refused(work, capsys):
    code, _, err = run(_convert(work, "--objective", "latency"), capsys)
    assert code == 1 and err == (
        "convsep: error: --objective latency needs --input-shape (like 1,3,224,224): MACs and timings depend on it\n"
    )


def test_budget_without_input_shape_is_refused(work, capsys):
    code, _, err = run(_convert(work, "--budget", "0.5"), capsys)
    assert code == 1 and "--budget on MACs needs --input-shape" in err


def test_bad_rank_for_is_a_usage_error(work, capsys):
    code, _, err = run(_convert(work, "--rank-for", "layer3"), capsys)
    assert code == 2 and "must look like GLOB=RANK" in err


# --- finetune ------------------------------------------------------------------------------

TRAIN_DATA = """
import torch

def batches():
    torch.manual_seed(1)
    return [torch.randn(8, 1, 28, 28) for _ in range(4)]

def nan_batches():
    return [torch.full((8, 1, 28, 28), float("nan"))]

def labelled():
    torch.manual_seed(2)
    return [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]

class _DiesInEpoch2:  # batches(), except that the run is killed (an error) when it asks for epoch 2's first batch

    def __init__(self):
        self.data, self.taken = batches(), 0

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        for batch in self.data:
            if self.taken == len(self.data):
                raise RuntimeError("killed")
            self.taken += 1
            yield batch

def dies_in_epoch_2():
    return _DiesInEpoch2()
"""


def _converted_checkpoint(work, capsys):
    (work / "train.py").write_text(TRAIN_DATA)
    code, _, err = run(_convert(work, out="sep.pt"), capsys)
    assert code == 0, err
    return work / "sep.pt"


def test_finetune_trains_towards_the_teacher_and_writes_a_checkpoint(work, capsys):
    sep = _converted_checkpoint(work, capsys)
    teacher = trained(work)
    student = convsep.load(sep, model=small_cnn(width=4))
    data = resolve_callable(f"{work / 'train.py'}:batches")()

    def distance(model):
        with torch.no_grad():
            return sum(float((model(x) - teacher(x)).square().mean()) for x in data)

    argv = ["finetune", sep, "-o", work / "ft.pt", "--teacher", work / "in.pt", "--model", spec(work)]
    argv += ["--data", f"{work / 'train.py'}:batches", "--epochs", "3", "--lr", "3e-3"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    tuned = convsep.load(work / "ft.pt", model=small_cnn(width=4))
    assert distance(tuned) < distance(student)
    assert convsep.load(work / "ft.pt").plan.converted


def test_finetune_with_nan_loss_fails_and_writes_nothing(work, capsys):
    sep = _converted_checkpoint(work, capsys)
    argv = ["finetune", sep, "-o", work / "ft.pt", "--teacher", work / "in.pt", "--model", spec(work)]
    code, _, err = run(argv + ["--data", f"{work / 'train.py'}:nan_batches"], capsys)
    assert code == 1 and err.startswith("convsep: error:") and len(err.strip().splitlines()) == 1, err
    assert not (work / "ft.pt").exists()


def test_finetune_passes_its_options_on(work, capsys, monkeypatch):
    sep = _converted_checkpoint(work, capsys)
    seen = {}

    def fake_finetune(model, data, **options):
        seen.update(options, data=data)
        return model

    monkeypatch.setattr(convsep.cli, "finetune", fake_finetune)
    argv = ["finetune", sep, "-o", work / "ft.pt", "--teacher", work / "in.pt", "--model", spec(work)]
    argv += ["--data", f"{work / 'train.py'}:batches", "--steps", "7", "--lr", "0.02", "--alpha", "0.25"]
    argv += ["--temperature", "4", "--optimizer", "sgd", "--device", "cpu", "--trainable", "separable"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert len(seen.pop("data")) == 4 and isinstance(seen.pop("teacher"), nn.Module)
    assert seen == {
        "epochs": 1, "steps": 7, "lr": 0.02, "alpha": 0.25, "temperature": 4.0, "optimizer": "sgd",
        "device": "cpu", "trainable": "separable", "verbose": False, "warmup": 0.05, "val_data": None,
        "val_every": None, "autocast": None, "save_state": f"{work / 'ft.pt'}.training.pt", "save_every": None,
        "resume": None,
    }  # fmt: skip


def test_finetune_rejects_bad_options_in_one_line(work, capsys):
    sep = _converted_checkpoint(work, capsys)
    argv = ["finetune", sep, "-o", work / "ft.pt", "--teacher", work / "in.pt", "--model", spec(work)]
    argv += ["--data", f"{work / 'train.py'}:batches"]
    for bad, says in ((["--alpha", "1.5"], "alpha"), (["--temperature", "0"], "temperature"), (["--device", "tpu9"], "tpu9")):
        code, _, err = run(argv + bad, capsys)
        assert code == 1 and err.startswith("convsep: error:") and says in err and len(err.strip().splitlines()) == 1, err
        assert not (work / "ft.pt").exists()


def test_finetune_data_errors_name_the_data_option(work, capsys):
    sep = _converted_checkpoint(work, capsys)
    argv = ["finetune", sep, "-o", work / "ft.pt", "--teacher", work / "in.pt", "--model", spec(work)]
    code, _, err = run(argv + ["--data", "no-colon-here"], capsys)
    assert code == 1 and "--data 'no-colon-here' is neither" in err and "--calibrate-with" not in err, err


def _finetune_argv(work, sep, out="ft.pt", data="batches"):
    return ["finetune", sep, "-o", work / out, "--teacher", work / "in.pt", "--model", spec(work),
            "--data", f"{work / 'train.py'}:{data}", "--epochs", "2", "--lr", "3e-3"]  # fmt: skip


def test_finetune_with_val_data_writes_the_history_into_the_checkpoint(work, capsys):
    sep = _converted_checkpoint(work, capsys)
    code, _, err = run(_finetune_argv(work, sep) + ["--val-data", f"{work / 'train.py'}:labelled"], capsys)
    assert code == 0, err
    record = convsep.load(work / "ft.pt").plan.finetune
    assert [r["step"] for r in record["history"]] == [0, 4, 8] and record["history"][0]["val_accuracy"] is not None
    assert "kept step" in err


def test_finetune_resume_continues_a_killed_run_to_the_uninterrupted_result(work, capsys):
    sep = _converted_checkpoint(work, capsys)
    assert run(_finetune_argv(work, sep, out="whole.pt"), capsys)[0] == 0
    with pytest.raises(RuntimeError, match="killed"):  # the job dies in epoch 2, after the state of epoch 1 was saved
        run(_finetune_argv(work, sep, data="dies_in_epoch_2"), capsys)
    assert not (work / "ft.pt").exists()
    state = work / "ft.pt.training.pt"
    code, _, err = run(_finetune_argv(work, sep) + ["--resume", state], capsys)
    assert code == 0, err
    whole, resumed = convsep.load(work / "whole.pt").state_dict, convsep.load(work / "ft.pt").state_dict
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_finetune_resume_with_the_state_of_another_model_is_one_error_and_writes_nothing(work, capsys):
    sep = _converted_checkpoint(work, capsys)
    assert run(_finetune_argv(work, sep, out="whole.pt"), capsys)[0] == 0
    state = work / "whole.pt.training.pt"
    saved = state.read_bytes()
    code, _, err = run(_convert(work, out="other.pt") + ["--rank", "2"], capsys)
    assert code == 0, err
    code, _, err = run(_finetune_argv(work, work / "other.pt") + ["--resume", state], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "training state of another model" in err, err
    assert state.read_bytes() == saved and not (work / "ft.pt").exists()


def test_a_new_finetune_run_does_not_overwrite_a_training_state_unasked(work, capsys):
    sep = _converted_checkpoint(work, capsys)
    (work / "ft.pt.training.pt").write_bytes(b"an earlier run")
    code, _, err = run(_finetune_argv(work, sep), capsys)
    assert code == 1 and "ft.pt.training.pt exists" in err
    assert (work / "ft.pt.training.pt").read_bytes() == b"an earlier run"


def test_finetune_needs_a_teacher(work, capsys):
    sep = _converted_checkpoint(work, capsys)
    code, _, err = run(["finetune", sep, "-o", work / "ft.pt", "--data", "x:y"], capsys)
    assert code == 2 and "--teacher" in err


def test_no_refit_uses_the_calibration_data_for_the_conversion_only(tmp_path):
    from convsep.cli import main as cli_main

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3)).eval()
    torch.save(model.state_dict(), tmp_path / "in.pt")
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def build():\n    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3))\n"
        "def data():\n    torch.manual_seed(1)\n    return [torch.randn(4, 3, 8, 8) for _ in range(3)]\n"
    )
    common = ["--model", f"{tmp_path / 'net.py'}:build", "--calibrate-with", f"{tmp_path / 'net.py'}:data"]
    assert cli_main(["convert", str(tmp_path / "in.pt"), "-o", str(tmp_path / "aware.pt"), *common, "--no-refit"]) == 0
    assert cli_main(["convert", str(tmp_path / "in.pt"), "-o", str(tmp_path / "refit.pt"), *common,
                     "--calibration-batches", "2"]) == 0  # fmt: skip
    aware, refit = convsep.load(tmp_path / "aware.pt").plan, convsep.load(tmp_path / "refit.pt").plan
    assert aware.init == "joint" and aware.calibration is None  # the data fits the pairs, nothing refits them after
    assert all(d.joint_fit.startswith(("fitted on the input moments", "whitened SVD: ")) for d in aware.converted)
    assert refit.init == "svd" and refit.calibration["batches"] == 2

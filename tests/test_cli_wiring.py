"""The CLI's wiring, line by line: what each command prints and exits with, and what reaches the library.

Complements test_cli.py (the commands end to end) with the exact lines, exit codes and values
that mutation testing showed no test pinned down (issue #17).
"""

import json
import warnings

import pytest
import torch
from torch import nn

from cli_support import run, spec, trained
import convsep
import convsep.cli
from convsep import distributed
from convsep.cli import main
from convsep.errors import ConvsepValueError
from convsep.models import small_cnn

FACTORIES = """
import torch
from torch import nn
from convsep.models import small_cnn

def build():
    return small_cnn(width=4)

class Picky(nn.Module):  # rejects inputs that are not 8-channel, with its own message
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3)

    def forward(self, x):
        if x.shape[1] != 8:
            raise ValueError(f"wants 8 channels, got {x.shape[1]}")
        return self.conv(x)

def picky():
    return Picky()

def interrupted():
    raise KeyboardInterrupt

class FourInputs(nn.Module):  # an image and three vectors
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, image, a, b, c):
        return self.conv(image).mean((2, 3)) + a + b + c

def four_inputs():
    return FourInputs()
"""

CALIBRATION_DATA = "import torch\n\ndef batches():\n    torch.manual_seed(3)\n    return [torch.randn(4, 1, 28, 28) for _ in range(3)]\n"

PASS_INPUT_SHAPE = "convsep: pass --input-shape (like 1,3,224,224) for MACs and FLOPs in the report"


@pytest.fixture
def work(tmp_path):
    """A folder with factories (nets.py), calibration batches (calib.py) and a state_dict of small_cnn(width=4)."""
    (tmp_path / "nets.py").write_text(FACTORIES)
    (tmp_path / "calib.py").write_text(CALIBRATION_DATA)
    torch.manual_seed(0)
    torch.save(small_cnn(width=4).eval().state_dict(), tmp_path / "in.pt")
    return tmp_path


def convert_argv(folder, *extra, out="out.pt"):
    return ["convert", folder / "in.pt", "-o", folder / out, "--model", spec(folder), *extra]


def summary_lines(before, after):
    """What `convert`/`report` print without an input shape, built from the models themselves."""
    plan = convsep.cli.plan_of(after)
    lines = (
        []
        if plan is None
        else [plan.summary(), *(f"  {d.name}: rank {d.rank} of {d.full_rank}" for d in plan.converted)]
    )
    n_before, n_after = sum(p.numel() for p in before.parameters()), sum(p.numel() for p in after.parameters())
    ratio = n_after / n_before if n_before else 1.0
    return "\n".join(lines + [f"params: {n_before:,} -> {n_after:,} ({ratio:.1%})"]) + "\n"


# --- the summary printed without an input shape ---------------------------------------------


def test_summary_lists_each_converted_layer_with_its_rank_and_the_parameter_ratio(work, capsys):
    code, stdout, err = run(convert_argv(work, "--rank", "2", "--include", "0.0", "--include", "3.0"), capsys)
    assert code == 0, err
    model = trained(work)
    expected = convsep.convert(model, rank=2, include=["0.0", "3.0"])
    assert stdout == summary_lines(model, expected)
    assert err.splitlines()[0] == PASS_INPUT_SHAPE


def test_summary_as_json_holds_the_plan_and_both_parameter_counts(work, capsys):
    assert run(convert_argv(work, "--rank", "2"), capsys)[0] == 0
    code, stdout, err = run(["report", work / "out.pt", "--model", spec(work), "--format", "json"], capsys)
    assert code == 0, err
    converted = convsep.load(work / "out.pt", model=small_cnn(width=4))
    assert json.loads(stdout) == {
        "plan": json.loads(json.dumps(converted.convsep_plan.to_dict())),  # tuples as lists
        "params_before": sum(p.numel() for p in small_cnn(width=4).parameters()),
        "params_after": sum(p.numel() for p in converted.parameters()),
    }


def test_report_of_a_pickled_converted_model_without_model_compares_it_with_itself_and_says_so(work, capsys):
    converted = convsep.convert(trained(work), rank=2)
    torch.save(converted, work / "whole_sep.pt")
    code, stdout, err = run(["report", work / "whole_sep.pt", "--trust-pickle"], capsys)
    assert code == 0, err
    assert stdout == summary_lines(converted, converted)
    assert err.splitlines() == [
        (
            f"convsep: {work / 'whole_sep.pt'} is converted and no --model names its original architecture: "
            "'before' is the model as loaded"
        ),
        PASS_INPUT_SHAPE,
    ]


def test_report_of_a_model_without_parameters(work, capsys):
    torch.save(nn.Sequential(nn.AvgPool2d(2), nn.Flatten()), work / "pool.pt")
    code, stdout, err = run(["report", work / "pool.pt", "--trust-pickle"], capsys)
    assert code == 0, err
    assert stdout == "params: 0 -> 0 (100.0%)\n"
    # with an input shape: the input is in the default dtype, as there is no parameter to take it from
    code, stdout, err = run(["report", work / "pool.pt", "--trust-pickle", "--input-shape", "1,2,4,4"], capsys)
    assert code == 0, err


# --- the example input ------------------------------------------------------------------------


def _spy_on_report(monkeypatch):
    calls = []

    class Shown:
        def render(self, fmt):
            return "the report"

    def spy(before, after, example_inputs, **options):
        calls.append((example_inputs, options))
        return Shown()

    monkeypatch.setattr(convsep.cli, "report", spy)
    return calls


def test_the_example_input_is_the_same_seeded_random_tensor_every_run(work, capsys, monkeypatch):
    calls = _spy_on_report(monkeypatch)
    for _ in range(2):
        torch.manual_seed(123)  # the global generator's state must not matter
        torch.rand(7)
        code, _, err = run(["report", work / "in.pt", "--model", spec(work), "--input-shape", "2,1,28,28"], capsys)
        assert code == 0, err
    expected = torch.randn((2, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    for x, _ in calls:
        assert torch.equal(x, expected)


def test_the_example_input_has_the_dtype_of_the_model(work, capsys):
    model = trained(work).double()
    torch.save(model, work / "double.pt")
    code, stdout, err = run(["report", work / "double.pt", "--trust-pickle", "--input-shape", "1,1,28,28"], capsys)
    assert code == 0, err
    x = torch.randn((1, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert stdout == convsep.report(model, model, x).render("table") + "\n"


def test_an_input_shape_that_does_not_fit_is_one_line_with_the_models_own_error(work, capsys):
    torch.save(convsep.cli.resolve_callable(spec(work, "picky"))().state_dict(), work / "picky.pt")
    argv = ["report", work / "picky.pt", "--model", spec(work, "picky"), "--input-shape", "1,3,9,9"]
    code, stdout, err = run(argv, capsys)
    assert code == 1 and stdout == ""
    assert err == "convsep: error: input shape 1,3,9,9 does not fit the model (ValueError: wants 8 channels, got 3)\n"


# --- loading ----------------------------------------------------------------------------------


@pytest.mark.parametrize("converted", [False, True], ids=["state_dict", "converted state_dict"])
def test_weights_without_model_is_one_line_saying_what_the_file_holds(converted, work, capsys):
    path = work / "weights.pt"
    if converted:
        convsep.save(convsep.convert(trained(work)), path)
    else:
        torch.save(trained(work).state_dict(), path)
    code, stdout, err = run(["report", path], capsys)
    what = "a converted state_dict" if converted else "a state_dict"
    assert code == 1 and stdout == ""
    assert err == (
        f"convsep: error: {path} holds weights only ({what}): pass --model package.module:factory "
        "(or path/to/file.py:factory) naming a callable that builds the original architecture\n"
    )


def test_a_bad_model_spec_is_one_line_naming_the_model_option(work, capsys):
    code, _, err = run(["report", work / "in.pt", "--model", "convsep.models.small_cnn"], capsys)
    assert code == 1
    assert err == (
        "convsep: error: --model 'convsep.models.small_cnn' must look like package.module:callable "
        "or path/to/file.py:callable\n"
    )


# --- convert's calibration options --------------------------------------------------------------


def test_convert_calibration_batches_1_calibrates_on_one_batch(work, capsys):
    argv = convert_argv(work, "--calibrate-with", f"{work / 'calib.py'}:batches", "--calibration-batches", "1")
    code, _, err = run(argv, capsys)
    assert code == 0, err
    calibration = convsep.load(work / "out.pt").plan.calibration
    assert (calibration["batches"], calibration["samples"]) == (1, 4)


def test_convert_calibration_batches_0_is_refused_in_one_line(work, capsys):
    argv = convert_argv(work, "--calibrate-with", f"{work / 'calib.py'}:batches", "--calibration-batches", "0")
    code, _, err = run(argv, capsys)
    assert code == 1 and not (work / "out.pt").exists()
    assert err == "convsep: error: --calibration-batches 0 must be a positive number of batches\n"


def test_convert_calibration_batches_without_calibrate_with_is_refused(work, capsys):
    code, _, err = run(convert_argv(work, "--calibration-batches", "2"), capsys)
    assert code == 1 and not (work / "out.pt").exists()
    assert err == "convsep: error: --calibration-batches needs --calibrate-with DATA: the batches to calibrate on\n"


def test_convert_allocate_by_weights_reaches_the_budget(work, capsys):
    # with --calibrate-with, 'auto' would weigh the ranks by activations: 'weights' must get through
    argv = convert_argv(
        work, "--calibrate-with", f"{work / 'calib.py'}:batches", "--budget", "0.5", "--budget-on", "params"
    )
    code, _, err = run(argv + ["--allocate-by", "weights"], capsys)
    assert code == 0, err
    assert convsep.load(work / "out.pt").plan.budget["allocated_by"] == "weights"


def test_calibrate_with_for_a_model_of_four_inputs_leaves_the_sizes_to_the_source(work, capsys, monkeypatch):
    # four input shapes are not one 4-d image shape: no channels and size for an image folder
    asked = []

    def load_batches(source, **kwargs):
        asked.append(kwargs)
        raise ConvsepValueError("only what was asked matters here")

    monkeypatch.setattr(convsep.cli, "load_batches", load_batches)
    torch.save(convsep.cli.resolve_callable(spec(work, "four_inputs"))().state_dict(), work / "four.pt")
    argv = ["convert", work / "four.pt", "-o", work / "out.pt", "--model", spec(work, "four_inputs")]
    argv += ["--calibrate-with", "images/", "--input-shape", "2,1,6,6"] + ["--input-shape", "2,4"] * 3
    code, _, err = run(argv, capsys)
    assert (code, err, asked) == (1, "convsep: error: only what was asked matters here\n", [{}])


# --- demo -------------------------------------------------------------------------------------


def test_demo_feeds_a_colour_model_one_224_pixel_rgb_image(capsys):
    code, stdout, err = run(["demo", "--model", "mobilenet_v1"], capsys)
    assert code == 0, err
    assert stdout.splitlines()[0] == "mobilenet_v1 (random weights), rank=1, input 1,3,224,224"


def test_demo_passes_latency_on_and_reports_against_the_original_weights(capsys, monkeypatch):
    calls = _spy_on_report(monkeypatch)
    code, _, err = run(["demo", "--model", "small_cnn", "--latency"], capsys)
    assert code == 0, err
    (x, options), *_ = calls
    assert x.shape == (1, 1, 28, 28) and options == {"latency": True, "original_weights": True}


# --- warnings, interrupts, closed pipes, exit codes ----------------------------------------------


@pytest.mark.parametrize(
    "message, shown",
    [("first line\nsecond line", "first line"), ("   ", "UserWarning"), ("", "UserWarning")],
    ids=["multi-line", "blank", "empty"],
)
def test_a_warning_is_one_line_and_an_empty_one_shows_its_category(message, shown, work, capsys, monkeypatch):
    real_convert = convsep.cli.convert

    def warning_convert(*args, **kwargs):
        warnings.warn(message, UserWarning)
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(convsep.cli, "convert", warning_convert)
    code, _, err = run(convert_argv(work), capsys)
    assert code == 0, err
    assert err.splitlines()[0] == f"convsep: warning: {shown}"


def test_an_interrupt_exits_130_with_one_line(work, capsys):
    code, stdout, err = run(["report", work / "in.pt", "--model", spec(work, "interrupted")], capsys)
    assert (code, stdout, err) == (130, "", "convsep: interrupted\n")


class _ClosedPipe:
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_stdout_exits_1_without_a_word(work, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdout", _ClosedPipe())
    code = main(["report", str(work / "in.pt"), "--model", spec(work)])
    assert code == 1
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("fails", [False, True])
def test_main_leaves_the_process_group_it_joined(fails, work, capsys, monkeypatch):
    left = []
    monkeypatch.setattr(distributed, "init_from_environment", lambda: True)
    monkeypatch.setattr(distributed, "shutdown", lambda: left.append(True))
    path = work / ("missing.pt" if fails else "in.pt")
    code, _, _ = run(["report", path, "--model", spec(work)], capsys)
    assert (code, left) == (int(fails), [True])


# Under torchrun every process runs main(); rank 0 speaks for all. Simulated here by making this
# process a rank other than 0 (tests/test_distributed.py runs the real thing).


def _fail_on_every_rank(*args, **kwargs):
    error = ConvsepValueError("rank 1: the calibration batches are empty")
    setattr(error, distributed.SHARED, True)  # what distributed.together() marks an error every rank raised
    raise error


@pytest.mark.parametrize(
    "rank_0, shared, printed",
    [(True, True, True), (False, False, True), (False, True, False)],
    ids=["rank 0 prints an error of every rank", "rank 1 prints its own error", "rank 1 leaves a shared one to rank 0"],
)
def test_an_error_is_printed_once_by_rank_0_or_by_the_rank_that_alone_raised_it(
    rank_0, shared, printed, work, capsys, monkeypatch
):
    monkeypatch.setattr(distributed, "is_main", lambda: rank_0)
    if shared:
        monkeypatch.setattr(convsep.cli, "convert", _fail_on_every_rank)
        message = "rank 1: the calibration batches are empty"
        argv = convert_argv(work)
    else:
        message = f"{work / 'missing.pt'}: no such file"
        argv = ["convert", work / "missing.pt", "-o", work / "out.pt", "--model", spec(work)]
    code, stdout, err = run(argv, capsys)
    assert code == 1 and stdout == ""
    assert err == (f"convsep: error: {message}\n" if printed else "")

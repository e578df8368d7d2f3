"""The command line and the Python API agree: an option left out means what the keyword left out means."""

import inspect

import pytest

import convsep
from convsep.cli import build_parser

# CLI option (argparse dest) -> keyword of the Python function it is passed to, where the names differ.
CONVERT_KEYWORDS = {"calibrate_with": "calibration_data", "refit_kept": "calibration_refit_kept"}


def parsed_defaults(*argv):
    return vars(build_parser().parse_args(list(argv)))


def keyword_defaults(function):
    return {
        name: parameter.default
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }


@pytest.mark.parametrize(
    "argv, function, shared",
    [
        (
            ["convert", "in.pt", "-o", "out.pt"],
            convsep.convert,
            ["rank", "budget", "budget_on", "objective", "calibrate_with", "calibration_batches", "calibration_sequential", "calibration_alternate",
             "refit_kept",
             "init",
             "allocate_by", "refit", "parametrized", "include", "exclude"],
        ),
        (
            ["finetune", "in.pt", "-o", "out.pt", "--teacher", "t.pt", "--data", "d:f"],
            convsep.finetune,
            ["epochs", "steps", "lr", "alpha", "temperature", "optimizer", "device", "trainable", "warmup", "val_every",
             "autocast", "save_every", "resume"],
        ),
    ],
)  # fmt: skip
def test_every_option_left_out_means_the_python_default(argv, function, shared):
    cli, python = parsed_defaults(*argv), keyword_defaults(function)
    assert {name: cli[name] for name in shared} == {name: python[CONVERT_KEYWORDS.get(name, name)] for name in shared}


def test_the_demo_and_report_options_left_out():
    demo = parsed_defaults("demo")
    assert {key: demo[key] for key in ("model", "rank", "latency")} == {
        "model": "resnet18",
        "rank": 1,
        "latency": False,
    }
    report = parsed_defaults("convert", "in.pt", "-o", "out.pt")
    assert {key: report[key] for key in ("input_shape", "format", "latency", "trust_pickle", "model")} == {
        "input_shape": None,
        "format": "table",
        "latency": False,
        "trust_pickle": False,
        "model": None,
    }

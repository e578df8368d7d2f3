import pytest

import convsep
from convsep.cli import main


def test_demo_converts_a_built_in_model(capsys):
    assert main(["demo", "--model", "small_cnn"]) == 0
    out = capsys.readouterr().out
    assert "converted 4 of 4 convolutions" in out and "params:" in out


def test_demo_full_rank_is_exact(capsys):
    assert main(["demo", "--model", "small_cnn", "--rank", "full"]) == 0
    error = float(capsys.readouterr().out.rsplit(":", 1)[1])
    assert error < 1e-5


def test_version(capsys):
    assert main(["--version"]) == 0
    assert convsep.__version__ in capsys.readouterr().out


def test_bad_rank_is_one_line_and_exit_1(capsys):
    assert main(["demo", "--model", "small_cnn", "--rank", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("convsep: error: rank=0") and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["demo", "--rank", "abc"], ["nonsense"], []])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err

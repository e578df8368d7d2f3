"""The mutmut commands in the README and benchmarks/results/mutation.md name mutants that exist: each glob's
module is in convsep and, where the glob names functions (`convsep.mod.x_name*`), the module defines one whose name
starts so."""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GLOB = re.compile(r'"(convsep\.[a-z_]+)\.(?:\*|x_([A-Za-z0-9_]+?)(?:__mutmut_)?\*)"')


def mutant_globs():
    for doc in ("README.md", "benchmarks/results/mutation.md"):
        text = (ROOT / doc).read_text()
        for command in re.findall(r"mutmut run [^`\n]*(?:\n[^`\n]*)*?(?:--max-children \d|`)", text):
            for module, function in GLOB.findall(command):
                yield pytest.param(module, function, id=f"{doc}:{module}.{function or '*'}")


@pytest.mark.parametrize("module, function", list(mutant_globs()))
def test_each_mutmut_glob_names_code_that_exists(module, function):
    loaded = importlib.import_module(module)
    if function:
        assert any(name.startswith(function) for name in vars(loaded)), f"{module} has no {function}*: no mutant"


def test_the_globs_were_found():
    assert {(m, f) for m, f in (p.values for p in mutant_globs())} >= {
        ("convsep.least_squares", "_ridge_solve"),
        ("convsep.cli", "_convert"),
        ("convsep.speed", ""),
    }

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # so tests can `import zoo`

from zoo import ARCHITECTURES  # noqa: E402

# pytest.importorskip's reason; a test skipped for want of a package did not test anything.
MISSING_PACKAGE = "could not import"


@pytest.fixture(params=sorted(ARCHITECTURES))
def architecture(request):
    """(name, model in eval mode, example input), seeded so every run sees the same weights."""
    torch.manual_seed(0)
    factory, shape = ARCHITECTURES[request.param]
    return request.param, factory().eval(), torch.randn(shape)


def _fail_missing_package_skips_in_ci(report):
    """Under CI every package a test imports is installed (the `test` extra), so a skip for a missing
    one means the install step is broken: fail, naming the package, instead of passing quietly."""
    if not (os.environ.get("CI") and report.skipped and isinstance(report.longrepr, tuple)):
        return
    reason = report.longrepr[2]
    if MISSING_PACKAGE in reason:
        report.outcome = "failed"
        report.longrepr = f"{reason}\nCI=1: every package a test imports must come from the `test` extra in pyproject.toml"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_missing_package_skips_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_missing_package_skips_in_ci(outcome.get_result())

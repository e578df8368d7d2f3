import pytest

from convsep.imports import resolve_callable


def test_module_and_file_specs(tmp_path):
    assert resolve_callable("convsep.models:resnet18").__name__ == "resnet18"
    (tmp_path / "factory.py").write_text("def build():\n    return 42\n")
    assert resolve_callable(f"{tmp_path}/factory.py:build")() == 42


@pytest.mark.parametrize(
    "spec, match",
    [
        ("convsep.models", "must look like"),
        ("no_such_package_xyz:f", "cannot import 'no_such_package_xyz'"),
        ("convsep.models:nothing", "has no attribute 'nothing'"),
        ("convsep.models:ZOO", "dict, which is not callable"),
        ("missing/file.py:f", "no such file"),
    ],
)
def test_bad_specs_name_the_problem(spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_callable(spec)

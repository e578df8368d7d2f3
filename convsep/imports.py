"""Resolving "package.module:callable" and "path/to/file.py:callable" strings (the uvicorn convention).

The CLI names model factories and data sources this way.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable

from .errors import ConvsepValueError


def resolve_callable(spec: str, what: str = "--model") -> Callable:
    """The callable named by `spec`; a clear error naming `spec` when it cannot be found."""
    module_part, sep, attr_path = spec.rpartition(":")
    if not sep or not module_part or not attr_path:
        raise ConvsepValueError(f"{what} {spec!r} must look like package.module:callable or path/to/file.py:callable")
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        module = _load_file(Path(module_part), spec, what)
    else:
        try:
            module = importlib.import_module(module_part)
        except Exception as error:  # an import runs user code: anything can go wrong there
            raise ConvsepValueError(f"{what} {spec!r}: cannot import {module_part!r} ({type(error).__name__}: {error})") from None
    target = module
    for attr in attr_path.split("."):
        if not hasattr(target, attr):
            raise ConvsepValueError(f"{what} {spec!r}: {module_part!r} has no attribute {attr_path!r}")
        target = getattr(target, attr)
    if not callable(target):
        raise ConvsepValueError(f"{what} {spec!r} names a {type(target).__name__}, which is not callable")
    return target


def _load_file(path: Path, spec: str, what: str):
    if not path.is_file():
        raise ConvsepValueError(f"{what} {spec!r}: no such file {str(path)!r}")
    name = f"_convsep_user_{path.stem}_{abs(hash(path.resolve()))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # so pickling and dataclasses inside the file work
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise ConvsepValueError(f"{what} {spec!r}: running {str(path)!r} failed ({type(error).__name__}: {error})") from None
    return module

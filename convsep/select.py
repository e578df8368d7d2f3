"""Which convolutions qualify for conversion, and why the others do not.

Selection by the user (include / exclude: glob patterns on qualified names, or a
callable `(name, module) -> bool`) and by the layer itself: 1x1 and depthwise convs
gain nothing, and a subclass that overrides `forward` computes something a plain
pair would not reproduce, so it is only converted when the user names it. A conv whose
weight is computed (weight norm, spectral norm) converts from its effective weight unless
the user asks to keep it (see parametrized.py).
"""

from __future__ import annotations

import fnmatch
import math
from typing import Callable, Iterable, Optional, Union

from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.lazy import LazyModuleMixin

from .errors import ConvsepTypeError
from .parametrized import parametrization
from .standin import STANDARD_CONVS
from .warn import warn_user

Patterns = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]


def _as_matcher(patterns: Patterns, keyword: str):
    if patterns is None:
        return None
    if callable(patterns):
        return patterns
    if isinstance(patterns, str):
        patterns = [patterns]
    try:
        patterns = list(patterns)
    except TypeError:
        raise ConvsepTypeError(
            f"{keyword}={patterns!r} must be a glob pattern, a list of them, or a callable (name, module) -> bool"
        ) from None
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ConvsepTypeError(f"{keyword} holds {pattern!r}, which is not a string pattern")
    return patterns


class LayerFilter:
    """include / exclude, with a record of which string patterns matched something."""

    def __init__(self, include: Patterns = None, exclude: Patterns = None) -> None:
        self.include = _as_matcher(include, "include")
        self.exclude = _as_matcher(exclude, "exclude")
        self._hits: set[str] = set()

    def _matches(self, matcher, name: str, module: nn.Module) -> Optional[str]:
        if callable(matcher):
            return "callable" if matcher(name, module) else None
        for pattern in matcher:
            if fnmatch.fnmatchcase(name, pattern):
                self._hits.add(pattern)
                return pattern
        return None

    def why_not(self, name: str, module: nn.Module) -> tuple[Optional[str], bool]:
        """(reason the user's filters reject the layer or None, whether the user named it explicitly)."""
        excluded = self.exclude is not None and self._matches(self.exclude, name, module)
        included = self.include is None or self._matches(self.include, name, module)
        if excluded:
            return f"excluded by {'exclude callable' if excluded == 'callable' else repr(excluded)}", False
        if not included:
            return "not matched by include", False
        return None, self.include is not None

    def warn_unmatched(self) -> None:
        for keyword, matcher in (("include", self.include), ("exclude", self.exclude)):
            if matcher is None or callable(matcher):
                continue
            for pattern in matcher:
                if pattern not in self._hits:
                    warn_user(
                        f"{keyword} pattern {pattern!r} matched no convolution; check the names with model.named_modules()",
                    )


def _overrides_forward(module: nn.Module) -> Optional[str]:
    for cls in type(module).__mro__:
        if cls in STANDARD_CONVS or cls is _ConvNd:
            return None
        if "forward" in vars(cls) or "_conv_forward" in vars(cls):
            return cls.__name__
    return None


def is_candidate(module: nn.Module) -> bool:
    """Convolutions that get a row in the plan (converted or not)."""
    return isinstance(module, _ConvNd)


def layer_why_not(module: nn.Module, explicit: bool, parametrized: str = "fold") -> Optional[str]:
    """Why this convolution cannot (or should not) become a depthwise + pointwise pair; None if it can.

    parametrized: "fold" converts convs whose weight is computed (weight norm, ...) from its
    effective value; "keep" leaves them as they are.
    """
    if isinstance(module, _ConvTransposeNd):
        return "transposed convolution (not supported)"
    if not isinstance(module, STANDARD_CONVS):
        return f"{type(module).__name__} is not a standard convolution"
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return "lazy convolution not yet initialised: run one forward pass first"
    computed_by = parametrization(module)
    if computed_by and parametrized == "keep":
        return f"weight is computed by {computed_by}: kept as it is by parametrized='keep'"
    custom = _overrides_forward(module)
    if custom and not explicit:
        return f"{custom} overrides forward, so a plain pair may compute something else; name it in include to convert"
    return conv_why_not(module.in_channels, module.kernel_size, module.groups)


def conv_why_not(in_channels: int, kernel_size, groups: int) -> Optional[str]:
    if math.prod(kernel_size) == 1:
        return "kernel has 1 element (already pointwise)"
    if groups == in_channels and in_channels > 1:
        return "already depthwise (groups == in_channels)"
    return None

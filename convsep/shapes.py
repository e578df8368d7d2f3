"""Example input shapes, as the CLI reads them and checkpoints record them.

A model with one input has one shape, a tuple of ints: (1, 3, 224, 224). A model with several
inputs has a tuple of such shapes, one per positional argument: ((1, 3, 224, 224), (1, 10)).
As text (the CLI, safetensors metadata) a shape is "1,3,224,224" and several are joined by ";".
"""

from __future__ import annotations

import operator
from typing import Any, Optional, Union

from .errors import ConvsepValueError

Shape = tuple[int, ...]
InputShape = Union[Shape, tuple[Shape, ...]]

EXAMPLE = "1,3,224,224"


def several(shape: InputShape) -> bool:
    """True for the shapes of a model with several inputs."""
    return bool(shape) and isinstance(shape[0], (tuple, list))


def shapes_of(shape: InputShape) -> tuple[Shape, ...]:
    """One shape per input."""
    return tuple(shape) if several(shape) else (shape,)


def normalise(shape: Any) -> Optional[InputShape]:
    """A shape given in Python (ints, or sequences of ints for several inputs) as tuples; None stays None."""
    if shape is None:
        return None
    try:
        per_input = [_ints(s) for s in shape] if several(tuple(shape)) else [_ints(shape)]
    except TypeError:
        per_input = []
    if not per_input or not all(s and min(s) >= 1 for s in per_input):
        raise ConvsepValueError(
            f"input_shape={shape!r} is not an input shape: give positive ints like (1, 3, 224, 224), "
            "or one such tuple per input for a model with several inputs"
        )
    return tuple(per_input) if several(tuple(shape)) else per_input[0]


def _ints(sizes: Any) -> Shape:
    """Sizes as Python ints: ints, numpy integers and torch.Size pass; floats and bools do not."""
    if isinstance(sizes, (str, bytes)) or any(isinstance(n, bool) for n in sizes):
        raise TypeError("not sizes")
    return tuple(operator.index(n) for n in sizes)


def to_text(shape: InputShape) -> str:
    return ";".join(",".join(map(str, s)) for s in shapes_of(shape))


def from_text(text: str) -> InputShape:
    """'1,3,224,224' -> (1, 3, 224, 224); '1,3,32,32;1,10' -> ((1, 3, 32, 32), (1, 10))."""
    parsed = []
    for part in text.split(";"):
        try:
            shape = tuple(int(n.strip()) for n in part.split(","))
        except ValueError:
            shape = ()
        if not shape or any(n < 1 for n in shape):
            raise ConvsepValueError(
                f"{text!r} is not an input shape: write positive ints separated by commas, like {EXAMPLE}"
            )
        parsed.append(shape)
    return parsed[0] if len(parsed) == 1 else tuple(parsed)


def to_record(shape: Optional[InputShape]) -> Optional[list]:
    """For a torch.save dict: a list of ints, or a list of such lists."""
    if shape is None:
        return None
    return [list(s) for s in shape] if several(shape) else list(shape)

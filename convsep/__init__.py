"""convsep: turn the standard convolutions of a trained PyTorch model into depthwise-separable ones."""

from .calibrate import calibrate
from .convert import convert
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConvsepError,
    ConvsepTypeError,
    ConvsepValueError,
    InputShapeError,
    MissingExtraError,
)
from .layers import SeparableConv1d, SeparableConv2d, SeparableConv3d
from .plan import ConversionPlan, LayerDecision
from .version import __version__

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConversionPlan",
    "ConvsepError",
    "ConvsepTypeError",
    "ConvsepValueError",
    "InputShapeError",
    "LayerDecision",
    "MissingExtraError",
    "SeparableConv1d",
    "SeparableConv2d",
    "SeparableConv3d",
    "__version__",
    "calibrate",
    "convert",
]

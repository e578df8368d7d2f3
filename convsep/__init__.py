"""convsep: turn the standard convolutions of a trained PyTorch model into depthwise-separable ones."""

from .convert import convert
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConvsepError,
    ConvsepTypeError,
    ConvsepValueError,
    InputShapeError,
    NonFiniteLossError,
)
from .finetune import finetune
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
    "NonFiniteLossError",
    "SeparableConv1d",
    "SeparableConv2d",
    "SeparableConv3d",
    "__version__",
    "convert",
    "finetune",
]

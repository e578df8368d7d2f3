"""convsep: turn the standard convolutions of a trained PyTorch model into depthwise-separable ones."""

from .calibrate import calibrate
from .checkpoint import Checkpoint, load, save
from .convert import convert
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConvsepError,
    ConvsepTypeError,
    ConvsepValueError,
    InputShapeError,
    NonFiniteLossError,
    OptionalDependencyError,
    ReadOnlyAttributeError,
)
from .finetune import finetune
from .layers import SeparableConv1d, SeparableConv2d, SeparableConv3d
from .plan import ConversionPlan, LayerDecision
from .report import Report, report
from .version import __version__

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConversionPlan",
    "ConvsepError",
    "ConvsepTypeError",
    "ConvsepValueError",
    "InputShapeError",
    "LayerDecision",
    "NonFiniteLossError",
    "OptionalDependencyError",
    "ReadOnlyAttributeError",
    "Report",
    "SeparableConv1d",
    "SeparableConv2d",
    "SeparableConv3d",
    "__version__",
    "calibrate",
    "convert",
    "finetune",
    "load",
    "report",
    "save",
]

"""The exceptions convsep raises on bad input.

One base class, so callers can catch everything of ours at once, and subclasses
that also derive from the matching built-in, so `except ValueError` keeps working.
"""


class ConvsepError(Exception):
    """Base class of every error convsep raises on purpose."""


class ConvsepValueError(ConvsepError, ValueError):
    """A value is of the right type but not usable (a rank of 0, an unknown init, ...)."""


class ConvsepTypeError(ConvsepError, TypeError):
    """A value is of the wrong type (a model that is not an nn.Module, ...)."""


class ReadOnlyAttributeError(ConvsepError, AttributeError):
    """An attribute that cannot be set: a pair's conv attributes (stride, weight, ...) are read-only."""


class CheckpointError(ConvsepError, ValueError):
    """A file exists but is not a checkpoint convsep can use."""


class CheckpointNotFoundError(ConvsepError, FileNotFoundError):
    """A checkpoint path does not exist or is not a file."""


class InputShapeError(ConvsepError, ValueError):
    """Example inputs do not fit the model."""


class OptionalDependencyError(ConvsepError, ImportError):
    """A feature needs an optional extra that is not installed (the message names it)."""


class NonFiniteLossError(ConvsepError, FloatingPointError):
    """Training met a NaN or infinite loss or gradient and stopped before applying it."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name if the message is empty), for one-line reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def error_summary(error: BaseException) -> str:
    """'TypeError: first line of the message', or just the type name if the message is empty."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__

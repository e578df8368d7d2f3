"""Writing files so that a failure never leaves a half-written one: checkpoints, and benchmark results."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

from .errors import CheckpointError


def write_atomically(path: Union[str, os.PathLike], write: Callable[[str], object]) -> Path:
    """Call write(temp_name) for a temporary file beside `path`, then move it into place.

    A failure leaves nothing behind (never a half-written file); an OSError becomes CheckpointError
    naming `path`. Returns `path`.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise CheckpointError(f"cannot write {path}: {error.strerror or error}") from None
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual permissions
        os.replace(tmp, path)
        return path
    except BaseException as error:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(error, OSError):
            raise CheckpointError(f"cannot write {path}: {error.strerror or error}") from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

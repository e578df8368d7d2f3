"""Warnings that point at the user's line, however deep inside convsep they are raised."""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_user(message: str) -> None:
    """warnings.warn(message) attributed to the first caller outside convsep.

    A fixed stacklevel is right for one call path only: calibrate's warnings are raised three
    frames deep when the user calls calibrate and four when convert calls it for them.
    (Python 3.12's skip_file_prefixes does the same; convsep supports 3.10.)
    """
    frame, level = sys._getframe(1), 2  # level 2: the frame that called warn_user
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)

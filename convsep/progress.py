"""Progress bars for the long loops (calibration, fine-tuning), only when asked for and seen.

tqdm is an optional extra (`progress`): without it, or when stderr is not a terminal
(logs, CI), there is no bar and callers get None.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Optional

log = logging.getLogger(__name__)


def progress_bar(total: Optional[int], verbose: bool, desc: str, unit: str, leave: bool = True) -> Optional[Any]:
    """A tqdm bar on stderr if verbose and stderr is a terminal and tqdm is installed; None otherwise."""
    if not verbose or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        log.debug("tqdm is not installed (pip install 'convsep[progress]'): no progress bar")
        return None
    return tqdm(total=total or None, desc=desc, unit=unit, leave=leave, file=sys.stderr, dynamic_ncols=True)

"""Process lifetime of a stage: a stage's processes never outlive the process that started them.

A leaf module (no medkd imports): the stage runner calls it for itself, the notebook kernel
(through `open_stage`) for the kernel.
"""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send `sig` to this process when its parent exits (no orphans training on).

    Returns False where the platform has no such request (then nothing changes).
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0

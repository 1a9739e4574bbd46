"""Processes that die with their parent: a rank with its launcher, a rank's helper process with its rank.

Linux's ``PR_SET_PDEATHSIG`` makes the kernel signal a process when the thread that started it exits, however
it exits (``kill -9`` included). Without it a killed launcher leaves its ranks training as orphans, and a
killed rank leaves its helpers (Megatron's checkpoint writer) alive for hours, re-parented to init.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None) -> None:
    """SIGKILL this process when its parent exits. ``parent_pid``: the parent it was started by; when that one
    is already gone (it died before this call), exit now. A no-op outside Linux."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)

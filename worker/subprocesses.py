"""Children that die with the process that started them, however it dies."""

from __future__ import annotations

import ctypes
import functools
import os
import signal
from collections.abc import Callable
from typing import Final

_PR_SET_PDEATHSIG: Final = 1
# Loaded now: a forked child must not dlopen between fork and exec.
_LIBC: Final = ctypes.CDLL(None, use_errno=True)


def _die_with_parent(parent: int) -> None:  # runs in the child between fork and exec
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def die_with_this_process() -> Callable[[], None]:
    """A `preexec_fn` that has the kernel SIGKILL the child when this process dies.

    (Strictly: when the thread that forks it exits; start children from a thread that
    lives as long as they should, such as the main thread or the event loop's.)
    """
    return functools.partial(_die_with_parent, os.getpid())

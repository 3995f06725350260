"""Children that die with the process that started them, however it dies.

The kernel sends a child its parent-death signal (PR_SET_PDEATHSIG) when the thread that
forked it exits; the child has to ask for it itself. Two ways:

- `spawn`, for the builds: `setpriv --pdeathsig KILL` asks and then execs the command, so
  Python can start the child with vfork. From a worker holding a few hundred MB, a fork
  with `preexec_fn` took 4.2 ms per build and this 0.8 ms (`bench/bench_overhead.py`).
  A parent killed before setpriv's prctl (while setpriv starts: about a millisecond after
  the vfork, longer on a busy host) leaves that one child running to its end; its re-run
  on another worker builds the same request.
- `die_with_this_process`, a `preexec_fn` for the few children started outside the event
  loop (services, test fleets), and for `spawn` where setpriv is missing.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import os
import shutil
import signal
from collections.abc import Callable, Mapping
from typing import Any, Final

_PR_SET_PDEATHSIG: Final = 1
# Loaded now: a forked child must not dlopen between fork and exec.
_LIBC: Final = ctypes.CDLL(None, use_errno=True)
_SETPRIV: Final = shutil.which("setpriv")


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


async def spawn(program: str, *args: str, **options: Any) -> asyncio.subprocess.Process:
    """`asyncio.create_subprocess_exec(program, *args, **options)`, the child SIGKILLed
    when this process dies. A program that cannot be run raises OSError, as there."""
    if _SETPRIV is None:
        return await asyncio.create_subprocess_exec(
            program, *args, preexec_fn=die_with_this_process(), **options
        )
    env: Mapping[str, str] = options.get("env") or os.environ
    # setpriv would report it only as an exit code: find it first, as exec would.
    if shutil.which(program, path=env.get("PATH", os.defpath)) is None:
        raise FileNotFoundError(errno.ENOENT, "no such executable", program)
    return await asyncio.create_subprocess_exec(
        _SETPRIV, "--pdeathsig", "KILL", "--", program, *args, **options
    )

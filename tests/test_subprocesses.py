"""A child started with `spawn` dies with the process that started it, with setpriv and
without it, and a program that cannot be run fails as `exec` would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from worker import subprocesses
from worker.subprocesses import spawn

pytestmark = pytest.mark.timeout(60)

# A parent that spawns `sleep`, says the child's pid, and waits to be killed.
_PARENT = """
import asyncio, sys
from worker import subprocesses
if sys.argv[1] == "without-setpriv":
    subprocesses._SETPRIV = None
async def main():
    child = await subprocesses.spawn("sleep", "300")
    print(child.pid, flush=True)
    await asyncio.sleep(300)
asyncio.run(main())
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait_for_exec(pid: int, command: str) -> None:
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/comm").read_text().strip() != command:
        assert time.monotonic() < deadline, f"{pid} never ran {command}"
        time.sleep(0.005)


@pytest.mark.parametrize("way", ["with-setpriv", "without-setpriv"])
def test_a_spawned_child_dies_with_its_sigkilled_parent(way: str) -> None:
    if way == "with-setpriv":
        assert subprocesses._SETPRIV is not None  # the setup installs util-linux
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, way], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    _wait_for_exec(child, "sleep")  # setpriv asks for the signal before it execs the command
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive


async def test_a_spawned_program_runs_with_its_arguments_and_environment() -> None:
    child = await spawn(
        "sh", "-c", 'echo "$1 $GREETING"', "sh", "hello",
        env={"PATH": "/usr/bin:/bin", "GREETING": "world"},
        stdout=subprocess.PIPE,
    )  # fmt: skip
    out, _ = await child.communicate()
    assert (child.returncode, out) == (0, b"hello world\n")


async def test_a_missing_program_raises_as_exec_would() -> None:
    with pytest.raises(FileNotFoundError, match="no-such-builder"):
        await spawn("no-such-builder", "--version", env={"PATH": "/usr/bin:/bin"})

"""Headless Chromium (Debian's `chromium`, installed by scripts/setup): a page as a person
sees it, after its scripts ran, as a screenshot and as the rendered DOM; or a live page
driven over the DevTools protocol (`open_page`), watched as it changes.

The flags are the ones known to work on these machines: no sandbox (root), no GPU, and no
background networking (the network is closed; without them Chromium retries its own
connections at every start). Each call gets a fresh profile.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parent.parent
RENDER_BUDGET_MS: Final = 8000
"""Virtual time the page's scripts get before the capture (fetches included)."""
_FLAGS: Final = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    f"--virtual-time-budget={RENDER_BUDGET_MS}",
)


def artifacts_dir() -> Path:
    """Where tests keep what a person may want to look at (`$BUILDFLEET_TEST_ARTIFACTS`,
    else .tmp/artifacts in the repository)."""
    path = Path(os.environ.get("BUILDFLEET_TEST_ARTIFACTS") or REPO / ".tmp" / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _chromium(*args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium")
    assert binary, "chromium not found: scripts/setup installs Debian's chromium"
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run(
            [binary, *_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def rendered_dom(url: str) -> str:
    """The page's DOM once its scripts have run."""
    result = _chromium("--dump-dom", url)
    assert result.returncode == 0, f"chromium --dump-dom {url} failed:\n{result.stderr[-3000:]}"
    return result.stdout


def screenshot(url: str, path: Path, *, size: tuple[int, int] = (1400, 900)) -> Path:
    """A PNG of the page at `size`."""
    result = _chromium(f"--window-size={size[0]},{size[1]}", f"--screenshot={path}", url)
    assert result.returncode == 0, f"chromium --screenshot {url} failed:\n{result.stderr[-3000:]}"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return path


class DevToolsError(Exception):
    """The browser answered a DevTools command with an error, or a page script threw."""


class Page:
    """One tab of a headless Chromium, driven over the DevTools protocol on a pipe
    (`--remote-debugging-pipe`: JSON messages ended by NUL, read from fd 4, written to fd 3
    of the browser): no port, no WebSocket. The page stays loaded between calls, so a test
    sees it change by itself (no reload). Every request the page sends is kept in
    `requests` (the DevTools `Network.requestWillBeSent` request objects)."""

    def __init__(self, process: subprocess.Popen[bytes], to_browser: int, from_browser: int):
        self.process = process
        self.requests: list[dict[str, Any]] = []
        self._to, self._from = to_browser, from_browser
        self._buffer = b""
        self._next_id = 0
        self._session: str | None = None

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 60) -> Any:
        """Send one command (to the page once attached) and return its result."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if self._session is not None:
            message["sessionId"] = self._session
        os.write(self._to, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._receive(deadline - time.monotonic())
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise DevToolsError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            if answer.get("method") == "Network.requestWillBeSent":
                self.requests.append(answer["params"]["request"])

    def _receive(self, timeout: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from], [], [], max(0.0, timeout))
            chunk = os.read(self._from, 1 << 20) if ready else b""
            if not chunk:
                raise DevToolsError(f"no answer from the browser (exit code {self.process.poll()})")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        answer: dict[str, Any] = json.loads(message)
        return answer

    def open(self, url: str, size: tuple[int, int]) -> None:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
        self._session = attached["sessionId"]
        self.call("Network.enable")
        width, height = size
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        self.call("Emulation.setDeviceMetricsOverride", metrics)
        self.call("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        params = {"expression": expression, "returnByValue": True, "awaitPromise": True}
        answer = self.call("Runtime.evaluate", params)
        if "exceptionDetails" in answer:
            raise DevToolsError(f"{expression}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def wait_for(self, expression: str, *, timeout: float = 60.0, what: str = "") -> Any:
        """Polls `expression` until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except DevToolsError:
                value = None  # the page is still loading
            if value:
                return value
            if time.monotonic() > deadline:
                body = self.evaluate("document.body ? document.body.innerText : ''")
                raise AssertionError(f"timed out waiting for {what or expression}; page:\n{body}")
            time.sleep(0.1)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))
        return path


_ON_FDS_3_AND_4: Final = """
import fcntl, os, sys
read, write = (fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:3])
os.dup2(read, 3)
os.dup2(write, 4)
os.execv(sys.argv[3], sys.argv[3:])
"""
"""Puts two inherited descriptors on fds 3 and 4 (where --remote-debugging-pipe wants them)
and runs the browser: what a shell's `3<&R 4>&W` does, without a shell."""


@contextmanager
def open_page(url: str, *, size: tuple[int, int] = (1400, 900)) -> Iterator[Page]:
    """`url` in a tab of a headless Chromium of its own, closed on exit."""
    binary = shutil.which("chromium")
    assert binary, "chromium not found: scripts/setup installs Debian's chromium"
    to_read, to_write = os.pipe()  # the browser reads commands on fd 3
    from_read, from_write = os.pipe()  # and writes answers on fd 4
    flags = [flag for flag in _FLAGS if not flag.startswith("--virtual-time-budget")]
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        argv = [binary, *flags, "--remote-debugging-pipe", f"--user-data-dir={profile}"]
        process = subprocess.Popen(
            [sys.executable, "-c", _ON_FDS_3_AND_4, str(to_read), str(from_write), *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(to_read, from_write),
        )
        os.close(to_read)
        os.close(from_write)
        page = Page(process, to_write, from_read)
        try:
            page.open(url, size)
            yield page
        finally:
            os.close(to_write)
            os.close(from_read)
            try:
                process.wait(timeout=10)  # the closed pipe tells it to quit
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

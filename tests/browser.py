"""Headless Chromium (Debian's `chromium`, installed by scripts/setup): a page as a person
sees it, after its scripts ran, as a screenshot and as the rendered DOM.

The flags are the ones known to work on these machines: no sandbox (root), no GPU, and no
background networking (the network is closed; without them Chromium retries its own
connections at every start). Each call gets a fresh profile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Final

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

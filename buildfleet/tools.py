"""Where the third-party tools scripts/setup builds are, at the versions it builds them.

The versions live in `buildfleet/versions.env` (shell syntax: the scripts source it)."""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path


def tools_dir() -> Path:
    """Where scripts/setup caches the tools it builds."""
    default = Path.home() / ".cache" / "buildfleet" / "tools"
    return Path(os.environ.get("BUILDFLEET_TOOLS") or default)


@functools.cache
def versions() -> dict[str, str]:
    """NAME_VERSION -> version, as pinned in versions.env."""
    text = resources.files("buildfleet").joinpath("versions.env").read_text()
    pairs = (line.split("=", 1) for line in text.splitlines() if line and line[0] != "#")
    return {name: value for name, value in pairs}


def tool_home(name: str, version_key: str) -> Path:
    """`tools_dir()/NAME-VERSION`: where setup installed one tool."""
    return tools_dir() / f"{name}-{versions()[version_key]}"

"""Image references: parsed, normalized, and matched against a `--base`. Pure.

A reference is `[domain/]path[:tag][@digest]` (the distribution reference grammar). The
first component is a domain when it holds a `.` or a `:` or is `localhost`; otherwise the
image is on Docker Hub, and a one-component path lives under `library/`. So `debian`,
`library/debian` and `docker.io/library/debian` name one repository, and a reference
with neither tag nor digest means `:latest`.

A base matches a reference by repository; a base that names a digest matches only that
digest, one that names a tag only that tag, one that names neither any tag or digest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

DOCKER_HUB: Final = "docker.io"
_HUB_ALIASES: Final = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_COMPONENT: Final = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH: Final = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_DOMAIN: Final = re.compile(
    r"^(?:localhost|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?$"
)
_TAG: Final = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST: Final = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[0-9a-fA-F]{32,}$")
_MAX_LENGTH: Final = 512


class ReferenceError(ValueError):
    """Not an image reference; the message says what is wrong with it."""


@dataclass(frozen=True, slots=True)
class ImageRef:
    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def repository(self) -> str:
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        tag = f":{self.tag}" if self.tag else ""
        digest = f"@{self.digest}" if self.digest else ""
        return f"{self.repository}{tag}{digest}"

    def matches(self, other: ImageRef) -> bool:
        """Whether `other` (what a FROM pulls) is this base (what `--base` names)."""
        if self.repository != other.repository:
            return False
        if self.digest is not None:
            return other.digest == self.digest
        if self.tag is not None:
            implied = "latest" if other.tag is None and other.digest is None else other.tag
            return implied == self.tag
        return True


def parse_reference(text: str) -> ImageRef:
    """`text` as a normalized reference; raises ReferenceError naming the bad part."""
    if not text or len(text) > _MAX_LENGTH:
        raise ReferenceError(f"{text[:80]!r} is not an image reference (empty or too long)")
    rest, _, digest = text.partition("@")
    if digest and not _DIGEST.match(digest):
        raise ReferenceError(f"{text!r}: {digest!r} is not a digest (algorithm:hex)")
    domain, path = _split_domain(rest)
    path, tag = _split_tag(path)
    if tag is not None and not _TAG.match(tag):
        raise ReferenceError(f"{text!r}: {tag!r} is not a valid tag")
    if not _PATH.match(path):
        raise ReferenceError(
            f"{text!r}: {path!r} is not a repository path (lower-case letters, digits, "
            "and . _ - between them, components separated by /)"
        )
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    return ImageRef(domain, path, tag, digest or None)


def _split_domain(name: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        if not _DOMAIN.match(first):
            raise ReferenceError(f"{name!r}: {first!r} is not a registry host")
        domain = first.lower()  # host names are case-insensitive
        return (DOCKER_HUB if domain in _HUB_ALIASES else domain), rest
    return DOCKER_HUB, name


def _split_tag(path: str) -> tuple[str, str | None]:
    last_slash = path.rfind("/")
    colon = path.find(":", last_slash + 1)
    if colon < 0:
        return path, None
    return path[:colon], path[colon + 1 :]

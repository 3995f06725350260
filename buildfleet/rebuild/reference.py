"""Image references as `--base` compares them: normalized, and matched by repository. Pure.

The grammar is the fleet's one (producer.reference). On top of it, what a FROM line may say
and a registry would accept: a host name in any case, and Docker Hub's other names
(`index.docker.io`, `registry-1.docker.io`). So `debian`, `library/debian` and
`docker.io/library/debian` name one repository, and a reference with neither tag nor digest
means `:latest`.

A base matches a reference by repository; a base that names a digest matches only that
digest, one that names a tag only that tag, one that names neither any tag or digest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from producer import reference as grammar
from producer.reference import ReferenceError

__all__ = ["DOCKER_HUB", "ImageRef", "ReferenceError", "parse_reference"]

DOCKER_HUB: Final = grammar.DEFAULT_REGISTRY
_HUB_ALIASES: Final = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


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
    """`text` as a normalized reference; raises ReferenceError naming what is wrong."""
    first, slash, rest = text.partition("/")
    if slash and ("." in first or ":" in first or first.lower() == "localhost"):
        text = f"{first.lower()}/{rest}"  # host names are case-insensitive
    parsed = grammar.parse(text)
    domain = DOCKER_HUB if parsed.registry in _HUB_ALIASES else parsed.registry
    path = parsed.repository
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    return ImageRef(domain, path, parsed.tag, parsed.digest)

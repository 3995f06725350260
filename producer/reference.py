"""Image references: one grammar for every image and cache reference the fleet handles. Pure.

    registry.example.com:5000/team/app:v1.2@sha256:<64 hex>
    └──────── registry ─────┘ └ repo ┘ └tag┘ └──── digest ────┘

The OCI distribution grammar (as Docker's `reference` package states it), lower case in the
name: a reference is a name (an optional registry host and port, then path components of
lower-case letters and digits joined by `.`, `_`, `__` or dashes), an optional `:tag` and an
optional `@algorithm:hex` digest. Nothing else: no `,`, `=`, spaces or other characters a
builder would read as an option (`type=local,dest=/`), so a reference can go anywhere an
option list is built.

`REFERENCE_PATTERN` says it for msgspec and JSON Schema (ECMA and Python regexes agree on it:
the `(?!\\n)` keeps Python's `$` from accepting a trailing newline); `parse` splits a
reference into its parts, with Docker's defaults for what it leaves out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

MAX_LENGTH: Final = 512
MAX_NAME_LENGTH: Final = 255
DEFAULT_REGISTRY: Final = "docker.io"

_ALNUM: Final = r"[a-z0-9]+"
_SEPARATOR: Final = r"(?:[._]|__|-+)"
_PATH_COMPONENT: Final = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT: Final = r"(?:[a-z0-9]|[a-z0-9][a-z0-9-]*[a-z0-9])"
_HOST: Final = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-f:]+\])"
_DOMAIN: Final = rf"{_HOST}(?::[0-9]{{1,5}})?"
_NAME: Final = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_TAG: Final = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST: Final = r"[a-z][a-z0-9]*(?:[+._-][a-z][a-z0-9]*)*:[0-9a-f]{32,}"

REFERENCE_PATTERN: Final = rf"^{_NAME}(?::{_TAG})?(?:@{_DIGEST})?$(?!\n)"
"""A full reference; what the message contract's image and cache fields accept."""

_REFERENCE: Final = re.compile(
    rf"(?P<name>{_NAME})(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?"
)


class ReferenceError(ValueError):
    """Not a reference; the text says what was expected."""


@dataclass(frozen=True, slots=True)
class Reference:
    registry: str
    """Host and port, `docker.io` when the reference names none."""
    repository: str
    """The path in the registry (`library/busybox` for Docker Hub's `busybox`)."""
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        """registry/repository: what allowed-image patterns are matched against."""
        return f"{self.registry}/{self.repository}"


def parse(text: str) -> Reference:
    """`text` as a reference; ReferenceError if it is not one."""
    if len(text) > MAX_LENGTH:
        raise ReferenceError(f"expected an image reference of at most {MAX_LENGTH} characters")
    match = _REFERENCE.fullmatch(text)
    if match is None:
        raise ReferenceError(
            f"expected an image reference like registry.example.com/team/app:tag, got {text!r} "
            "(lower-case name; letters, digits, '.', '_', '-', '/', ':' and '@' only)"
        )
    name = match["name"]
    if len(name) > MAX_NAME_LENGTH:
        raise ReferenceError(f"expected an image name of at most {MAX_NAME_LENGTH} characters")
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, rest
    else:
        registry, repository = DEFAULT_REGISTRY, name
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = f"library/{repository}"
    return Reference(registry, repository, match["tag"], match["digest"])


def is_reference(text: str) -> bool:
    try:
        parse(text)
    except ReferenceError:
        return False
    return True

"""The registry cache of a build's repository: where it is exported and imported from.

Sticky routing keeps a repository's builds on the daemon holding its cache; a build that
spills (that daemon full) runs on a daemon that never built it. With `[cache] registry`
set, every build that names no cache of its own exports its cache (`mode=max`: every
intermediate step, not only the final image's) to `PREFIX/REPO:REF` and imports that and
`PREFIX/REPO:DEFAULT_BRANCH`, so a spilled build and the first build of a new branch are
warm too. Pure: no Redis, no subprocess.

REPO names what decides the daemon (worker.routing): the repository, the context and the
Dockerfile, as a readable slug of the repository's name and a digest of the whole key, so
two repositories with the same name never share a cache. REF is the branch or tag as a
registry tag; a name that had to be changed to be one gets a digest of the original.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from typing import Final

import msgspec

from producer.contract import BuildRequest, CachePolicy, GitSource, LocalSource
from worker.settings import CacheSettings

_NOT_IN_A_NAME: Final = re.compile(r"[^a-z0-9]+")
_NOT_IN_A_TAG: Final = re.compile(r"[^A-Za-z0-9_.-]+")
_TAG_MAX: Final = 128
_SLUG_MAX: Final = 40


def _digest(text: str, size: int) -> str:
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


def repository_name(request: BuildRequest) -> str:
    """`slug-digest`: lowercase letters, digits and dashes, as a registry path component."""
    match request.source:
        case GitSource(url=url):
            base = url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
        case LocalSource(path=path):
            base = posixpath.basename(path.rstrip("/"))
    slug = _NOT_IN_A_NAME.sub("-", base.lower()).strip("-")[:_SLUG_MAX].strip("-") or "repo"
    return f"{slug}-{_digest(request.cache_key, 6)}"


def tag_for(ref: str) -> str:
    """A git ref as a registry tag: `refs/heads/feature/x` becomes `feature-x-<digest>`."""
    name = ref.removeprefix("refs/heads/").removeprefix("refs/tags/")
    tag = _NOT_IN_A_TAG.sub("-", name).lstrip(".-")
    if tag == name and tag and len(tag) <= _TAG_MAX:
        return tag
    suffix = _digest(ref, 4)
    return f"{tag[: _TAG_MAX - len(suffix) - 1]}-{suffix}" if tag else suffix


def _branch(request: BuildRequest, settings: CacheSettings) -> str:
    match request.source:
        case GitSource(ref=ref) if ref != "HEAD":
            return ref
        case _:
            return settings.default_branch


def registry_cache(request: BuildRequest, settings: CacheSettings) -> CachePolicy:
    """The request's own cache policy when it names one (or turns the cache off); with a
    cache registry configured, the repository's cache for its branch and the default one."""
    own = request.cache
    if settings.registry is None or own.disabled or own.import_refs or own.export_ref:
        return own
    repository = f"{settings.registry}/{repository_name(request)}"
    branch = f"{repository}:{tag_for(_branch(request, settings))}"
    default = f"{repository}:{tag_for(settings.default_branch)}"
    return CachePolicy(
        import_refs=tuple(dict.fromkeys((branch, default))), export_ref=branch, mode="max"
    )


def with_registry_cache(request: BuildRequest, settings: CacheSettings) -> BuildRequest:
    policy = registry_cache(request, settings)
    return request if policy is request.cache else msgspec.structs.replace(request, cache=policy)

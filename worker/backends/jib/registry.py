"""Asking the registry which digest a pushed tag has: Jib's word is checked, not trusted."""

from __future__ import annotations

from typing import Final

import aiohttp

from producer import reference
from worker.errors import TemporaryBuildError

_MANIFEST_TYPES: Final = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
_TIMEOUT: Final = aiohttp.ClientTimeout(total=30)


async def served_digest(image: str, *, plain_http: bool) -> str | None:
    """The digest the registry serves for `image`'s tag; None when it needs credentials
    this check does not have (the push itself used Jib's)."""
    ref = reference.parse(image)
    scheme = "http" if plain_http else "https"
    url = f"{scheme}://{ref.registry}/v2/{ref.repository}/manifests/{ref.tag or 'latest'}"
    try:
        async with (
            aiohttp.ClientSession(timeout=_TIMEOUT) as session,
            session.head(url, headers={"Accept": _MANIFEST_TYPES}) as response,
        ):
            if response.status in (401, 403):
                return None
            if response.status != 200:
                raise TemporaryBuildError(
                    f"Jib pushed {image} but the registry answers {response.status} for it",
                    error_class="push_failed",
                )
            digest = response.headers.get("Docker-Content-Digest")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise TemporaryBuildError(
            f"cannot ask the registry for {image}'s digest: {exc}", error_class="connection_lost"
        ) from exc
    if digest is None:
        raise TemporaryBuildError(
            f"the registry serves {image} without a Docker-Content-Digest",
            error_class="push_failed",
        )
    return digest

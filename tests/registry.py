"""Reading the test registry the way a user would: by manifest digest."""

from __future__ import annotations

import urllib.error
import urllib.request

MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


def served_digest(registry: str, repository: str, reference: str) -> str | None:
    """The digest the registry serves for repository:reference, None when it has none."""
    request = urllib.request.Request(
        f"http://{registry}/v2/{repository}/manifests/{reference}", method="HEAD"
    )
    request.add_header("Accept", MANIFEST_TYPES)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            digest: str = response.headers["Docker-Content-Digest"]
            return digest
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise

"""Reading the test registry the way a user would: by manifest digest."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

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


def _get(url: str, accept: str) -> tuple[bytes, str]:
    request = urllib.request.Request(url)
    request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read(), response.headers.get("Content-Type", "")


def manifest(registry: str, repository: str, reference: str) -> dict[str, Any]:
    body, _ = _get(f"http://{registry}/v2/{repository}/manifests/{reference}", MANIFEST_TYPES)
    answer: dict[str, Any] = json.loads(body)
    return answer


def image_config(registry: str, repository: str, reference: str) -> dict[str, Any]:
    """The image configuration (labels, architecture, ...) of a single-platform image."""
    config = manifest(registry, repository, reference)["config"]["digest"]
    body, _ = _get(f"http://{registry}/v2/{repository}/blobs/{config}", "*/*")
    answer: dict[str, Any] = json.loads(body)
    return answer

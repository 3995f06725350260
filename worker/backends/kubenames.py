"""Names, labels and annotations of the objects a build attempt creates on Kubernetes (a
Kaniko Job, a Tekton TaskRun), shared by those backends.

An attempt's object is named deterministically from its build id and attempt number
(`attempt_name`), so a worker that restarts finds (adopts) the object its predecessor
created instead of creating a second one. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

LABEL_BUILD_ID: Final = "buildfleet.io/build-id"
LABEL_ATTEMPT: Final = "buildfleet.io/attempt"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "buildfleet"
ANNOTATION_BUILD_ID: Final = "buildfleet.io/build-id"
"""The full build id (a label value is capped at 63 characters, a build id at 128)."""
ANNOTATION_TRACEPARENT: Final = "buildfleet.io/traceparent"
MANAGED_SELECTOR: Final = f"{LABEL_MANAGED_BY}={MANAGED_BY}"

_LABEL_VALUE_RE: Final = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def attempt_name(build_id: str, attempt: int) -> str:
    """`bf-<slug>-<hash>-<attempt>`: deterministic, a DNS label, at most 63 characters."""
    slug = re.sub(r"[^a-z0-9]+", "-", build_id.lower()).strip("-")[:40].strip("-") or "build"
    return f"bf-{slug}-{_short_hash(build_id)}-{attempt}"


def label_value(value: str) -> str:
    """`value` itself when it is a valid label value, else a truncated form with a hash."""
    if _LABEL_VALUE_RE.match(value):
        return value
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", value)[:50].strip("._-") or "x"
    return f"{cleaned}-{_short_hash(value, 12)}"


def attempt_labels(build_id: str, attempt: int) -> dict[str, str]:
    return {
        LABEL_BUILD_ID: label_value(build_id),
        LABEL_ATTEMPT: str(attempt),
        LABEL_MANAGED_BY: MANAGED_BY,
    }


def attempt_annotations(build_id: str, traceparent: str | None) -> dict[str, str]:
    annotations = {ANNOTATION_BUILD_ID: build_id}
    if traceparent:
        annotations[ANNOTATION_TRACEPARENT] = traceparent
    return annotations

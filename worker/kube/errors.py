"""What can go wrong talking to the Kubernetes API, as types, and what each means for a build.

`worker.kube.api` raises these and nothing else: an HTTP status becomes one `KubeError`
subclass (`error_for_status`), a transport failure becomes `KubeUnreachable`. Callers match
on the type (`KubeNotFound`, `KubeConflict`, `KubeGone` mean something to them) and hand the
rest to `as_build_error`, whose table is the failure policy:

| error             | status      | build error | class            | another namespace |
|-------------------|-------------|-------------|------------------|-------------------|
| KubeInvalid       | 400, 422    | permanent   | invalid_job      | -                 |
| KubeForbidden     | 401, 403    | temporary   | kube_forbidden   | yes               |
| KubeNotFound      | 404         | temporary   | kube_not_found   | yes               |
| KubeConflict      | 409         | temporary   | kube_conflict    | no                |
| KubeGone          | 410         | temporary   | kube_gone        | no                |
| KubeThrottled     | 429         | temporary   | kube_throttled   | no (Retry-After)  |
| KubeServerError   | 5xx, other  | temporary   | kube_api         | yes for 5xx       |
| KubeUnreachable   | none        | temporary   | kube_unreachable | yes               |
| KubeConfigError   | none        | temporary   | kube_config      | yes               |

Pure: no I/O, so the mapping is tested without a cluster.
"""

from __future__ import annotations

from typing import Final

import msgspec

from worker.errors import BuildError, PermanentBuildError, TemporaryBuildError


class KubeError(Exception):
    """The API server refused a request (`status` is its HTTP status), or was not reached
    (`status` 0). `what` names the request, e.g. "create jobs ns/bf-x-1"."""

    def __init__(
        self, what: str, message: str, *, status: int = 0, retry_after: float | None = None
    ) -> None:
        head = f"{status} " if status else ""
        super().__init__(f"kubernetes API: {what}: {head}{message}")
        self.what = what
        self.message = message
        self.status = status
        self.retry_after = retry_after


class KubeInvalid(KubeError):
    """400/422: the object or the request is malformed; sending it again will not help."""


class KubeForbidden(KubeError):
    """401/403: the worker's identity may not do this (RBAC, an expired token)."""


class KubeNotFound(KubeError):
    """404: the object (or its namespace, or its resource type) does not exist."""


class KubeConflict(KubeError):
    """409: an object of that name exists already (or a write raced another)."""


class KubeGone(KubeError):
    """410: a watch's resourceVersion is too old; list again, then watch from there."""


class KubeThrottled(KubeError):
    """429: the API server asks the client to slow down (`retry_after` seconds)."""


class KubeServerError(KubeError):
    """5xx, or a status this module has no better name for."""


class KubeUnreachable(KubeError):
    """No answer: connection refused or dropped, a timeout, a stream cut mid-way."""


class KubeConfigError(KubeError):
    """No usable kubeconfig or in-cluster configuration."""


_BY_STATUS: Final[dict[int, type[KubeError]]] = {
    400: KubeInvalid,
    422: KubeInvalid,
    401: KubeForbidden,
    403: KubeForbidden,
    404: KubeNotFound,
    409: KubeConflict,
    410: KubeGone,
    429: KubeThrottled,
}

RETRYABLE: Final = (KubeUnreachable, KubeThrottled, KubeServerError)
"""Worth the same request again after a pause (a watch reconnects after these)."""


class _Status(msgspec.Struct):
    """The body of an error answer (meta/v1 Status), or of a watch's ERROR event."""

    message: str = ""
    reason: str = ""
    code: int = 0


_status_decoder: Final = msgspec.json.Decoder(_Status)


def status_message(body: bytes, fallback: str) -> str:
    """The `message` of a Status body, else `fallback`."""
    try:
        return _status_decoder.decode(body).message or fallback
    except msgspec.DecodeError:
        return fallback


def status_code(body: bytes) -> int:
    """The `code` of a Status object (a watch's ERROR event), 500 when it has none."""
    try:
        return _status_decoder.decode(body).code or 500
    except msgspec.DecodeError:
        return 500


def error_for_status(
    status: int, what: str, message: str, *, retry_after: float | None = None
) -> KubeError:
    """The error for an HTTP status other than 2xx."""
    kind = _BY_STATUS.get(status, KubeServerError)
    return kind(what, message, status=status, retry_after=retry_after)


# error type -> (temporary?, error_class, daemon_at_fault)
_POLICY: Final[dict[type[KubeError], tuple[bool, str, bool]]] = {
    KubeInvalid: (False, "invalid_job", False),
    KubeForbidden: (True, "kube_forbidden", True),
    KubeNotFound: (True, "kube_not_found", True),
    KubeConflict: (True, "kube_conflict", False),
    KubeGone: (True, "kube_gone", False),
    KubeThrottled: (True, "kube_throttled", False),
    KubeServerError: (True, "kube_api", False),
    KubeUnreachable: (True, "kube_unreachable", True),
    KubeConfigError: (True, "kube_config", True),
}


def as_build_error(exc: KubeError) -> BuildError:
    """The domain error a backend raises for `exc` (the table above)."""
    temporary, error_class, at_fault = _POLICY.get(type(exc), (True, "kube_api", False))
    if isinstance(exc, KubeServerError):
        at_fault = exc.status >= 500
    text = str(exc)
    if not temporary:
        return PermanentBuildError(text, error_class=error_class)
    return TemporaryBuildError(
        text, error_class=error_class, daemon_at_fault=at_fault, delay=exc.retry_after
    )

"""What a build attempt on Kubernetes came to, before the log tail is attached: the
`Outcome` a backend's pure verdict returns, and the `Built` or `BuildError` it becomes.

Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from worker.backends.base import Built
from worker.errors import BuildError, PermanentBuildError, TemporaryBuildError

_DIGEST_RE: Final = re.compile(r"sha256:[0-9a-f]{64}")


def parse_digest(text: str | None) -> str | None:
    """The first image digest in `text` (a termination message, a result), if any."""
    match = _DIGEST_RE.search(text or "")
    return match.group(0) if match else None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to, before the log tail is attached."""

    ok: bool
    digest: str | None = None
    error_class: str = ""
    message: str = ""
    temporary: bool = False
    daemon_at_fault: bool = False
    delete_job: bool = False
    """The attempt's object is still alive (a Job stuck pending): delete it first."""
    attach_log: bool = False

    @classmethod
    def success(cls, digest: str | None) -> Outcome:
        return cls(ok=True, digest=digest)

    @classmethod
    def permanent(cls, error_class: str, message: str, *, attach_log: bool = False) -> Outcome:
        return cls(ok=False, error_class=error_class, message=message, attach_log=attach_log)

    @classmethod
    def temporary_(
        cls,
        error_class: str,
        message: str,
        *,
        daemon_at_fault: bool = False,
        delete_job: bool = False,
    ) -> Outcome:
        return cls(
            ok=False,
            error_class=error_class,
            message=message,
            temporary=True,
            daemon_at_fault=daemon_at_fault,
            delete_job=delete_job,
        )


def to_result(outcome: Outcome, log_tail: tuple[str, ...] = ()) -> Built | BuildError:
    """The `Built` or the `BuildError` to raise for `outcome`."""
    if outcome.ok:
        return Built(digest=outcome.digest)
    message = outcome.message
    tail = log_tail if outcome.attach_log else ()
    last = next((line for line in reversed(tail) if line.strip()), None)
    if last and outcome.error_class == "run_failed":
        message = f"{message}: {last.strip()}"
    if outcome.temporary:
        return TemporaryBuildError(
            message,
            error_class=outcome.error_class,
            daemon_at_fault=outcome.daemon_at_fault,
            log_tail=tail,
        )
    return PermanentBuildError(message, error_class=outcome.error_class, log_tail=tail)

"""The domain errors of a build, as backends raise them and the retry policy reads them.

Every failure is either Temporary (worth another attempt, maybe elsewhere) or Permanent
(the same request would fail again). Backends convert foreign errors at their edge with
`raise ... from exc`, so nothing above them sees a subprocess or HTTP error.
"""

from __future__ import annotations


class BuildError(Exception):
    """A build attempt did not produce an image."""

    def __init__(
        self,
        message: str,
        *,
        error_class: str,
        step: str | None = None,
        log_tail: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.error_class = error_class
        self.step = step
        self.log_tail = log_tail


class PermanentBuildError(BuildError):
    """The request itself is at fault (Dockerfile error, RUN exit code, auth, missing base)."""


class TemporaryBuildError(BuildError):
    """The infrastructure is at fault; another attempt may succeed.

    `daemon_at_fault` asks the scheduler to place the next attempt on another daemon;
    `delay` overrides the backoff when the failure says how long to wait (a 429, say).
    """

    def __init__(
        self,
        message: str,
        *,
        error_class: str,
        daemon_at_fault: bool = False,
        delay: float | None = None,
        step: str | None = None,
        log_tail: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message, error_class=error_class, step=step, log_tail=log_tail)
        self.daemon_at_fault = daemon_at_fault
        self.delay = delay

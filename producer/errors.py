"""The client's typed errors, and the one place Redis's own errors become them.

Every Redis call a producer makes runs under `unavailable(...)`: Redis away or refusing for
now (producer.resilience.is_transient: a lost connection, a timeout, a failover) becomes
`FleetUnavailable` saying what could not be done, so callers (the CLI, the gateway) handle
one error, never redis-py's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from producer.resilience import is_transient


class FleetUnavailable(ConnectionError):
    """Redis cannot be reached: nothing was submitted, read or cancelled."""


class BuildNotFound(LookupError):
    def __init__(self, build_id: str) -> None:
        super().__init__(f"no build with id {build_id!r} (unknown, or expired)")
        self.build_id = build_id


@contextmanager
def unavailable(doing: str) -> Iterator[None]:
    """Map Redis being unreachable inside the block to `FleetUnavailable("cannot {doing}")`.

    A context manager, not a decorator: it wraps the awaits inside async functions and
    async generators alike.
    """
    try:
        yield
    except Exception as exc:
        if not is_transient(exc):
            raise
        raise FleetUnavailable(f"cannot {doing}: Redis unreachable ({exc})") from exc

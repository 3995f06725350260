"""The producer side's configuration sections: frozen, grouped by concern."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import msgspec

from producer.fields import NonNegativeFloat, PositiveFloat, PositiveInt
from producer.keys import DEFAULT_QUEUE

_REDACTED = "***"


class RedisSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where the queue and the event streams live, and how every process talks to it.

    `url` is `redis://[:PASSWORD@]HOST:PORT/DB`, `rediss://` for TLS, `unix:///PATH?db=N`, or
    `redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]` to find the primary through
    Redis Sentinel (and follow it through a failover). Every process uses the same timeouts:
    a command that gets no answer within `socket_timeout_s` fails instead of hanging on a
    half-open connection, and idle connections are checked every `health_check_interval_s`.
    """

    url: str = "redis://127.0.0.1:6379/0"
    password: str | None = None
    """Overrides a password in `url`; never logged (give it as BUILDFLEET_REDIS_PASSWORD)."""
    connect_timeout_s: PositiveFloat = 5.0
    socket_timeout_s: PositiveFloat = 15.0
    """Longer than any blocking read the fleet issues (those block for at most 5 s)."""
    health_check_interval_s: NonNegativeFloat = 10.0
    keepalive: bool = True

    def __repr__(self) -> str:
        return (
            f"RedisSettings(url={redact_url(self.url)!r}, "
            f"password={None if self.password is None else _REDACTED!r}, "
            f"connect_timeout_s={self.connect_timeout_s!r}, "
            f"socket_timeout_s={self.socket_timeout_s!r}, "
            f"health_check_interval_s={self.health_check_interval_s!r}, "
            f"keepalive={self.keepalive!r})"
        )


def redact_url(url: str) -> str:
    """`url` with any password in it replaced, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{_REDACTED}@{host}"))


class QueueSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How builds wait and how long their traces are kept."""

    name: str = DEFAULT_QUEUE
    result_ttl_s: PositiveInt = 7 * 24 * 3600
    """How long a finished build's result and its own events stay readable."""
    events_maxlen: PositiveInt = 100_000
    """Approximate cap of the fleet-wide event stream `buildfleet:events`."""
    interactive_head_start_s: PositiveFloat = 60.0
    """An interactive build is ordered as if submitted this much earlier than a batch one,
    so it goes first; a batch build older than this overtakes new interactive ones (aging)."""
    max_timeout_s: PositiveFloat = 6 * 3600.0
    """The longest `timeout_s` a request may ask for: producers refuse a longer one (the
    gateway with 400 naming the field) and workers never run an attempt longer. Keep the
    worker's `default_timeout_s` at or below it. arq's own job timeout is this plus a margin,
    so a build's own deadline always comes first."""
    dead_letter_max_bytes: PositiveInt = 64 * 1024
    """A dead letter keeps its request up to this size (larger: its size only)."""
    dead_letters_max_bytes: PositiveInt = 256 * 1024 * 1024
    """The dead-letter stream's budget: it keeps as many entries as fit at the cap above."""


class TelemetrySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where people look at traces (the exporters themselves read the `OTEL_*` variables)."""

    trace_link: str = ""
    """A trace's page in the trace viewer, `{trace_id}` standing for its id, e.g.
    `https://jaeger.example.com/trace/{trace_id}`; `buildfleet get` prints it filled in, and
    the gateway's web view (`/ui`) links each build to it."""

    def trace_url(self, trace_id: str) -> str | None:
        return self.trace_link.replace("{trace_id}", trace_id) if self.trace_link else None

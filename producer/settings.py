"""The producer side's configuration sections: frozen, grouped by concern."""

from __future__ import annotations

from typing import Annotated

import msgspec

from producer.keys import DEFAULT_QUEUE

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]


class RedisSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where the queue and the event streams live."""

    url: str = "redis://127.0.0.1:6379/0"
    connect_timeout_s: PositiveFloat = 5.0


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
    worker's `default_timeout_s` at or below it."""
    dead_letter_max_bytes: PositiveInt = 64 * 1024
    """A dead letter keeps its request up to this size (larger: its size only)."""
    dead_letters_max_bytes: PositiveInt = 256 * 1024 * 1024
    """The dead-letter stream's budget: it keeps as many entries as fit at the cap above."""

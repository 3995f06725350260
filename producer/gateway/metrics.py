"""The gateway's Prometheus metrics, rendered in the text exposition format. Stdlib only.

Counters and one histogram kept in process memory; each gateway replica is scraped on its
own, as Prometheus expects.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Final

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
ENQUEUE_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    inner = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}" if inner else ""


class Counter:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.help = help_text
        self.label_names = labels
        self.values: defaultdict[tuple[str, ...], float] = defaultdict(float)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self.values[labels] += amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for labels, value in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels(self.label_names, labels)} {value:g}")
        return lines


class Gauge:
    """A value set as it changes (event streams open)."""

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text
        self.value = 0.0

    def render(self) -> list[str]:
        return [
            f"# HELP {self.name} {self.help}",
            f"# TYPE {self.name} gauge",
            f"{self.name} {self.value:g}",
        ]


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.help = help_text
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[index] += 1
                break

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{bound:g}"}} {cumulative}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{self.name}_sum {self.sum:.6f}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


class GatewayMetrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "buildfleet_gateway_requests_total",
            "HTTP requests by route, method and status.",
            ("route", "method", "status"),
        )
        self.webhooks = Counter(
            "buildfleet_gateway_webhooks_total",
            "Webhook deliveries by forge and outcome.",
            ("forge", "outcome"),
        )
        self.builds = Counter(
            "buildfleet_gateway_builds_enqueued_total",
            "Builds enqueued, by origin (webhook or api).",
            ("origin",),
        )
        self.superseded = Counter(
            "buildfleet_gateway_superseded_total",
            "Older builds cancelled because a newer one replaced them.",
            (),
        )
        self.rejected = Counter(
            "buildfleet_gateway_backpressure_total",
            "Submissions and pushes refused with 429 because the queue was too deep.",
            (),
        )
        self.limited = Counter(
            "buildfleet_gateway_limited_total",
            "Requests refused with 429 by a limit: rate, tenant, token or streams.",
            ("limit",),
        )
        self.refused = Counter(
            "buildfleet_gateway_policy_refusals_total",
            "API submissions refused by policy (403), by the field refused.",
            ("field",),
        )
        self.streams = Gauge("buildfleet_gateway_event_streams", "Event streams (SSE) open now.")
        self.enqueue = Histogram(
            "buildfleet_gateway_enqueue_seconds",
            "Time to enqueue the builds of one request (submit and supersede) in Redis.",
            ENQUEUE_BUCKETS,
        )

    def render(self) -> str:
        lines: list[str] = []
        metrics: tuple[Counter | Gauge | Histogram, ...] = (
            self.requests,
            self.webhooks,
            self.builds,
            self.superseded,
            self.rejected,
            self.limited,
            self.refused,
            self.streams,
            self.enqueue,
        )
        for metric in metrics:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"

"""What Prometheus scrapes, after a known workload, and the Grafana dashboard checked
against it.

A `buildfleet gateway` process and a `buildfleet worker --metrics-port` process (simulate
backend, two daemons' worth of capacity leases) take a workload whose every count is known:
API submissions that succeed, fail and fail temporarily until dead-lettered, a signed push,
refused calls. Both /metrics pages are read with prometheus_client's own parser. Then every
query of deploy/grafana/buildfleet.json must name only metrics and labels found there.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from test_gateway_payloads import body_of, github_headers, github_push

from producer.gateway.auth import hash_token
from worker.settings import SimulateSettings

from fleet import start_gateway_process, start_worker_process, worker_config

pytestmark = pytest.mark.timeout(300)

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "buildfleet.json"
TOKEN = "metrics-token"
SECRET = "metrics-secret"
DAEMONS = ("tcp://daemon-a:1234", "tcp://daemon-b:1234")
STEPS = 2
SCRAPE_LABELS = frozenset({"job", "instance"})
"""Labels Prometheus itself adds to every scraped series."""


_SERIES_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


@dataclass
class Scrape:
    """Parsed /metrics of one process: every sample by series name, and the series that
    are declared (HELP and TYPE) but have no sample yet."""

    samples: dict[str, list[Sample]] = field(default_factory=lambda: defaultdict(list))
    declared: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, url: str) -> Scrape:
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/plain")
            text = response.read().decode()
        scrape = cls()
        for family in text_string_to_metric_families(text):
            suffixes = _SERIES_SUFFIXES.get(family.type, ("",))
            scrape.declared.update(family.name + suffix for suffix in suffixes)
            for sample in family.samples:
                scrape.samples[sample.name].append(sample)
        return scrape

    def value(self, name: str, **labels: str) -> float:
        """The one sample of `name` whose labels include `labels` (0 when none: an
        OpenTelemetry counter appears with its first increment)."""
        found = [s for s in self.samples.get(name, []) if labels.items() <= s.labels.items()]
        assert len(found) <= 1, f"{name}{labels} matches {len(found)} series: {found}"
        return found[0].value if found else 0.0

    def labels(self) -> dict[str, set[str]]:
        """Every exported series with the label names seen on it (none when it has no
        sample yet: Grafana then shows "No data", but the name is right)."""
        seen = {
            name: {key for s in series for key in s.labels} for name, series in self.samples.items()
        }
        return {name: set() for name in self.declared} | seen


@dataclass
class Workload:
    worker: Scrape
    gateway: Scrape
    gets: int


def _call(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory, empty_redis_url: str) -> Iterator[Workload]:
    redis_url = empty_redis_url
    logs = tmp_path_factory.mktemp("metrics")
    source = logs / "context"
    source.mkdir()
    settings = {
        "tokens": [
            {"name": "metrics", "sha256": hash_token(TOKEN), "images": ["*"], "tenant": "acme"}
        ],
        "sources": {"local_roots": [str(logs)]},
        "webhook_secrets": [{"repo": "acme/*", "secret": SECRET}],
        "rules": [{"repo": "acme/metered", "branches": ["main"], "images": ["reg.local/m:{sha}"]}],
    }
    config = worker_config(
        redis_url, backend="simulate", daemons=DAEMONS, simulate=SimulateSettings(steps=STEPS)
    )
    gateway = start_gateway_process(redis_url, logs, settings)
    worker = start_worker_process(config, logs, steps=STEPS)
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    try:
        ids = []
        for outcome in ("succeeded", "succeeded", "succeeded", "failed", "failed", "temporary"):
            request = {
                "source": {"type": "local", "path": str(source)},
                "push": False,
                "labels": {"simulate.outcome": outcome},
            }
            body = json.dumps(request).encode()
            status, answer = _call(f"{gateway.address}/v1/builds", body, auth)
            assert status == 202, answer
            ids.append(answer["id"])
        status, _ = _call(f"{gateway.address}/v1/builds", b"{}", {"Authorization": "Bearer nope"})
        assert status == 401
        body = body_of(github_push("acme/metered", "refs/heads/main"))
        hook = f"{gateway.address}/hooks/github"
        status, answer = _call(hook, body, github_headers(body, SECRET))
        assert status == 202, answer
        ids += [build["id"] for build in answer["builds"]]
        status, _ = _call(hook, body, github_headers(body, "wrong"))
        assert status == 401

        gets = 0
        deadline = time.monotonic() + 120
        for build_id in ids:
            while True:
                gets += 1
                _, state = _call(f"{gateway.address}/v1/builds/{build_id}", headers=auth)
                if state["status"] not in ("queued", "running", "retrying"):
                    break
                assert time.monotonic() < deadline, state
                time.sleep(0.05)
        yield Workload(
            worker=Scrape.of(f"{worker.address}/metrics"),
            gateway=Scrape.of(f"{gateway.address}/metrics"),
            gets=gets,
        )
    finally:
        worker.stop()
        gateway.stop()


def test_the_worker_counts_what_happened(workload: Workload) -> None:
    worker = workload.worker
    builds = "buildfleet_builds_total"
    assert worker.value(builds, status="succeeded", error_class="") == 4
    assert worker.value(builds, status="failed", error_class="run_failed") == 2
    assert worker.value(builds, status="dead_lettered", error_class="daemon_unreachable") == 1
    assert sum(s.value for s in worker.samples[builds]) == 7
    # The temporary failure: three attempts (retry.max_attempts), two of them retried.
    assert worker.value("buildfleet_build_retries_total", error_class="daemon_unreachable") == 2
    failures = "buildfleet_build_failures_total"
    assert worker.value(failures, error_class="run_failed", kind="failed") == 2
    assert worker.value(failures, error_class="daemon_unreachable", kind="dead_lettered") == 1
    assert worker.value("buildfleet_build_queue_wait_seconds_count") == 7
    duration = "buildfleet_build_duration_seconds_count"
    assert worker.value(duration, status="succeeded", backend="simulate") == 4
    assert worker.value(duration, status="dead_lettered", backend="simulate") == 1
    # Every attempt reports its steps: (4 + 2 + 3 attempts) x STEPS.
    assert worker.value("buildfleet_build_step_duration_seconds_count", cached="false") == 9 * STEPS
    capacity = worker.samples["buildfleet_build_capacity_wait_seconds_count"]
    assert sum(s.value for s in capacity) == 7
    assert {s.labels["daemon"] for s in capacity} <= set(DAEMONS)
    in_flight = worker.samples["buildfleet_builds_in_flight"]
    assert {s.labels["daemon"] for s in in_flight} == set(DAEMONS)
    assert all(s.value == 0 for s in in_flight)  # every slot given back
    assert worker.value("buildfleet_build_queue_wait_seconds_bucket", le="+Inf") == 7


def test_the_gateway_counts_what_happened(workload: Workload) -> None:
    gateway = workload.gateway
    requests = "buildfleet_gateway_requests_total"
    assert gateway.value(requests, route="/v1/builds", method="POST", status="202") == 6
    assert gateway.value(requests, route="/v1/builds", method="POST", status="401") == 1
    assert gateway.value(requests, route="/hooks/github", method="POST", status="202") == 1
    assert gateway.value(requests, route="/hooks/github", method="POST", status="401") == 1
    assert gateway.value(requests, route="/v1/builds/{build_id}", method="GET", status="200") == (
        workload.gets
    )
    webhooks = "buildfleet_gateway_webhooks_total"
    assert gateway.value(webhooks, forge="github", outcome="push") == 1
    assert gateway.value(webhooks, forge="github", outcome="unauthorized") == 1
    enqueued = "buildfleet_gateway_builds_enqueued_total"
    assert gateway.value(enqueued, origin="api") == 6
    assert gateway.value(enqueued, origin="webhook") == 1
    assert gateway.value("buildfleet_gateway_enqueue_seconds_count") == 7


# --- the dashboard ------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_LABEL_VALUES = re.compile(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*([A-Za-z_]\w*)\s*\)")
_IDENTIFIER = re.compile(r"(?<![\w$.])([A-Za-z_:][\w:]*)\b(\s*\()?")
_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                       "and", "or", "unless", "offset", "inf", "nan"})  # fmt: skip


@dataclass(frozen=True)
class Names:
    """What one PromQL query names: metrics, and labels by where they appear."""

    metrics: frozenset[str]
    selected: frozenset[tuple[str, str]]
    """(metric, label) for every label matcher in a metric's selector."""
    grouped: frozenset[str]
    """Labels in by/without/on/ignoring clauses (and label_values)."""


def promql_names(query: str) -> Names:
    metrics: set[str] = set()
    selected: set[tuple[str, str]] = set()
    grouped: set[str] = set()
    for metric, label in _LABEL_VALUES.findall(query):
        metrics.add(metric)
        grouped.add(label)
    query = _LABEL_VALUES.sub(" ", query)
    for metric, matchers in _SELECTOR.findall(_STRING.sub('""', query)):
        for label in _MATCHER.findall(matchers):
            selected.add((metric, label))
    query = _SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", _STRING.sub('""', query))
    query = re.sub(r"\[[^\]]*\]", " ", query)  # range and subquery durations
    for labels in _GROUPING.findall(query):
        grouped.update(label.strip() for label in labels.split(",") if label.strip())
    query = _GROUPING.sub(" ", query)
    for name, call in _IDENTIFIER.findall(query):
        if not call and name.lower() not in _KEYWORDS:
            metrics.add(name)
    metrics.update(metric for metric, _ in selected if metric)
    return Names(frozenset(metrics), frozenset(selected), frozenset(grouped))


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, query) for every panel target and templating query, rows' panels too."""
    found: list[tuple[str, str]] = []

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append((f"panel {panel.get('title')!r}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and query:
            found.append((f"variable {variable['name']!r}", query))
    return found


def problems(queries: list[tuple[str, str]], exported: dict[str, set[str]]) -> list[str]:
    """Every metric or label a query names that no process exports."""
    found = []
    for where, query in queries:
        names = promql_names(query)
        for metric in sorted(names.metrics - exported.keys()):
            found.append(f"{where}: metric {metric!r} is not exported")
        for metric, label in sorted(names.selected):
            known = exported.get(metric, set()) if metric else set().union(*exported.values())
            if label not in known | SCRAPE_LABELS:
                found.append(f"{where}: {metric or 'selector'} has no label {label!r}")
        available = set().union(*(exported.get(m, set()) for m in names.metrics))
        for label in sorted(names.grouped - available - SCRAPE_LABELS):
            found.append(f"{where}: label {label!r} is on none of {sorted(names.metrics)}")
    return found


def test_every_dashboard_query_names_only_what_the_gateway_and_workers_export(
    workload: Workload,
) -> None:
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    assert len(queries) >= 20  # every panel's targets and the job variable were read
    exported = {**workload.worker.labels(), **workload.gateway.labels()}
    assert problems(queries, exported) == []


def test_the_dashboard_check_catches_a_wrong_metric_or_label(workload: Workload) -> None:
    exported = {**workload.worker.labels(), **workload.gateway.labels()}
    queries = [
        ("typo", 'sum(rate(buildfleet_build_total{job=~"$job"}[$__rate_interval]))'),
        ("label", 'sum by (daemon) (rate(buildfleet_builds_total{statsu="failed"}[5m]))'),
        ("grouping", "histogram_quantile(0.9, sum by (le, flavour) (rate("
         "buildfleet_build_duration_seconds_bucket[5m])))"),
        ("variable", "label_values(buildfleet_queue_depth, tenant)"),
        ("fine", "sum by (le, backend) (rate(buildfleet_build_duration_seconds_bucket[5m]))"),
    ]  # fmt: skip
    assert problems(queries, exported) == [
        "typo: metric 'buildfleet_build_total' is not exported",
        "label: buildfleet_builds_total has no label 'statsu'",
        "label: label 'daemon' is on none of ['buildfleet_builds_total']",
        "grouping: label 'flavour' is on none of ['buildfleet_build_duration_seconds_bucket']",
        "variable: label 'tenant' is on none of ['buildfleet_queue_depth']",
    ]

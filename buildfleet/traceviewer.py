"""The trace receiver of the local fleet and the tests: otel-desktop-viewer on loopback.

An OpenTelemetry Collector build that takes OTLP over gRPC and HTTP, keeps spans, metrics and
logs in an in-memory DuckDB, and serves a web UI (`/traces/TRACE_ID` opens one trace) and a
JSON-RPC query API (`POST /rpc`) on a third port. scripts/setup builds it from the Go module
proxy (Jaeger v2's Go module has no UI, only a placeholder). Synchronous and stdlib-only,
like buildfleet.services.
"""

from __future__ import annotations

import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from buildfleet.services import (
    Service,
    ServiceError,
    ToolMissing,
    free_port,
    start_on_free_port,
    tcp_open,
)
from buildfleet.tools import tool_home

TRACE_LINK_FIELD: Final = "{trace_id}"


def trace_viewer_binary() -> str:
    home = tool_home("otel-desktop-viewer", "TRACE_VIEWER_VERSION")
    path = home / "bin" / "otel-desktop-viewer"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ToolMissing(f"{path} not found; run scripts/setup to build it")
    return str(path)


@dataclass(frozen=True)
class TraceViewer:
    """A running receiver: where to send OTLP, where people look, how tests ask."""

    service: Service
    ui: str
    """http://127.0.0.1:PORT: the web UI and the JSON-RPC query API."""
    otlp_http: str
    """The OTLP/HTTP endpoint (OTEL_EXPORTER_OTLP_ENDPOINT for Python's exporters)."""
    otlp_grpc: str
    """The OTLP/gRPC endpoint (buildkitd's default protocol)."""

    @property
    def trace_link(self) -> str:
        """The UI's address of one trace, with `{trace_id}` to fill in."""
        return f"{self.ui}/traces/{TRACE_LINK_FIELD}"

    def trace_url(self, trace_id: str) -> str:
        return self.trace_link.replace(TRACE_LINK_FIELD, trace_id)

    def spans(self, trace_id: str) -> list[dict[str, Any]]:
        """Every span the receiver holds for one trace (its `spanData` objects: traceID,
        spanID, parentSpanID, name, startTime, endTime, attributes, resource...)."""
        try:
            result = self.call("searchSpans", [trace_id])
        except ServiceError as exc:
            if "not found" in str(exc).lower():
                return []
            raise
        return [entry["spanData"] for entry in result.get("spans") or []]

    def call(self, method: str, params: list[Any]) -> Any:
        """One JSON-RPC call to the query API; a JSON-RPC error raises ServiceError."""
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        request = urllib.request.Request(  # noqa: S310 - our own loopback http URL
            f"{self.ui}/rpc",
            data=body.encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
            answer = json.load(response)
        if "error" in answer:
            raise ServiceError(f"trace viewer {method}: {answer['error']}")
        return answer["result"]

    def stop(self) -> None:
        self.service.stop()


def start_trace_viewer(workdir: Path, *, timeout: float = 30.0) -> TraceViewer:
    """otel-desktop-viewer on three free loopback ports, its data in memory."""
    binary = trace_viewer_binary()
    ports: dict[str, int] = {}

    def launch(ui_port: int) -> tuple[list[str], str]:
        ports.update(ui=ui_port, http=free_port(), grpc=free_port())
        argv = [binary, "--host", "127.0.0.1", "--open-browser=false",
                "--browser-port", str(ui_port), "--http", str(ports["http"]),
                "--grpc", str(ports["grpc"])]  # fmt: skip
        return argv, f"http://127.0.0.1:{ui_port}"

    def ready(ui_port: int) -> bool:
        return tcp_open(ports["http"]) and tcp_open(ports["grpc"]) and tcp_open(ui_port)

    log = workdir / "logs" / "trace-viewer.log"
    service = start_on_free_port("trace-viewer", log, launch, ready, timeout=timeout)
    return TraceViewer(
        service=service,
        ui=service.address,
        otlp_http=f"http://127.0.0.1:{ports['http']}",
        otlp_grpc=f"http://127.0.0.1:{ports['grpc']}",
    )

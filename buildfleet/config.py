"""The fleet's one configuration file, validated at start-up.

A TOML file whose top-level tables are the sections below; every setting can be overridden
by an environment variable `BUILDFLEET_<SECTION>_<FIELD>` (`BUILDFLEET_REDIS_URL`,
`BUILDFLEET_WORKER_CONCURRENCY`, ...); list and table values are given as JSON. An error
names the file, the field and what was expected.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import msgspec

from producer.gateway.settings import GatewaySettings
from producer.settings import QueueSettings, RedisSettings, TelemetrySettings
from worker.retry import RetrySettings
from worker.settings import (
    BuildahSettings,
    BuildkitSettings,
    CacheSettings,
    DockerSettings,
    JibSettings,
    KanikoSettings,
    SchedulingSettings,
    SimulateSettings,
    TektonSettings,
    WorkerConfig,
    WorkerSettings,
)

ENV_PREFIX: Final = "BUILDFLEET_"


class ConfigError(ValueError):
    """The configuration is invalid; the message says where and why."""


class FleetConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    redis: RedisSettings = RedisSettings()
    queue: QueueSettings = QueueSettings()
    worker: WorkerSettings = msgspec.field(default_factory=WorkerSettings)
    retry: RetrySettings = RetrySettings()
    buildkit: BuildkitSettings = BuildkitSettings()
    simulate: SimulateSettings = SimulateSettings()
    scheduling: SchedulingSettings = SchedulingSettings()
    cache: CacheSettings = CacheSettings()
    kaniko: KanikoSettings = msgspec.field(default_factory=KanikoSettings)
    docker: DockerSettings = DockerSettings()
    buildah: BuildahSettings = BuildahSettings()
    tekton: TektonSettings = msgspec.field(default_factory=TektonSettings)
    jib: JibSettings = msgspec.field(default_factory=JibSettings)
    gateway: GatewaySettings = msgspec.field(default_factory=GatewaySettings)
    telemetry: TelemetrySettings = TelemetrySettings()

    def for_worker(self) -> WorkerConfig:
        return WorkerConfig(
            redis=self.redis,
            queue=self.queue,
            worker=self.worker,
            retry=self.retry,
            buildkit=self.buildkit,
            simulate=self.simulate,
            scheduling=self.scheduling,
            cache=self.cache,
            kaniko=self.kaniko,
            docker=self.docker,
            buildah=self.buildah,
            tekton=self.tekton,
            jib=self.jib,
        )


_SECTIONS: Final = tuple(FleetConfig.__struct_fields__)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name.removeprefix(ENV_PREFIX).lower()
        section = next((s for s in _SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            continue  # BUILDFLEET_CONFIG and variables for other tools
        key = rest.removeprefix(section + "_")
        value: Any = raw
        if raw[:1] in "[{":
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{name}: expected JSON ({exc})") from exc
        overrides.setdefault(section, {})[key] = value
    return overrides


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> FleetConfig:
    """Read `path` (or `$BUILDFLEET_CONFIG`, or nothing), apply overrides, validate."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get("BUILDFLEET_CONFIG"):
        path = Path(environ["BUILDFLEET_CONFIG"])
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    for section, values in _env_overrides(environ).items():
        data.setdefault(section, {}).update(values)
    try:
        return msgspec.convert(data, FleetConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from exc

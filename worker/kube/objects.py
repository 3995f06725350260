"""Typed views of the Kubernetes objects the backends read, and the events a watch yields.

A view declares only the fields a backend reads (every one with a default, so a partial
object, a watch BOOKMARK or a newer API version decodes too); unknown fields are ignored.
Objects the backends *send* are plain JSON (`Manifest`), built by pure functions.

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeAlias, TypeVar

import msgspec

JSONValue: TypeAlias = str | int | float | bool | list["JSONValue"] | dict[str, "JSONValue"] | None
Manifest: TypeAlias = dict[str, JSONValue]
"""An object (or a patch) as the API server takes it."""


class View(msgspec.Struct, frozen=True, rename="camel"):
    """Kubernetes spells fields in camelCase; these views in snake_case."""


class OwnerReference(View, frozen=True):
    kind: str = ""
    name: str = ""
    uid: str = ""


class ObjectMeta(View, frozen=True):
    name: str = ""
    namespace: str = ""
    uid: str = ""
    resource_version: str = ""
    creation_timestamp: str = ""
    deletion_timestamp: str | None = None
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    owner_references: tuple[OwnerReference, ...] = ()


class Condition(View, frozen=True):
    type: str = ""
    status: str = ""
    reason: str = ""
    message: str = ""


class ListMeta(View, frozen=True):
    resource_version: str = ""


class Object(View, frozen=True):
    """What every object has; the base of the views below."""

    metadata: ObjectMeta = ObjectMeta()


# --- core/v1 Pod --------------------------------------------------------------------------


class ContainerStateWaiting(View, frozen=True):
    reason: str = ""
    message: str = ""


class ContainerStateRunning(View, frozen=True):
    started_at: str = ""


class ContainerStateTerminated(View, frozen=True):
    exit_code: int = 0
    reason: str = ""
    message: str = ""


class ContainerState(View, frozen=True):
    waiting: ContainerStateWaiting | None = None
    running: ContainerStateRunning | None = None
    terminated: ContainerStateTerminated | None = None


class ContainerStatus(View, frozen=True):
    name: str = ""
    state: ContainerState = ContainerState()


class ResourceRequirements(View, frozen=True):
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}


class Container(View, frozen=True):
    name: str = ""
    resources: ResourceRequirements = ResourceRequirements()


class PodSpec(View, frozen=True):
    containers: tuple[Container, ...] = ()


class PodStatus(View, frozen=True):
    phase: str = ""
    reason: str = ""
    message: str = ""
    conditions: tuple[Condition, ...] = ()
    container_statuses: tuple[ContainerStatus, ...] = ()


class Pod(Object, frozen=True):
    spec: PodSpec = PodSpec()
    status: PodStatus = PodStatus()

    def container_status(self, name: str) -> ContainerStatus | None:
        return next((s for s in self.status.container_statuses if s.name == name), None)

    def container(self, name: str) -> Container | None:
        return next((c for c in self.spec.containers if c.name == name), None)

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.status.conditions if c.type == type_), None)


# --- batch/v1 Job -------------------------------------------------------------------------


class JobSpec(View, frozen=True):
    active_deadline_seconds: int | None = None


class JobStatus(View, frozen=True):
    conditions: tuple[Condition, ...] = ()


class Job(Object, frozen=True):
    spec: JobSpec = JobSpec()
    status: JobStatus = JobStatus()

    def condition(self, type_: str) -> Condition | None:
        """The condition `type_` when its status is "True"."""
        return next(
            (c for c in self.status.conditions if c.type == type_ and c.status == "True"), None
        )


# --- resources ----------------------------------------------------------------------------

K = TypeVar("K", bound=Object)


@dataclass(frozen=True, slots=True)
class Resource(Generic[K]):
    """A namespaced resource type: where it lives in the API and how it decodes."""

    group: str
    """"" for the core group."""
    version: str
    plural: str
    view: type[K]

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        path = f"{base}/namespaces/{namespace}/{self.plural}"
        if name is not None:
            path += f"/{name}"
        if subresource is not None:
            path += f"/{subresource}"
        return path

    def __str__(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


PODS: Resource[Pod] = Resource("", "v1", "pods", Pod)
JOBS: Resource[Job] = Resource("batch", "v1", "jobs", Job)


# --- what a watch yields ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Listed(Generic[K]):
    """The complete set of matching objects at one moment (a (re)list): it replaces what
    the follower knew of `resource`."""

    resource: Resource[K]
    items: tuple[K, ...]


@dataclass(frozen=True, slots=True)
class Applied(Generic[K]):
    """An object was created or changed (ADDED, MODIFIED)."""

    obj: K


@dataclass(frozen=True, slots=True)
class Deleted(Generic[K]):
    """An object was deleted; `obj` is its last state."""

    obj: K


WatchEvent: TypeAlias = Listed[K] | Applied[K] | Deleted[K]


@dataclass(frozen=True, slots=True)
class Bookmark:
    """A watch got as far as `resource_version` with nothing to report: where a
    reconnect resumes (never passed on to a follower)."""

    resource_version: str

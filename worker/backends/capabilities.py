"""What each builder can do, in one table: what backends refuse, and the README's table. Pure.

A backend refuses a request it cannot honour before it starts anything, with a permanent
error naming what it cannot do (`refusal`); the conformance suite (tests/test_conformance.py)
makes each claimed capability and each refusal happen against the real builder, and checks
that the README's table is `markdown_table()`. The survey's builders that are not backends
(yet) have rows too, so that the table answers "can buildfleet drive X?" for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from producer.contract import BuildRequest, GitSource, LocalSource
from worker.errors import PermanentBuildError

CacheMode = Literal["min", "max"]
RecipeKind = Literal["dockerfile", "jib"]
_RECIPE_NAMES: Final[dict[str, str]] = {"dockerfile": "a Dockerfile", "jib": "a jib recipe"}


@dataclass(frozen=True, slots=True)
class Capabilities:
    """One builder. The booleans and sets are what backends enforce; the strings are prose
    for the README."""

    builder: str
    backend: str | None
    """The `worker.backend` that drives it; None when buildfleet does not."""
    privileges: str
    daemon: str
    where: str
    cache_import: bool = False
    max_cache_imports: int | None = None
    """How many `cache.import_refs` it takes (None: any number)."""
    cache_export_modes: frozenset[CacheMode] = frozenset()
    cache_note: str = ""
    multi_platform: bool = False
    platforms: bool = False
    """Builds for a platform other than the worker's (one per attempt unless multi)."""
    secrets: bool = False
    """Mounts the worker's build secrets (`RUN --mount=type=secret`); else it refuses them."""
    secrets_note: str = ""
    """Why it refuses secrets (said in the refusal)."""
    local_source: bool = False
    git_subdir: bool = True
    labels: bool = False
    """Puts the request's labels on the image (never refused: labels also carry metadata)."""
    status: str = "backend"
    recipes: frozenset[RecipeKind] = frozenset({"dockerfile"})
    """What it builds from: a Dockerfile, or a recipe (`BuildRequest.recipe`)."""
    recipe_note: str = "Dockerfile"


_NONE: Final[frozenset[CacheMode]] = frozenset()
_BOTH: Final[frozenset[CacheMode]] = frozenset({"min", "max"})

SURVEY: Final[tuple[Capabilities, ...]] = (
    Capabilities(
        builder="BuildKit",
        backend="buildkit",
        privileges="privileged, or rootless with user namespaces",
        daemon="buildkitd (a StatefulSet, one cache per replica)",
        where="daemons reached over gRPC (mTLS)",
        cache_import=True,
        cache_export_modes=_BOTH,
        cache_note="registry cache, mode=min or max",
        multi_platform=True,
        platforms=True,
        secrets=True,
        local_source=True,
        labels=True,
    ),
    Capabilities(
        builder="Kaniko",
        backend="kaniko",
        privileges="unprivileged pod, root inside its container",
        daemon="none: one Job per attempt",
        where="a Kubernetes namespace",
        cache_export_modes=_BOTH,
        cache_note="its own layer cache repository (cache.export_ref, read and written)",
        platforms=True,
        secrets_note="Kaniko has no RUN --mount=type=secret, and a Secret mounted into its "
        "pod is readable by every RUN step",
    ),
    Capabilities(
        builder="Docker Engine API",
        backend="docker",
        privileges="privileged dockerd (Docker-in-Docker), or a host's daemon",
        daemon="dockerd, reached over a unix socket or TCP+TLS",
        where="Docker daemons (DinD pods or hosts)",
        cache_import=True,
        cache_export_modes=frozenset({"min"}),
        cache_note="import with cachefrom; export inline only (mode=min, in the pushed image)",
        platforms=True,
        secrets_note="the Engine API takes secrets only over a BuildKit session, which "
        "this backend does not hold",
        local_source=True,
        labels=True,
    ),
    Capabilities(
        builder="Buildah",
        backend="buildah",
        privileges="rootless (user namespaces, --isolation chroot)",
        daemon="none: one `buildah build` per attempt",
        where="the worker's own host or pod",
        cache_import=True,
        max_cache_imports=1,
        cache_export_modes=_BOTH,
        cache_note="its own layer cache repository (--cache-from/--cache-to), one ref each",
        platforms=True,
        secrets=True,
        local_source=True,
        labels=True,
    ),
    Capabilities(
        builder="Tekton",
        backend="tekton",
        privileges="as the Task's step (the Kaniko executor: unprivileged)",
        daemon="Tekton controller; a TaskRun per build",
        where="a Kubernetes cluster running Tekton Pipelines (tekton.dev/v1)",
        cache_export_modes=_BOTH,
        cache_note="Kaniko's layer cache repository (cache.export_ref, read and written)",
        platforms=True,
        secrets_note="its Kaniko executor has no RUN --mount=type=secret, and a Secret "
        "mounted into the pod is readable by every RUN step",
    ),
    Capabilities(
        builder="Skaffold",
        backend=None,
        privileges="-",
        daemon="-",
        where="developer machines and CI",
        status="not a builder: `buildfleet rebuild` reads skaffold.yaml (issue #12)",
    ),
    Capabilities(
        builder="Jib",
        backend="jib",
        privileges="unprivileged, no Dockerfile",
        daemon="none: one `mvn ... jib:build` per attempt",
        where="the worker's own host or pod (JDK and Maven)",
        cache_note="Maven's local repository and Jib's layer cache, on the worker",
        local_source=True,
        recipes=frozenset({"jib"}),
        recipe_note="jib recipe: Maven (Gradle not yet)",
        secrets_note="a Jib build has no RUN step to mount one in",
    ),
    Capabilities(
        builder="img",
        backend=None,
        privileges="rootless (BuildKit inside)",
        daemon="none",
        where="-",
        status="not planned: unmaintained since 2020; BuildKit rootless covers it",
    ),
)

BY_BACKEND: Final = {row.backend: row for row in SURVEY if row.backend is not None}


def refusal(request: BuildRequest, caps: Capabilities) -> str | None:
    """Why `caps`' builder cannot honour `request`, naming what it asked for; None if it can."""
    name = caps.builder
    if (refused := _recipe_refusal(request, caps)) is not None:
        return refused
    if isinstance(request.source, LocalSource) and not caps.local_source:
        return f"{name} cannot build a local directory; give a git source"
    if (
        isinstance(request.source, GitSource)
        and request.context not in ("", ".")
        and not caps.git_subdir
    ):
        return (
            f"{name} cannot build the git sub-directory {request.context!r} "
            f"(context); build from the repository root"
        )
    if len(request.platforms) > 1 and not caps.multi_platform:
        return (
            f"{name} builds one platform per attempt, not {len(request.platforms)} "
            f"(platforms {', '.join(request.platforms)})"
        )
    if request.platforms and not caps.platforms:
        return (
            f"{name} builds for the worker's own platform only, "
            f"not platform {request.platforms[0]!r}"
        )
    if request.secrets and not caps.secrets:
        because = f" ({caps.secrets_note})" if caps.secrets_note else ""
        return (
            f"{name} cannot mount build secrets{because}: secrets "
            f"{', '.join(request.secrets)}; build with the buildkit or buildah backend"
        )
    return _cache_refusal(request, caps)


def _recipe_refusal(request: BuildRequest, caps: Capabilities) -> str | None:
    kind = request.recipe_kind
    if kind in caps.recipes:
        return None
    can = " or ".join(_RECIPE_NAMES[k] for k in sorted(caps.recipes))
    backends = sorted(row.backend for row in SURVEY if row.backend and kind in row.recipes)
    return (
        f"{caps.builder} builds from {can}, not from {_RECIPE_NAMES[kind]}; "
        f"send it to a fleet whose workers run backend {' or '.join(backends)}"
    )


def recipe_refusal(request: BuildRequest, backend: str) -> str | None:
    """Why `backend` cannot build what `request` is built from (a Dockerfile, a recipe);
    None if it can, or if the backend has no row (the simulate backend builds anything)."""
    caps = BY_BACKEND.get(backend)
    return None if caps is None else _recipe_refusal(request, caps)


def _cache_refusal(request: BuildRequest, caps: Capabilities) -> str | None:
    cache = request.cache
    if cache.disabled:
        return None
    name = caps.builder
    if cache.import_refs and not caps.cache_import:
        return f"{name} cannot import a cache from cache.import_refs"
    if caps.max_cache_imports is not None and len(cache.import_refs) > caps.max_cache_imports:
        return (
            f"{name} imports at most {caps.max_cache_imports} cache ref(s), "
            f"not {len(cache.import_refs)} (cache.import_refs)"
        )
    if cache.export_ref and cache.mode not in caps.cache_export_modes:
        if not caps.cache_export_modes:
            return f"{name} cannot export a cache (cache.export_ref, mode={cache.mode})"
        allowed = " or ".join(sorted(caps.cache_export_modes))
        return (
            f"{name} cannot export cache mode={cache.mode} ({caps.cache_note}); "
            f"ask for cache mode={allowed}"
        )
    return None


def ensure_capable(request: BuildRequest, backend: str) -> None:
    """Raise the permanent error a backend answers a request it cannot honour with."""
    if (reason := refusal(request, BY_BACKEND[backend])) is not None:
        raise PermanentBuildError(reason, error_class="unsupported")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _cache_cell(caps: Capabilities) -> str:
    if caps.backend is None:
        return "-"
    modes = [mode for mode in ("min", "max") if mode in caps.cache_export_modes]
    exports = f"mode={'/'.join(modes)}" if modes else "none"
    return f"import {_yes(caps.cache_import)}; export {exports}; {caps.cache_note}"


def _platform_cell(caps: Capabilities) -> str:
    if caps.backend is None:
        return "-"
    if caps.multi_platform:
        return "yes (several per build)"
    return "one per build" if caps.platforms else "no (the worker's own)"


def markdown_table() -> str:
    """The README's backend table, one row per builder of the survey."""
    header = (
        "| Builder | buildfleet | Builds from | Privileges | Daemon | Cache | Secrets | "
        "Platforms | Where it runs |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for caps in SURVEY:
        driven = f"`{caps.backend}` backend" if caps.backend else caps.status
        secrets = _yes(caps.secrets) if caps.backend else "-"
        rows.append(
            f"| {caps.builder} | {driven} | {caps.recipe_note if caps.backend else '-'} | "
            f"{caps.privileges} | {caps.daemon} | "
            f"{_cache_cell(caps)} | {secrets} | {_platform_cell(caps)} | {caps.where} |"
        )
    return header + "\n".join(rows) + "\n"

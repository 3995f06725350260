"""Skaffold configs (`apiVersion: skaffold/v4beta*`) as batch entries.

Read as Skaffold reads them (see `located`): every document of a file is a config; the
profiles named by `--profile` are applied to every config that defines them (Skaffold
propagates them to required configs too), each profile's fields laid over the config's
(a non-empty list or scalar replaces, a mapping is merged) and then its `patches`
(add/replace/remove); `requires` entries are followed (a `path` to a file or to a
directory holding skaffold.yaml, or a `git` repository), with their `configs` selection
and their `activeProfiles`.

Each artifact becomes one entry by its builder, through `BUILDERS`: `docker` and `kaniko`
blocks become Dockerfile builds (`dockerfile` relative to `context`, `target`,
`buildArgs`, `cacheFrom` or kaniko's `cache.repo`); `jib` blocks become jib-recipe builds
(`project` the module's directory, `fromImage` the base image; Maven only, and without
`args`, which would reach Maven unvalidated); builders this fleet has no backend for are
listed as skipped with the reason. Enabling one is one entry in the table.

Images are named as Skaffold names them: `--default-repo` before an image without a
registry, and the tag given by `--tag`, else the commit's short id (Skaffold's default
`gitCommit` tagger) for a repository, else `latest`.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeVar

import msgspec

from buildfleet.rebuild.located import (
    Map,
    Seq,
    Text,
    YamlError,
    line_at,
    load_documents,
    plain,
)
from buildfleet.rebuild.plan import Entry, Plan, Refused, SourceError
from buildfleet.rebuild.profiles import apply_profiles, profile_names
from buildfleet.rebuild.trees import DEFAULT_CONFIG, Tree
from producer.contract import ContractError, request_from_builtins

OLDEST: Final = 1
NEWEST: Final = 13
_VERSION: Final = re.compile(r"^skaffold/v4beta(\d+)$")
SUPPORTED: Final = f"skaffold/v4beta{OLDEST} to skaffold/v4beta{NEWEST}"
_AT_PATH: Final = re.compile(r" - at `(\$[^`]*)`$")


_T = TypeVar("_T")


class _Dockerfile(msgspec.Struct, rename="camel"):
    """The fields of a `docker` or `kaniko` block that a build request takes."""

    dockerfile: str = "Dockerfile"
    target: str | None = None
    build_args: dict[str, str | None] = msgspec.field(default_factory=dict)
    cache_from: list[str] = msgspec.field(default_factory=list)


class _KanikoCache(msgspec.Struct):
    repo: str | None = None


class _Kaniko(_Dockerfile, rename="camel"):
    cache: _KanikoCache | None = None


class _Jib(msgspec.Struct, rename="camel"):
    project: str | None = None
    args: list[str] = msgspec.field(default_factory=list)
    type: str | None = None
    from_image: str | None = None


class _Dependency(msgspec.Struct):
    image: str
    alias: str | None = None


class _Artifact(msgspec.Struct):
    image: str
    context: str = "."
    platforms: list[str] = msgspec.field(default_factory=list)
    requires: list[_Dependency] = msgspec.field(default_factory=list)
    docker: _Dockerfile | None = None
    kaniko: _Kaniko | None = None
    jib: _Jib | None = None


class _Build(msgspec.Struct):
    artifacts: list[_Artifact] = msgspec.field(default_factory=list)


class _GitRequire(msgspec.Struct):
    repo: str
    path: str = DEFAULT_CONFIG
    ref: str = "HEAD"


class _ActiveProfile(msgspec.Struct, rename="camel"):
    name: str
    activated_by: list[str] = msgspec.field(default_factory=list)


class _Require(msgspec.Struct, rename="camel"):
    path: str | None = None
    configs: list[str] = msgspec.field(default_factory=list)
    git: _GitRequire | None = None
    google_cloud_storage: dict[str, str | None] | None = None
    active_profiles: list[_ActiveProfile] = msgspec.field(default_factory=list)


class _Metadata(msgspec.Struct):
    name: str | None = None


class _Config(msgspec.Struct, rename="camel"):
    api_version: str
    kind: str = "Config"
    metadata: _Metadata = msgspec.field(default_factory=_Metadata)
    requires: list[_Require] = msgspec.field(default_factory=list)
    build: _Build = msgspec.field(default_factory=_Build)


@dataclass(frozen=True, slots=True)
class SkaffoldOptions:
    profiles: tuple[str, ...] = ()
    default_repo: str | None = None
    tag: str | None = None


@dataclass(frozen=True, slots=True)
class ArtifactContext:
    """What a builder needs to make a request: the artifact, where it lives, its names."""

    artifact: _Artifact
    tree: Tree
    directory: str
    """The directory of the config file, in `tree`."""
    images: Mapping[str, str]
    """Every artifact image of the config -> the name this batch builds it as."""


@dataclass(frozen=True, slots=True)
class Unsupported:
    reason: str


Recipe = Callable[[ArtifactContext], "dict[str, object] | Unsupported"]


def _dockerfile_request(context: ArtifactContext) -> dict[str, object]:
    artifact = context.artifact
    spec = artifact.kaniko or artifact.docker or _Dockerfile()
    source, workdir = context.tree.source(context.tree.join(context.directory, artifact.context))
    build_args = {name: value for name, value in spec.build_args.items() if value is not None}
    for dependency in artifact.requires:
        # Skaffold hands a required artifact's image to the Dockerfile as a build arg.
        alias = dependency.alias or dependency.image
        build_args[alias] = context.images.get(dependency.image, dependency.image)
    cache: dict[str, object] = {"import_refs": spec.cache_from}
    if isinstance(spec, _Kaniko) and spec.cache is not None and spec.cache.repo:
        cache = {"import_refs": [spec.cache.repo], "export_ref": spec.cache.repo}
    request: dict[str, object] = {
        "source": source,
        "context": workdir,
        "dockerfile": spec.dockerfile,
        "build_args": build_args,
        "cache": cache,
        "platforms": artifact.platforms,
    }
    if spec.target:
        request["target"] = spec.target
    return request


def _jib_request(context: ArtifactContext) -> dict[str, object] | Unsupported:
    artifact = context.artifact
    spec = artifact.jib or _Jib()
    if spec.args:
        return Unsupported(
            f"jib artifact: args {spec.args} would reach Maven unvalidated; "
            "configure them in the project's pom.xml"
        )
    tool = spec.type or "maven"
    project = spec.project or "."
    if ":" in project:
        return Unsupported(
            f"jib artifact: project {project!r} selects a module by artifact id; "
            "name its directory instead"
        )
    source, workdir = context.tree.source(context.tree.join(context.directory, artifact.context))
    recipe: dict[str, object] = {"type": "jib", "tool": tool, "module": project}
    if spec.from_image:
        recipe["base_image"] = spec.from_image
    return {
        "source": source,
        "context": workdir,
        "recipe": recipe,
        "platforms": artifact.platforms,
    }


BUILDERS: Final[Mapping[str, Recipe | Unsupported]] = {
    "docker": _dockerfile_request,
    "kaniko": _dockerfile_request,
    "jib": _jib_request,
    "ko": Unsupported("ko artifact: this fleet has no ko backend"),
    "bazel": Unsupported("bazel artifact: this fleet has no bazel backend"),
    "buildpacks": Unsupported("buildpacks artifact: this fleet has no buildpacks backend"),
    "custom": Unsupported("custom artifact: its build script runs where Skaffold runs"),
}
"""An artifact's builder -> how it becomes a build request, or why it is skipped. A builder
that gets a backend gets a recipe here (and its block a field of `_Artifact`)."""

# Where a refused request field is written in an artifact, for the error's line.
_ARTIFACT_FIELDS: Final = {
    "images": "image",
    "context": "context",
    "platforms": "platforms",
    "dockerfile": "{builder}.dockerfile",
    "target": "{builder}.target",
    "build_args": "{builder}.buildArgs",
    "cache": "{builder}",
    "recipe": "{builder}",
    "recipe.module": "jib.project",
    "recipe.tool": "jib.type",
    "recipe.base_image": "jib.fromImage",
}


def _decode(value: Map, kind: type[_T], where: str) -> _T:
    """`value` as `kind`; an error names the file, the line and the field."""
    try:
        return msgspec.convert(plain(value), kind)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _AT_PATH.search(message)
        path = match.group(1) if match else "$"
        field_path = path.removeprefix("$").lstrip(".") or "(document)"
        line = line_at(value, path, value.line)
        raise SourceError(f"{where}:{line}: {field_path}: {_AT_PATH.sub('', message)}") from None


def check_version(doc: Map, where: str) -> None:
    version = doc.get("apiVersion")
    if not isinstance(version, Text):
        raise SourceError(f"{where}:{doc.line}: apiVersion: missing (this reads {SUPPORTED})")
    match = _VERSION.match(version)
    if match is None or not OLDEST <= int(match.group(1)) <= NEWEST:
        newer = (match is not None and int(match.group(1)) > NEWEST) or version >= "skaffold/v5"
        hint = "newer than this reads" if newer else "run `skaffold fix` to upgrade it"
        raise SourceError(
            f"{where}:{version.line}: apiVersion: {str(version)!r} is not supported ({hint}); "
            f"this reads {SUPPORTED}"
        )


# --- configs, requires, artifacts ---------------------------------------------------------

OpenGit = Callable[[str, str], Awaitable[Tree]]


def _has_registry(image: str) -> bool:
    first, slash, _ = image.partition("/")
    return bool(slash) and ("." in first or ":" in first or first == "localhost")


def image_name(image: str, tree: Tree, options: SkaffoldOptions) -> str:
    name = image
    if options.default_repo and not _has_registry(image):
        name = f"{options.default_repo.rstrip('/')}/{image}"
    if "@" in name or ":" in name.rsplit("/", 1)[-1]:
        return name
    tag = options.tag or (tree.commit[:7] if tree.commit else "latest")
    return f"{name}:{tag}"


@dataclass
class _Loader:
    options: SkaffoldOptions
    open_git: OpenGit
    plan: Plan = field(default_factory=Plan)
    defined: set[str] = field(default_factory=set)
    read: list[str] = field(default_factory=list)
    seen: set[tuple[str, ...]] = field(default_factory=set)

    async def visit(
        self, tree: Tree, path: str, names: Sequence[str], inherited: Sequence[str], depth: int = 0
    ) -> None:
        where = tree.display(path)
        key = (where, *sorted(names), "|", *sorted(inherited))
        if key in self.seen:
            return
        if depth > 32:
            raise SourceError(f"{where}: requires nested more than 32 deep")
        self.seen.add(key)
        self.read.append(where)
        try:
            documents = load_documents(await tree.read(path))
        except YamlError as exc:
            raise SourceError(f"{where}:{exc.line or '?'}: {exc.message}") from None
        found: list[str] = []
        for doc in documents:
            if doc is None:
                continue
            check_version(doc, where)
            metadata = doc.get("metadata")
            name = metadata.get("name") if isinstance(metadata, Map) else None
            if names and name not in names:
                continue
            found.append(str(name))
            await self._config(tree, path, doc, inherited, depth)
        missing = sorted(set(names) - set(found))
        if missing:
            raise SourceError(f"{where}: no config named {missing[0]!r} (a requires asks for it)")

    async def _config(
        self, tree: Tree, path: str, doc: Map, inherited: Sequence[str], depth: int
    ) -> None:
        where = tree.display(path)
        defined = profile_names(doc)
        self.defined |= defined
        for name in inherited:
            if name not in defined:
                raise SourceError(
                    f"{where}:{doc.line}: activeProfiles names {name!r}, not a profile here"
                )
        active = [p for p in self.options.profiles if p in defined]
        active += [p for p in inherited if p not in active]
        profiled = apply_profiles(doc, active, where)
        config = _decode(profiled, _Config, where)
        if config.kind != "Config":
            raise SourceError(f"{where}:{doc.line}: kind: expected Config, got {config.kind!r}")
        directory = posixpath.dirname(path)
        for index, require in enumerate(config.requires):
            line = line_at(profiled, f"$.requires[{index}]", doc.line)
            origin = f"{where}:{line}"
            await self._require(tree, directory, require, active=active, origin=origin, depth=depth)
        self._artifacts(tree, path, profiled, config)

    async def _require(
        self,
        tree: Tree,
        directory: str,
        require: _Require,
        *,
        active: Sequence[str],
        origin: str,
        depth: int,
    ) -> None:
        profiles = [
            p.name
            for p in require.active_profiles
            if not p.activated_by or set(p.activated_by) & set(active)
        ]
        if require.path is not None:
            target = tree.join(directory, require.path)
            if not target.endswith((".yaml", ".yml")):
                target = posixpath.join(target, DEFAULT_CONFIG)
            await self.visit(tree, target, require.configs, profiles, depth + 1)
        elif require.git is not None:
            git = require.git
            try:
                remote = await self.open_git(git.repo, git.ref)
            except SourceError as exc:
                self.plan.refused.append(
                    Refused(f"{git.repo} (required config)", origin, str(exc), source=git.repo)
                )
                return
            await self.visit(remote, git.path, require.configs, profiles, depth + 1)
        elif require.google_cloud_storage is not None:
            reason = "configs in Google Cloud Storage are not read"
            skipped = Refused("googleCloudStorage requires", origin, reason, "skipped")
            self.plan.refused.append(skipped)

    def _artifacts(self, tree: Tree, path: str, doc: Map, config: _Config) -> None:
        where = tree.display(path)
        names = {a.image: image_name(a.image, tree, self.options) for a in config.build.artifacts}
        for artifact, raw in zip(config.build.artifacts, _raw_artifacts(doc), strict=True):
            origin = f"{where}:{raw.line}"
            builders = [key for key in raw if key in BUILDERS]
            if len(builders) > 1:
                raise SourceError(f"{origin}: artifact has more than one builder: {builders}")
            builder = builders[0] if builders else "docker"
            recipe = BUILDERS[builder]
            if isinstance(recipe, Unsupported):
                self.plan.refused.append(
                    Refused(names[artifact.image], origin, recipe.reason, "skipped")
                )
                continue
            context = ArtifactContext(artifact, tree, posixpath.dirname(path), names)
            fields = recipe(context)
            if isinstance(fields, Unsupported):
                self.plan.refused.append(
                    Refused(names[artifact.image], origin, fields.reason, "skipped")
                )
                continue
            try:
                request = request_from_builtins(
                    {**fields, "images": [names[artifact.image]], "priority": "batch"}
                )
            except ContractError as exc:
                raise _artifact_error(exc, raw, where, builder) from None
            self.plan.entries.append(Entry(request, origin))


def _raw_artifacts(doc: Map) -> list[Map]:
    """The artifacts as written (the decoder has checked they are mappings)."""
    build = doc.get("build")
    artifacts = build.get("artifacts") if isinstance(build, Map) else None
    return [a for a in artifacts if isinstance(a, Map)] if isinstance(artifacts, Seq) else []


def _artifact_error(exc: ContractError, raw: Map, where: str, builder: str) -> SourceError:
    message = str(exc).removeprefix("invalid build request: ")
    match = _AT_PATH.search(message)
    at = (match.group(1) if match else "$").removeprefix("$.").split("[")[0]
    request_field = at if at in _ARTIFACT_FIELDS else at.split(".")[0]
    artifact_field = _ARTIFACT_FIELDS.get(request_field, "image").format(builder=builder)
    line = line_at(raw, f"$.{artifact_field}", raw.line)
    return SourceError(f"{where}:{line}: {artifact_field}: {_AT_PATH.sub('', message)}")


async def load_skaffold(
    tree: Tree, path: str, options: SkaffoldOptions, open_git: OpenGit
) -> tuple[Plan, set[str]]:
    """The entries of the config at `path` and of every config it requires, and the names
    of the profiles they define."""
    loader = _Loader(options, open_git)
    await loader.visit(tree, path, (), ())
    return loader.plan, loader.defined

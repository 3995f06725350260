"""A repository's registry cache: named per repository and branch, and what makes a build
on a daemon that never built the repository (a spilled build) find its slow step cached."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from buildfleet.config import ConfigError, load_config
from buildfleet.services import find_tool
from producer.contract import BuildRequest, CachePolicy, GitSource, LocalSource, Log, Step
from worker.backends.base import BuildJob
from worker.backends.buildkit import BuildkitBackend, buildctl_argv
from worker.registry_cache import registry_cache, repository_name, tag_for
from worker.settings import BuildkitSettings, CacheSettings, DaemonSettings

from registry import served_digest

PREFIX = "registry.example:5000/buildcache"
ON = CacheSettings(registry=PREFIX)


def git_request(url: str, ref: str = "HEAD", **kwargs: object) -> BuildRequest:
    return BuildRequest(source=GitSource(url=url, ref=ref), push=False, **kwargs)  # type: ignore[arg-type]


def test_a_branch_build_exports_to_its_branch_and_imports_it_and_the_default_branch() -> None:
    policy = registry_cache(git_request("git://forge/team/App.git", "refs/heads/feature"), ON)
    repository = policy.export_ref.rsplit(":", 1)[0] if policy.export_ref else ""
    assert repository.startswith(f"{PREFIX}/app-")
    assert policy.export_ref == f"{repository}:feature"
    assert policy.import_refs == (f"{repository}:feature", f"{repository}:main")
    assert policy.mode == "max"


def test_a_default_branch_build_imports_its_cache_once() -> None:
    for ref in ("HEAD", "main", "refs/heads/main"):
        policy = registry_cache(git_request("git://forge/app.git", ref), ON)
        assert len(policy.import_refs) == 1, ref
        assert policy.export_ref == policy.import_refs[0]
        assert policy.export_ref.endswith(":main")


def test_no_registry_configured_or_a_cache_of_its_own_is_left_alone() -> None:
    plain = git_request("git://forge/app.git")
    assert registry_cache(plain, CacheSettings()) is plain.cache
    own = git_request("git://forge/app.git", cache=CachePolicy(import_refs=("reg/c:x",)))
    assert registry_cache(own, ON) is own.cache
    off = git_request("git://forge/app.git", cache=CachePolicy(disabled=True))
    assert registry_cache(off, ON) is off.cache


def test_repositories_with_the_same_name_or_two_dockerfiles_never_share_a_cache() -> None:
    names = {
        repository_name(git_request("git://forge-a/app.git")),
        repository_name(git_request("git://forge-b/app.git")),
        repository_name(git_request("git://forge-a/app.git", dockerfile="Dockerfile.dev")),
    }
    assert len(names) == 3
    assert all(name.startswith("app-") for name in names)


def test_refs_that_are_not_tags_become_distinct_valid_tags() -> None:
    tags = [tag_for(ref) for ref in ("feature/x", "feature-x", ".hidden", "a" * 300, "ünï")]
    assert len(set(tags)) == len(tags)
    for tag in tags:
        assert 0 < len(tag) <= 128
        assert tag[0].isalnum() or tag[0] == "_"
        assert all((c.isalnum() and c.isascii()) or c in "_.-" for c in tag), tag
    assert tag_for("feature-x") == "feature-x"


def test_the_cache_becomes_buildctl_import_and_export_flags() -> None:
    request = git_request("git://forge/app.git", "refs/heads/dev")
    policy = registry_cache(request, ON)
    argv = buildctl_argv(
        ["buildctl"], BuildRequest(source=request.source, push=False, cache=policy), Path("/m")
    )
    pairs = list(itertools.pairwise(argv))
    for ref in policy.import_refs:
        assert ("--import-cache", f"type=registry,ref={ref}") in pairs
    export = f"type=registry,ref={policy.export_ref},mode=max,ignore-error=true"
    assert ("--export-cache", export) in pairs


@pytest.mark.timeout(300)
async def test_a_spilled_build_finds_its_slow_step_in_the_repository_cache(
    buildkitd_pool: list[str], registry: str, base_image: str, tmp_path: Path
) -> None:
    """Built once on one daemon, then on another that never built it: with the registry
    cache its slow step is cached there; without it, that daemon runs the step again."""
    first, second = buildkitd_pool[:2]
    settings = BuildkitSettings(
        daemons=(DaemonSettings(address=first), DaemonSettings(address=second)),
        buildctl=find_tool("buildctl"),
    )
    cache = CacheSettings(registry=f"{registry}/buildcache")

    def request_for(name: str) -> BuildRequest:
        context = tmp_path / name
        context.mkdir()
        (context / "Dockerfile").write_text(
            f"FROM {base_image}\nRUN echo {tmp_path.name}-{name} > /deps && sleep 1\nCOPY . /src\n"
        )
        (context / "main.txt").write_text(f"{name}\n")
        return BuildRequest(source=LocalSource(path=str(context)), push=False)

    async def slow_step_cached(backend: BuildkitBackend, request: BuildRequest, on: str) -> bool:
        steps: list[Step] = []

        async def progress(event: Step | Log) -> None:
            if isinstance(event, Step) and "RUN echo" in event.name and event.completed:
                steps.append(event)

        await backend.build(BuildJob(request=request, attempt=1, placement=on), progress)
        assert steps, "the RUN step was never reported"
        return all(step.cached for step in steps)

    with_cache, without = BuildkitBackend(settings, cache=cache), BuildkitBackend(settings)
    shared = request_for("shared")
    assert not await slow_step_cached(with_cache, shared, first)
    exported = registry_cache(shared, cache).export_ref
    assert exported is not None
    repository, tag = exported.removeprefix(f"{registry}/").rsplit(":", 1)
    assert served_digest(registry, repository, tag) is not None
    assert await slow_step_cached(with_cache, shared, second)

    alone = request_for("alone")
    assert not await slow_step_cached(without, alone, first)
    assert not await slow_step_cached(without, alone, second)


def test_the_cache_section_is_read_and_a_prefix_that_is_no_repository_is_refused(
    tmp_path: Path,
) -> None:
    config = tmp_path / "fleet.toml"
    config.write_text('[cache]\nregistry = "reg.example:5000/cache"\ndefault_branch = "trunk"\n')
    worker = load_config(config, environ={}).for_worker()
    assert worker.cache == CacheSettings(registry="reg.example:5000/cache", default_branch="trunk")
    for bad in ("https://reg.example/cache", "reg.example/cache/", "Reg/Cache"):
        config.write_text(f'[cache]\nregistry = "{bad}"\n')
        with pytest.raises(ConfigError, match=r"cache\.registry"):
            load_config(config, environ={})

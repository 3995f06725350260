"""`buildfleet rebuild` building for real: git repositories served by `git daemon`, built by
buildkitd and pushed to the registry; reports read back as JSON and by a JUnit reader."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from junitparser import Failure, JUnitXml, Skipped

from buildfleet.rebuild.gitread import GitReader
from buildfleet.rebuild.plan import SourceError
from producer.client import BuildfleetClient

from fleet import cli, worker_config, worker_processes
from gitrepos import GitRepo, GitServer, git
from registry import served_digest

pytestmark = pytest.mark.timeout(900)


def service_files(base_image: str, repo: str, broken: str | None = None) -> dict[str, str]:
    """Three services, each a Dockerfile in its own directory; `broken` fails its RUN."""
    files = {}
    for service in ("api", "web", "jobs"):
        run = "echo about to fail; echo last words >&2; exit 3" if service == broken else "true"
        files[f"{service}/Dockerfile"] = (
            f"FROM {base_image}\nCOPY hello.txt /hello.txt\nRUN {run}\n"
        )
        files[f"{service}/hello.txt"] = f"{repo}/{service}\n"
    return files


def build_entry(repo: GitRepo, service: str, registry: str) -> str:
    return (
        "[[build]]\n"
        f'source = {{ type = "git", url = "{repo.url}", ref = "main" }}\n'
        f'context = "{service}"\n'
        f'images = ["{registry}/nightly/{repo.name.removesuffix(".git")}-{service}:1"]\n'
    )


async def test_twelve_images_over_four_repositories_one_broken_reported_as_json_and_junit(
    redis: aioredis.Redis,
    redis_url: str,
    buildkitd_pool: list[str],
    registry: str,
    base_image: str,
    git_server: GitServer,
    tmp_path: Path,
) -> None:
    repos = [
        git_server.create_repo(
            f"nightly-{n}",
            service_files(base_image, f"nightly-{n}", broken="web" if n == 2 else None),
        )
        for n in range(4)
    ]
    manifest = tmp_path / "nightly.toml"
    manifest.write_text(
        "\n".join(
            build_entry(repo, service, registry)
            for repo in repos
            for service in ("api", "web", "jobs")
        )
    )
    config = worker_config(redis_url, daemons=buildkitd_pool, max_builds=3, concurrency=3)
    with worker_processes(config, count=2, logs=tmp_path):
        done = cli(
            redis_url, "rebuild", str(manifest), "--batch", "nightly",
            "--report", "report.json", "--junit", "report.xml", cwd=tmp_path,
        )  # fmt: skip
    assert done.returncode == 1, done.stderr  # one build failed
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["counts"] == {"failed": 1, "succeeded": 11}
    by_name = {build["name"]: build for build in report["builds"]}
    assert len(by_name) == 12
    broken = by_name[f"{registry}/nightly/nightly-2-web:1"]
    assert broken["status"] == "failed"
    assert broken["error_class"] == "run_failed"
    assert "exit 3" in broken["failed_step"]
    assert any("last words" in line for line in broken["log_tail"])
    assert broken["source"].startswith(f"{repos[2].url}@{repos[2].head[:12]}")
    for name, build in by_name.items():
        if build["status"] == "succeeded":
            repository, _, tag = name.partition("/")[2].rpartition(":")
            assert served_digest(registry, repository, tag) == build["digest"]
            assert build["duration_s"] > 0 and "log_tail" not in build

    suites = JUnitXml.fromfile(str(tmp_path / "report.xml"))
    [suite] = list(suites)
    assert (suite.tests, suite.failures, suite.errors, suite.skipped) == (12, 1, 0, 0)
    cases = {case.name: case for case in suite}
    assert set(cases) == set(by_name)
    [failure] = cases[broken["name"]].result
    assert isinstance(failure, Failure)
    assert failure.type == "run_failed"
    assert "last words" in (failure.text or "")
    assert all(cases[name].is_passed for name in by_name if name != broken["name"])
    assert cases[broken["name"]].classname == broken["source"]


async def test_base_selects_exactly_the_images_built_from_it(
    redis: aioredis.Redis,
    redis_url: str,
    registry: str,
    base_image: str,
    git_server: GitServer,
    tmp_path: Path,
) -> None:
    base = base_image.rsplit(":", 1)[0]  # the repository: any tag matches
    other = f"{registry}/base/other:1"
    dockerfiles = {
        "arg-default": f"ARG BASE={base_image}\nFROM ${{BASE}}\nRUN true\n",
        "multi-stage": f"FROM {base}:latest AS build\nRUN true\nFROM build AS final\n",
        "copy-from": f"FROM {base_image} AS tools\nFROM scratch\nCOPY --from=tools /bin/sh /sh\n",
        "other-base": f"FROM {other}\n",
        "unused-stage": f"FROM {base_image} AS old\nFROM {other} AS new\n",
        "arg-elsewhere": f"ARG BASE={other}\nFROM ${{BASE}}\n",
        "target-other": f"FROM {base_image} AS a\nFROM {other} AS b\nFROM a AS c\n",
    }
    repo = git_server.create_repo(
        "bases", {f"{name}/Dockerfile": text for name, text in dockerfiles.items()}
    )
    entries = [
        "[[build]]\n"
        f'source = {{ type = "git", url = "{repo.url}", ref = "main" }}\n'
        f'context = "{name}"\n'
        f'images = ["{registry}/sel/{name}:1"]\n'
        + ('target = "b"\n' if name == "target-other" else "")
        for name in dockerfiles
    ]
    manifest = tmp_path / "all.toml"
    manifest.write_text("\n".join(entries))

    dry = cli(redis_url, "rebuild", str(manifest), "--base", base, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    chosen = {b["name"].split("/")[2].split(":")[0]: b["matches"] for b in plan["build"]}
    assert sorted(chosen) == ["arg-default", "copy-from", "multi-stage"]
    assert chosen["arg-default"] == [f"line 2: FROM ${{BASE}} -> {base_image}"]
    assert chosen["multi-stage"] == [f"line 1: FROM {base}:latest AS build -> {base_image}"]
    left = {b["name"].split("/")[2].split(":")[0]: b["why"] for b in plan["left_out"]}
    assert left["unused-stage"] == f"builds FROM line 2: FROM {other} AS new -> {other}"
    assert set(left) == {"other-base", "unused-stage", "arg-elsewhere", "target-other"}

    # A --build-arg reaches FROM; an exact tag that no FROM names selects nothing.
    overridden = cli(
        redis_url, "rebuild", str(manifest), "--base", base, "--build-arg",
        f"BASE={base_image}", "--dry-run", "--json",
    )  # fmt: skip
    assert len(json.loads(overridden.stdout)["build"]) == 4  # arg-elsewhere joins
    exact = cli(redis_url, "rebuild", str(manifest), "--base", f"{base}:9.9", "--dry-run", "--json")
    assert json.loads(exact.stdout)["build"] == []

    # And the run submits exactly those, at batch priority.
    config = worker_config(redis_url, backend="simulate", concurrency=4)
    with worker_processes(config, count=1, logs=tmp_path):
        done = cli(redis_url, "rebuild", str(manifest), "--base", base, "--wait", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["counts"] == {"succeeded": 3}
    fleet = BuildfleetClient(redis)
    state = await fleet.get(report["builds"][0]["build_id"])
    assert state.request is not None and state.request.priority == "batch"
    assert state.request.source.commit == repo.head  # type: ignore[union-attr]


SKAFFOLD_APP = """\
apiVersion: skaffold/v4beta11
kind: Config
metadata:
  name: app
requires:
  - path: ../lib
build:
  artifacts:
    - image: web
      context: web
      docker:
        buildArgs:
          VERSION: 1.10
          DEBUG: 1
    - image: api
      jib:
        project: api
        args: [-Pprod]
profiles:
  - name: prod
    patches:
      - op: add
        path: /build/artifacts/0/docker/target
        value: release
---
apiVersion: skaffold/v4beta13
kind: Config
metadata:
  name: worker
build:
  artifacts:
    - image: worker
      context: worker
      kaniko:
        dockerfile: build/Containerfile
"""

SKAFFOLD_SHARED = """\
apiVersion: skaffold/v4beta13
kind: Config
build:
  artifacts:
    - image: shared
      context: ../svc
"""

SKAFFOLD_LIB = """\
apiVersion: skaffold/v4beta5
kind: Config
metadata:
  name: lib
build:
  artifacts:
    - image: lib
      context: .
"""


async def test_a_skaffold_config_with_profiles_documents_requires_and_a_jib_artifact(
    redis: aioredis.Redis,
    redis_url: str,
    buildkitd: str,
    registry: str,
    base_image: str,
    git_server: GitServer,
    tmp_path: Path,
) -> None:
    # The Dockerfiles check what reaches them: a YAML 1.1 reader would pass 1.1 and True.
    web = (
        f"FROM {base_image} AS dev\nARG VERSION\nARG DEBUG\n"
        'RUN test "$VERSION" = 1.10 && test "$DEBUG" = 1\n'
        "FROM dev AS release\nRUN touch /release\n"
    )
    shared = git_server.create_repo(
        "skaffold-shared",
        {
            "config/skaffold.yaml": SKAFFOLD_SHARED,
            "svc/Dockerfile": f"FROM {base_image}\nRUN true\n",
        },
    )
    requires_git = f"  - git:\n      repo: {shared.url}\n      path: config/skaffold.yaml\n"
    app = SKAFFOLD_APP.replace("  - path: ../lib\n", f"  - path: ../lib\n{requires_git}")
    repo = git_server.create_repo(
        "skaffolded",
        {
            "deploy/skaffold.yaml": app,
            "deploy/web/Dockerfile": web,
            "deploy/worker/build/Containerfile": f"FROM {base_image}\nRUN true\n",
            "lib/skaffold.yaml": SKAFFOLD_LIB,
            "lib/Dockerfile": f"FROM {base_image}\nRUN true\n",
        },
    )
    source = f"{repo.url}#main:deploy/skaffold.yaml"
    shared_short = shared.head[:7]
    config = worker_config(redis_url, daemons=[buildkitd], max_builds=3, concurrency=3)
    with worker_processes(config, count=1, logs=tmp_path):
        done = cli(
            redis_url, "rebuild", source, "--profile", "prod", "--default-repo",
            f"{registry}/sk", "--wait", "--json", "--junit", "sk.xml", cwd=tmp_path,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    short = repo.head[:7]
    statuses = {b["name"]: b["status"] for b in report["builds"]}
    assert statuses == {
        f"{registry}/sk/lib:{short}": "succeeded",
        f"{registry}/sk/web:{short}": "succeeded",
        f"{registry}/sk/worker:{short}": "succeeded",
        f"{registry}/sk/api:{short}": "skipped",
        f"{registry}/sk/shared:{shared_short}": "succeeded",
    }
    [jib] = [b for b in report["builds"] if b["status"] == "skipped"]
    assert jib["error"] == (
        "jib artifact: args ['-Pprod'] would reach Maven unvalidated; "
        "configure them in the project's pom.xml"
    )
    assert jib["origin"] == f"{repo.url}@{repo.head[:12]}:deploy/skaffold.yaml:18"
    fleet = BuildfleetClient(redis)
    web_build = next(b for b in report["builds"] if "/web:" in b["name"])
    request = (await fleet.get(web_build["build_id"])).request
    assert request is not None
    assert (request.context, request.target) == ("deploy/web", "release")
    assert request.build_args == {"VERSION": "1.10", "DEBUG": "1"}
    [suite] = list(JUnitXml.fromfile(str(tmp_path / "sk.xml")))
    assert (suite.tests, suite.failures, suite.skipped) == (5, 0, 1)
    skipped = next(case for case in suite if case.name.endswith(f"/api:{short}"))
    assert isinstance(skipped.result[0], Skipped)


async def test_the_gateway_rules_rebuild_every_branch_a_push_would(
    redis_url: str, registry: str, base_image: str, git_server: GitServer, tmp_path: Path
) -> None:
    files = {"Dockerfile": f"FROM {base_image}\n", "tools/Dockerfile": "FROM scratch\n"}
    api = git_server.create_repo("acme/api", files)
    api.commit({"x": "1"}, branch="release/1.0")
    api.commit({"y": "1"}, branch="feature/x")  # no rule builds feature branches
    web = git_server.create_repo("acme/web", files)
    config = tmp_path / "fleet.toml"
    config.write_text(
        "[[gateway.rules]]\n"
        'repo = "acme/*"\n'
        'branches = ["main", "release/*"]\n'
        f'images = ["{registry}/{{repo}}:{{branch}}-{{short_sha}}"]\n'
        "\n[[gateway.rules]]\n"
        'repo = "acme/api"\n'
        'branches = ["main"]\n'
        'context = "tools"\n'
        f'images = ["{registry}/acme/api-tools:{{branch}}"]\n'
        "\n[[gateway.rules]]\n"
        'repo = "acme/*"\n'
        "branches = []\n"
        'tags = ["v*"]\n'
        f'images = ["{registry}/{{repo}}:{{tag}}"]\n'
    )
    clone_url = f"{git_server.url}{{repo}}.git"
    done = cli(
        redis_url, "rebuild", "--config", str(config), "--clone-url", clone_url,
        "--repo", "acme/web", "--base", base_image, "--dry-run", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    heads = {  # the branch heads, read from the repositories themselves
        ("api", "main"): git(api.path, "rev-parse", "main")[:7],
        ("api", "release-1.0"): git(api.path, "rev-parse", "release/1.0")[:7],
        ("web", "main"): web.head[:7],
    }
    assert sorted(b["name"] for b in plan["build"]) == sorted(
        f"{registry}/acme/{repo}:{branch}-{sha}" for (repo, branch), sha in heads.items()
    )
    left = {(b["name"], b["status"]) for b in plan["left_out"]}
    assert (f"{registry}/acme/api-tools:main", "not_selected") in left  # FROM scratch
    assert ("acme/*", "skipped") in left  # the tag-only rule


async def test_many_commits_of_one_repository_are_read_at_once_each_its_own_file(
    git_server: GitServer, tmp_path: Path
) -> None:
    repo = git_server.create_repo("busy", {"Dockerfile": "FROM base:0\n"})
    commits = [repo.commit({"Dockerfile": f"FROM base:{n}\n"}, branch=f"b{n}") for n in range(8)]
    reader = GitReader(tmp_path)
    resolved = await asyncio.gather(*(reader.resolve(repo.url, f"b{n}") for n in range(8)))
    assert resolved == commits
    texts = await asyncio.gather(
        *(reader.read(repo.url, sha, "Dockerfile", ref=f"b{n}") for n, sha in enumerate(commits))
    )
    assert texts == [f"FROM base:{n}\n" for n in range(8)]
    with pytest.raises(SourceError, match=r"nope: not found at"):
        await reader.read(repo.url, commits[0], "nope")
    with pytest.raises(SourceError, match=r"no branch or tag named 'b9'"):
        await reader.resolve(repo.url, "b9")

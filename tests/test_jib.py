"""The jib backend: its Maven command line and output parsing (pure), then real Maven + Jib
builds against the session's registry and git daemon, directly and through a worker."""

from __future__ import annotations

import asyncio
import io
import json
import random
import tarfile
import urllib.request
from pathlib import Path

import msgspec
import pytest
from builders import processes_mentioning
from javaproject import MAIN_CLASS, jib_settings, maven_project, silent_registry

from producer.client import BuildfleetClient
from producer.contract import (
    BuildRequest,
    GitSource,
    JibRecipe,
    LocalSource,
    Log,
    Step,
)
from worker.backends.base import BuildJob
from worker.backends.jib import JibBackend
from worker.backends.jib.maven import JibRequestError, MavenSteps, maven_argv
from worker.errors import PermanentBuildError, TemporaryBuildError
from worker.retry import classify
from worker.settings import JibSettings

from fleet import cli, worker_config, worker_in_task
from gitrepos import GitServer
from registry import image_config, manifest, served_digest

pytestmark = pytest.mark.timeout(600)
BOUND = 240.0
POM = Path("/scratch/source/pom.xml")
DIGEST = Path("/scratch/out/digest")


def jib_request(source: LocalSource | GitSource, *images: str, **recipe: str) -> BuildRequest:
    return BuildRequest(source=source, images=images, recipe=JibRecipe(**recipe))  # type: ignore[arg-type]


def local(tmp_path: Path, files: dict[str, str], name: str = "src") -> LocalSource:
    for path, text in files.items():
        (tmp_path / name / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name / path).write_text(text)
    return LocalSource(path=str(tmp_path / name))


class Sink:
    def __init__(self) -> None:
        self.events: list[Step | Log] = []

    async def __call__(self, event: Step | Log) -> None:
        self.events.append(event)

    @property
    def steps(self) -> list[Step]:
        return [e for e in self.events if isinstance(e, Step)]


# --- the command line (pure) -----------------------------------------------------------


def test_the_maven_command_carries_only_validated_values() -> None:
    settings = JibSettings(maven_repository="/var/cache/m2", insecure_registries=("r.local:5000",))
    request = jib_request(
        LocalSource(path="/src"),
        "r.local:5000/team/app:1",
        "r.local:5000/team/app:latest",
        base_image="r.local:5000/base/jre:17",
        main_class="com.example.Main",
    )
    argv = maven_argv(settings, request.recipe, request, POM, DIGEST)  # type: ignore[arg-type]
    assert argv[:5] == ["mvn", "--batch-mode", "--no-transfer-progress", "--file", str(POM)]
    assert "-Dmaven.repo.local=/var/cache/m2" in argv
    assert "com.google.cloud.tools:jib-maven-plugin:3.5.2:build" in argv
    assert "-Dimage=r.local:5000/team/app:1" in argv
    assert "-Djib.to.tags=latest" in argv
    assert "-Djib.from.image=r.local:5000/base/jre:17" in argv
    assert "-Djib.container.mainClass=com.example.Main" in argv
    assert f"-Djib.outputPaths.digest={DIGEST}" in argv
    assert "-Djib.allowInsecureRegistries=true" in argv
    assert "--offline" not in argv and "-o" not in argv  # jib:build refuses offline mode


@pytest.mark.parametrize(
    ("images", "base", "insecure"),
    [
        (("r.local:5000/a:1",), "r.local:5000/jre:17", True),
        (("r.local:5000/a:1",), "registry.example.com/jre:17", False),  # one secure registry
        (("registry.example.com/a:1",), None, False),
    ],
)
def test_insecure_connections_only_to_registries_configured_insecure(
    images: tuple[str, ...], base: str | None, insecure: bool
) -> None:
    settings = JibSettings(insecure_registries=("r.local:5000",))
    request = jib_request(LocalSource(path="/s"), *images, **({"base_image": base} if base else {}))
    argv = maven_argv(settings, request.recipe, request, POM, DIGEST)  # type: ignore[arg-type]
    assert ("-Djib.allowInsecureRegistries=true" in argv) == insecure


def test_a_build_that_is_not_pushed_writes_a_tarball_and_contacts_no_registry() -> None:
    request = msgspec.structs.replace(
        jib_request(LocalSource(path="/s"), "r.local:5000/a:1"), push=False
    )
    argv = maven_argv(jib_settings(), request.recipe, request, POM, DIGEST)  # type: ignore[arg-type]
    assert "com.google.cloud.tools:jib-maven-plugin:3.5.2:buildTar" in argv


@pytest.mark.parametrize(
    ("images", "tool", "says"),
    [
        (("r.local/a:1", "r.local/b:1"), "maven", "one repository per build"),
        (("r.local/a@sha256:" + "a" * 64,), "maven", "tags, not digests"),
        (("r.local/a:1",), "gradle", "recipe.tool='gradle' is not supported yet"),
    ],
    ids=["two-repositories", "digest", "gradle"],
)
def test_what_jib_cannot_push_is_refused_saying_why(
    images: tuple[str, ...], tool: str, says: str
) -> None:
    request = jib_request(LocalSource(path="/s"), *images, tool=tool)
    with pytest.raises(JibRequestError, match=says):
        maven_argv(jib_settings(), request.recipe, request, POM, DIGEST)  # type: ignore[arg-type]


# --- Maven's output (pure) -------------------------------------------------------------

COMPILE_FAILURE = """\
[INFO] Scanning for projects...
[INFO] --- maven-resources-plugin:2.6:resources (default-resources) @ hello ---
[INFO] skip non existing resourceDirectory /w/source/src/main/resources
[INFO] \x1b[1m--- maven-compiler-plugin:3.1:compile (default-compile) @ hello ---\x1b[m
[INFO] Compiling 2 source files to /w/source/target/classes
[ERROR] COMPILATION ERROR :
[ERROR] /w/source/src/main/java/example/Broken.java:[4,13] illegal start of expression
[INFO] 1 error
[INFO] ------------------------------------------------------------------------
[INFO] BUILD FAILURE
[ERROR] Failed to execute goal org.apache.maven.plugins:maven-compiler-plugin:3.1:compile \
(default-compile) on project hello: Compilation failure
[ERROR] /w/source/src/main/java/example/Broken.java:[4,13] illegal start of expression
[ERROR] -> [Help 1]
[ERROR]
[ERROR] To see the full stack trace of the errors, re-run Maven with the -e switch.
"""


def test_maven_goal_lines_become_steps_and_the_rest_logs_of_the_step() -> None:
    steps = MavenSteps("b1", 2)
    events = [e for line in COMPILE_FAILURE.splitlines(True) for e in steps.feed(line, 1.0)]
    started = [e.name for e in events if isinstance(e, Step) and e.completed is None]
    assert started == [
        "maven-resources-plugin:resources @ hello",
        "maven-compiler-plugin:compile @ hello",
    ]
    compiling = next(e for e in events if isinstance(e, Log) and "Compiling" in e.text)
    assert compiling.vertex == "step-2" and compiling.attempt == 2
    assert steps.failure() == (
        "maven-compiler-plugin:compile failed: Compilation failure: "
        "/w/source/src/main/java/example/Broken.java:[4,13] illegal start of expression"
    )
    assert "[INFO] BUILD FAILURE" not in steps.tail and "[ERROR] -> [Help 1]" not in steps.tail
    [ended] = steps.finish(2.0, "it failed")
    assert (ended.name, ended.error, ended.completed) == (started[1], "it failed", 2.0)


# --- real builds -----------------------------------------------------------------------


async def build(
    settings: JibSettings, request: BuildRequest, sink: Sink | None = None
) -> str | None:
    backend = JibBackend(settings)
    try:
        built = await asyncio.wait_for(backend.build(BuildJob(request, 1), sink or Sink()), BOUND)
    finally:
        await backend.aclose()
    return built.digest


def _layer_files(registry: str, repository: str, reference: str) -> dict[str, bytes]:
    """Every regular file of the image's layers (a path -> its content; small images only)."""
    files: dict[str, bytes] = {}
    for layer in manifest(registry, repository, reference)["layers"]:
        url = f"http://{registry}/v2/{repository}/blobs/{layer['digest']}"
        with urllib.request.urlopen(url, timeout=30) as response:
            blob = response.read()
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
            for member in tar.getmembers():
                if member.isfile() and (content := tar.extractfile(member)) is not None:
                    files[member.name.removeprefix("./").lstrip("/")] = content.read()
    return files


async def test_a_jib_build_pushes_an_image_whose_entrypoint_runs_the_main_class(
    registry: str, base_image: str, tmp_path: Path
) -> None:
    source = local(tmp_path, maven_project())
    request = jib_request(
        source,
        f"{registry}/jib/hello:1",
        f"{registry}/jib/hello:stable",
        base_image=base_image,
        main_class=MAIN_CLASS,
    )
    sink = Sink()
    digest = await build(jib_settings(registry), request, sink)
    assert digest is not None
    assert served_digest(registry, "jib/hello", "1") == digest
    assert served_digest(registry, "jib/hello", "stable") == digest
    config = image_config(registry, "jib/hello", "1")["config"]
    assert config["Entrypoint"] == ["java", "-cp", "@/app/jib-classpath-file", MAIN_CLASS]
    layers = _layer_files(registry, "jib/hello", "1")
    assert b"hello from jib" in layers["app/classes/example/Hello.class"]
    assert "bin/busybox" in layers  # the base image's layer
    names = [s.name for s in sink.steps if s.completed]
    assert "jib-maven-plugin:build @ hello" in names
    assert not (Path(source.path) / "target").exists()  # built in a copy, not in place
    # Jib builds are reproducible: the same source gives the same digest.
    again = msgspec.structs.replace(request, id=f"{request.id}-again")
    assert await build(jib_settings(registry), again) == digest


async def test_a_compile_error_fails_permanently_naming_the_file_and_the_goal(
    registry: str, tmp_path: Path
) -> None:
    source = local(tmp_path, maven_project(broken=True))
    request = jib_request(source, f"{registry}/jib/broken:1", base_image="scratch")
    sink = Sink()
    with pytest.raises(PermanentBuildError) as info:
        await build(jib_settings(registry), request, sink)
    error = info.value
    assert error.error_class == "compile_failed", error.message
    assert "src/main/java/example/Broken.java:[4,13] illegal start of expression" in error.message
    assert "buildfleet-jib-" not in error.message  # the scratch directory is not the user's
    assert error.step == "maven-compiler-plugin:compile @ hello"
    assert any("illegal start of expression" in line for line in error.log_tail)
    assert [s.name for s in sink.steps if s.error] == [error.step]
    assert served_digest(registry, "jib/broken", "1") is None


async def test_an_unreachable_registry_is_temporary(tmp_path: Path) -> None:
    source = local(tmp_path, maven_project())
    request = jib_request(source, "127.0.0.1:9/jib/nowhere:1", base_image="scratch")
    with pytest.raises(TemporaryBuildError) as info:
        await build(jib_settings("127.0.0.1:9"), request)
    assert info.value.error_class == "connection_lost", info.value.message
    assert "Connection refused" in info.value.message


async def test_a_missing_base_image_fails_permanently(registry: str, tmp_path: Path) -> None:
    source = local(tmp_path, maven_project())
    request = jib_request(
        source, f"{registry}/jib/orphan:1", base_image=f"{registry}/base/no-such-jre:17"
    )
    with pytest.raises(PermanentBuildError) as info:
        await build(jib_settings(registry), request)
    assert info.value.error_class == "base_image_not_found", info.value.message


@pytest.mark.parametrize(
    ("message", "error_class", "temporary"),
    [
        # Jib 3.5.2's words, from real runs (a live test of the first takes Jib's ten
        # HTTPS retries, over a minute).
        (
            "jib-maven-plugin:build failed: Build image failed, perhaps you should use a "
            "registry that supports HTTPS or set the configuration parameter "
            "'allowInsecureRegistries': Failed to verify the server at https://r:5000/v2/",
            "insecure_registry",
            False,
        ),
        (
            "jib-maven-plugin:build failed: registry-1.docker.io: Name or service not known: "
            "Unknown host registry-1.docker.io: Name or service not known",
            "connection_lost",
            True,
        ),
        (
            "maven-resources-plugin:resources failed: Could not transfer artifact "
            "org.apache.maven:maven-core:pom:2.0.6 from/to central: Connection reset",
            "dependency_unavailable",
            True,
        ),
        (
            "maven-compiler-plugin:compile failed: Could not resolve dependencies for project "
            "example:hello:jar:1.0: Could not find artifact com.example:nope:jar:9 in central",
            "project_invalid",
            False,
        ),
    ],
    ids=["insecure-registry", "unknown-host", "maven-central-down", "missing-dependency"],
)
def test_maven_and_jib_failures_map_onto_the_retry_table(
    message: str, error_class: str, temporary: bool
) -> None:
    error = classify(message)
    assert (error.error_class, isinstance(error, TemporaryBuildError)) == (
        error_class,
        temporary,
    )


@pytest.mark.parametrize(
    ("module", "files", "says"),
    [
        ("svc", maven_project("other"), "no pom.xml in module 'svc'"),
        ("link", {"pom.xml": "<project/>"}, "leads out of the source"),
    ],
    ids=["no-pom", "symlink-out"],
)
async def test_a_module_that_is_not_a_project_inside_the_source_is_refused(
    tmp_path: Path, module: str, files: dict[str, str], says: str
) -> None:
    source = local(tmp_path, files)
    (Path(source.path) / "link").symlink_to(tmp_path.parent)
    request = jib_request(source, "r.local/a:1", module=module)
    with pytest.raises(PermanentBuildError, match=says) as info:
        await build(jib_settings(), request)
    assert info.value.error_class == "source_not_found"


async def test_cancel_while_jib_waits_on_a_registry_stops_maven(tmp_path: Path) -> None:
    async with silent_registry() as silent:
        marker = f"cancelled{random.randrange(10**6, 10**7)}"
        source = local(tmp_path, maven_project())
        request = jib_request(
            source, f"{silent}/jib/{marker}:1", base_image=f"{silent}/base/jre:17"
        )
        backend, sink = JibBackend(jib_settings(silent)), Sink()
        task = asyncio.create_task(backend.build(BuildJob(request, 1), sink))
        try:
            while not any(s.name.startswith("jib-maven-plugin:build") for s in sink.steps):
                assert not task.done(), task
                await asyncio.sleep(0.1)
            assert processes_mentioning(marker)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 30)
        finally:
            task.cancel()
    assert processes_mentioning(marker) == []


# --- through a worker --------------------------------------------------------------------


async def test_a_git_module_builds_through_a_worker_and_its_timeout_fails_it(
    fleet: BuildfleetClient, redis_url: str, registry: str, base_image: str, git_server: GitServer
) -> None:
    files = {
        **maven_project("services/api", greeting="from-main", artifact="api"),
        "services/README": "not a project\n",
    }
    repo = git_server.create_repo(f"jib-{registry.rsplit(':', 1)[1]}", files)
    repo.commit(maven_project("services/api", greeting="from-release", artifact="api"),
                branch="release")  # fmt: skip
    request = jib_request(
        GitSource(url=repo.url, ref="release"),
        f"{registry}/jib/api:1",
        module="services/api",
        base_image=base_image,
        main_class=MAIN_CLASS,
    )
    config = worker_config(redis_url, backend="jib", jib=jib_settings(registry))
    async with silent_registry() as silent, worker_in_task(config):
        result = await asyncio.wait_for(fleet.wait(await fleet.submit(request)), BOUND)
        hanging = msgspec.structs.replace(
            request,
            id=f"{request.id}-hangs",
            images=(f"{silent}/jib/api:1",),
            timeout_s=8.0,
        )
        timed_out = await asyncio.wait_for(fleet.wait(await fleet.submit(hanging)), BOUND)
    assert result.status == "succeeded", result
    assert result.backend == "jib"
    assert served_digest(registry, "jib/api", "1") == result.digest
    events = [e async for e in fleet.watch(request.id)]
    assert any(isinstance(e, Step) and e.name == "jib-maven-plugin:build @ api" for e in events)
    assert timed_out.status == "failed" and timed_out.error_class == "timeout", timed_out
    assert processes_mentioning(f"{silent}/jib/api") == []
    layers = _layer_files(registry, "jib/api", "1")
    assert b"from-release" in layers["app/classes/example/Hello.class"]


SKAFFOLD = """\
apiVersion: skaffold/v4beta13
kind: Config
build:
  artifacts:
    - image: api
      context: services
      jib:
        project: api
        fromImage: {base}
"""


async def test_a_skaffold_jib_artifact_is_rebuilt_by_a_jib_worker(
    fleet: BuildfleetClient,
    redis_url: str,
    registry: str,
    base_image: str,
    git_server: GitServer,
    tmp_path: Path,
) -> None:
    files = {
        "skaffold.yaml": SKAFFOLD.format(base=base_image),
        **maven_project("services/api", greeting="from-skaffold", artifact="api"),
    }
    repo = git_server.create_repo(f"jib-skaffold-{random.randrange(10**6)}", files)
    config = worker_config(redis_url, backend="jib", jib=jib_settings(registry))
    async with worker_in_task(config):
        done = await asyncio.to_thread(
            cli, redis_url, "rebuild", f"{repo.url}#main:skaffold.yaml",
            "--default-repo", f"{registry}/sk", "--tag", "t1", "--wait", "--json", cwd=tmp_path,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [build] = json.loads(done.stdout)["builds"]
    assert (build["name"], build["status"]) == (f"{registry}/sk/api:t1", "succeeded"), build
    layers = _layer_files(registry, "sk/api", "t1")
    assert b"from-skaffold" in layers["app/classes/example/Hello.class"]

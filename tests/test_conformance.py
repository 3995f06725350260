"""One conformance suite for every backend: a new backend is added by passing it.

Each case runs once per builder of tests/builders.py (BuildKit, Docker with BuildKit, Docker
with its classic builder, Buildah, and Kaniko on kwok for what kwok can show), against the
real builders, registry, git daemon and Redis of the session. Jib builds from a recipe, not
a Dockerfile: its cases are the ones that apply (a build and its digest, a failing build, a
cancel, and refusing the other kind of request, which every Dockerfile builder refuses too).
What a builder cannot do is read from the capability table (worker/backends/capabilities.py),
which is also the README's backend table: every claim there is either made to happen here or
refused here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
from builders import (
    BUILDERS,
    KWOK_DIGEST,
    Builder,
    forget_containers,
    kill_builder_of,
    make_builder,
    make_jib_builder,
)
from javaproject import MAIN_CLASS, maven_project, silent_registry

from producer.client import BuildfleetClient
from producer.contract import (
    BuildRequest,
    CachePolicy,
    GitSource,
    JibRecipe,
    LocalSource,
    Log,
    Retrying,
    Step,
)
from worker.backends.base import BuildJob, Built
from worker.backends.capabilities import BY_BACKEND, Capabilities, markdown_table
from worker.backends.docker import capabilities as docker_capabilities
from worker.backends.kaniko.manifest import executor_args
from worker.backends.kubenames import label_value
from worker.errors import PermanentBuildError
from worker.routing import rank
from worker.settings import DockerSettings, KanikoSettings, SecretSource

from fleet import worker_in_task
from registry import image_config, manifest, served_digest

pytestmark = pytest.mark.timeout(600)
REPO = Path(__file__).resolve().parent.parent
BOUND = 180.0


@pytest.fixture(params=BUILDERS)
def builder(request: pytest.FixtureRequest, tmp_path: Path) -> Builder:
    return make_builder(request.param, request, tmp_path)


class Sink:
    def __init__(self) -> None:
        self.events: list[Step | Log] = []

    async def __call__(self, event: Step | Log) -> None:
        self.events.append(event)

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Log))

    @property
    def steps(self) -> list[Step]:
        return [e for e in self.events if isinstance(e, Step)]


def dockerfile(base: str, *lines: str) -> str:
    return "\n".join([f"FROM {base}", *lines, ""])


async def build(builder: Builder, request: BuildRequest, outcome: str = "success") -> Built:
    backend = builder.backend(outcome)
    try:
        return await asyncio.wait_for(backend.build(BuildJob(request, 1), Sink()), BOUND)
    finally:
        await backend.aclose()


def marker() -> str:
    """Unique digits: a `sleep` argument and a path part that no other process has."""
    return str(random.randrange(100_000, 999_999))


# --- build and push ----------------------------------------------------------------------


async def test_build_and_push_gives_the_digest_the_registry_serves(builder: Builder) -> None:
    source = builder.source({"Dockerfile": dockerfile(builder.base_image, "RUN echo built")})
    images = (builder.image("app", "1"), builder.image("app", "latest"))
    request = BuildRequest(source=source, images=images)
    backend, sink = builder.backend(), Sink()
    try:
        built = await asyncio.wait_for(backend.build(BuildJob(request, 1), sink), BOUND)
    finally:
        await backend.aclose()
    assert all(e.build_id == request.id and e.attempt == 1 for e in sink.events)
    assert any(step.completed for step in sink.steps)
    if builder.simulated:
        assert built.digest == KWOK_DIGEST
        return
    repository = f"conformance/{builder.name}/app"
    assert built.digest is not None
    assert served_digest(builder.registry, repository, "1") == built.digest
    assert served_digest(builder.registry, repository, "latest") == built.digest


async def test_build_args_target_and_labels_reach_the_image(builder: Builder) -> None:
    text = "\n".join(
        [
            f"FROM {builder.base_image} AS common",
            "ARG GREETING=unset",
            'RUN echo "greeting=$GREETING"',
            "FROM common AS final",
            "LABEL stage=final",
            "FROM common AS other",
            "RUN echo other-stage-ran",
            "LABEL stage=other",
            "",
        ]
    )
    source = builder.source({"Dockerfile": text})
    request = BuildRequest(
        source=source,
        images=(builder.image("args"),),
        build_args={"GREETING": "hello-conformance"},
        target="final",
        labels={"org.example.team": "builders"},
    )
    if builder.simulated:  # kwok builds nothing: Kaniko's arguments are what it would do
        args, _ = executor_args(request, KanikoSettings())
        assert "--build-arg=GREETING=hello-conformance" in args
        assert "--target=final" in args
        assert any(a.startswith("--label") for a in args) == builder.capabilities.labels
        return
    backend, sink = builder.backend(), Sink()
    try:
        await asyncio.wait_for(backend.build(BuildJob(request, 1), sink), BOUND)
    finally:
        await backend.aclose()
    assert "greeting=hello-conformance" in sink.text
    assert "other-stage-ran" not in sink.text
    labels = image_config(builder.registry, f"conformance/{builder.name}/args", "1")["config"][
        "Labels"
    ]
    assert labels["stage"] == "final"
    assert (labels.get("org.example.team") == "builders") == builder.capabilities.labels


async def test_a_failing_run_fails_permanently_naming_the_step(builder: Builder) -> None:
    source = builder.source(
        {
            "Dockerfile": dockerfile(
                builder.base_image, "RUN echo about to fail; echo last words >&2; exit 3"
            )
        }
    )
    request = BuildRequest(source=source, images=(builder.image("fails"),))
    backend, sink = builder.backend("fail"), Sink()
    try:
        with pytest.raises(PermanentBuildError) as info:
            await asyncio.wait_for(backend.build(BuildJob(request, 1), sink), BOUND)
    finally:
        await backend.aclose()
    error = info.value
    assert error.error_class == "run_failed", error.message
    assert any(step.error for step in sink.steps)
    if builder.simulated:
        return
    assert error.step is not None and "exit 3" in error.step
    assert "last words" in error.log_tail
    assert served_digest(builder.registry, f"conformance/{builder.name}/fails", "1") is None


@pytest.mark.parametrize(
    ("dockerfile_text", "error_class"),
    [
        ("FROM {registry}/base/no-such-image\nRUN true\n", "base_image_not_found"),
        ("FROM {base}\nRUNN true\n", "dockerfile"),
    ],
    ids=["missing-base-image", "syntax-error"],
)
async def test_a_broken_dockerfile_fails_permanently_and_says_why(
    builder: Builder, dockerfile_text: str, error_class: str
) -> None:
    if builder.simulated:  # kwok runs no executor: nothing reads the Dockerfile
        return
    text = dockerfile_text.format(registry=builder.registry, base=builder.base_image)
    request = BuildRequest(source=builder.source({"Dockerfile": text}), push=False)
    with pytest.raises(PermanentBuildError) as info:
        await build(builder, request)
    assert info.value.error_class == error_class, info.value.message


# --- cancel ------------------------------------------------------------------------------


async def _wait_for(what: str, predicate: Callable[[], object], bound: float = 30.0) -> None:
    give_up = time.monotonic() + bound
    while not predicate():
        if time.monotonic() > give_up:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.1)


async def test_cancel_during_a_run_leaves_no_process_or_container(builder: Builder) -> None:
    tag = marker()
    source = builder.source(
        {"Dockerfile": dockerfile(builder.base_image, f"RUN echo sleeping; sleep {tag}")}, tag
    )
    request = BuildRequest(source=source, push=False)
    backend, sink = builder.backend("hang"), Sink()
    task = asyncio.create_task(backend.build(BuildJob(request, 1), sink))
    try:
        if builder.simulated:
            assert builder.cluster is not None and builder.kaniko is not None
            namespace, cluster = builder.kaniko.namespace, builder.cluster
            selector = f"buildfleet.io/build-id={label_value(request.id)}"

            def pods() -> list[object]:
                return list(
                    cluster.kubectl_json("get", "pods", "-n", namespace, "-l", selector)["items"]
                )

            await _wait_for("the build pod", pods, BOUND)
        else:
            await _wait_for("the RUN step sleeping", lambda: "sleeping" in sink.text, BOUND)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        task.cancel()
        await backend.aclose()
    if builder.simulated:
        assert cluster.kubectl_json("get", "jobs", "-n", namespace)["items"] == []
        assert pods() == []
        return
    await _wait_for("nothing left behind", lambda: not builder.leftovers(tag), 20.0)


# --- a lost builder ----------------------------------------------------------------------


def _context_ranking_first(builder: Builder, wanted: str, daemons: list[str]) -> LocalSource:
    for n in range(200):
        source = builder.local({}, f"rank-{n}-{marker()}")
        probe = BuildRequest(source=source, push=False)
        if rank(probe.cache_key, daemons)[0] == wanted:
            return source
    raise AssertionError("no context ranks the wanted daemon first")


async def test_a_builder_killed_mid_build_is_temporary_and_retried_elsewhere(
    builder: Builder, fleet: BuildfleetClient, redis_url: str
) -> None:
    if builder.simulated:  # kwok evicts the pod: temporary, every attempt
        config = builder.config(redis_url, outcome="evicted")
        request = BuildRequest(source=builder.source({}), images=(builder.image("lost"),))
        async with worker_in_task(config):
            result = await asyncio.wait_for(fleet.wait(await fleet.submit(request)), BOUND)
        events = [event async for event in fleet.watch(request.id)]
        assert result.status == "dead_lettered" and result.attempts == 3
        assert {e.error_class for e in events if isinstance(e, Retrying)} == {"evicted"}
        return
    tag = marker()
    doomed = builder.start_daemon(tag) if builder.start_daemon else None
    try:
        if doomed is not None:
            daemons = [doomed.address, *builder.daemons]
            source = _context_ranking_first(builder, doomed.address, daemons)
        else:
            daemons, source = [], builder.local({}, tag)
        Path(source.path, "Dockerfile").write_text(
            dockerfile(builder.base_image, "RUN echo started; sleep 4; echo done")
        )
        config = builder.config(redis_url, daemons=daemons or None)
        request = BuildRequest(source=source, images=(builder.image("lost"),))
        async with worker_in_task(config):
            await fleet.submit(request)
            async for event in fleet.watch(request.id):
                if isinstance(event, Log) and "started" in event.text:
                    kill_builder_of(builder, doomed, tag)
                    break
            result = await asyncio.wait_for(fleet.wait(request.id), BOUND)
    finally:
        if doomed is not None:
            doomed.stop(grace=0)
        forget_containers(builder)
    events = [event async for event in fleet.watch(request.id)]
    retries = [(e.error_class, e.reason) for e in events if isinstance(e, Retrying)]
    assert result.status == "succeeded", (result, retries)
    assert result.attempts == 2, retries
    [(error_class, _)] = retries
    assert error_class in {"daemon_unreachable", "connection_lost", "builder_killed"}
    if doomed is not None:
        assert result.daemon == builder.daemons[0]
    assert served_digest(builder.registry, f"conformance/{builder.name}/lost", "1") == (
        result.digest
    )


# --- the log cap -------------------------------------------------------------------------


async def test_the_log_cap_keeps_the_build_and_marks_the_cut(
    builder: Builder, fleet: BuildfleetClient, redis_url: str
) -> None:
    cap = 64 if builder.simulated else 2048
    loud = "RUN for i in $(seq 1 3000); do echo line-$i-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; done"
    source = builder.source({"Dockerfile": dockerfile(builder.base_image, loud)})
    request = BuildRequest(source=source, images=(builder.image("loud"),))
    async with worker_in_task(builder.config(redis_url, log_cap_bytes=cap)):
        result = await asyncio.wait_for(fleet.wait(await fleet.submit(request)), BOUND)
    assert result.status == "succeeded", result
    logs = [e.text for e in [e async for e in fleet.watch(request.id)] if isinstance(e, Log)]
    markers = [text for text in logs if text.startswith("[buildfleet: log truncated")]
    assert len(markers) == 1
    assert sum(len(text.encode()) for text in logs if text not in markers) <= cap


# --- git ---------------------------------------------------------------------------------


async def test_a_git_source_builds_its_ref_and_sub_directory(builder: Builder) -> None:
    if builder.simulated:  # kwok clones nothing: the context Kaniko is given
        request = BuildRequest(
            source=GitSource(url="https://git.example.test/app.git", ref="release"),
            context="app",
            images=(builder.image("git"),),
        )
        args, _ = executor_args(request, KanikoSettings())
        assert "--context=git://git.example.test/app.git#refs/heads/release" in args
        assert "--context-sub-path=app" in args
        return
    files = {
        "app/Dockerfile": dockerfile(builder.base_image, "COPY message.txt /m", "RUN cat /m"),
        "app/message.txt": "from-main\n",
        "Dockerfile": dockerfile(builder.base_image, "RUN echo wrong-dockerfile"),
    }
    repo = builder.git.create_repo(f"conf-git-{builder.name}-{marker()}", files)
    repo.commit({"app/message.txt": "from-release\n"}, branch="release")
    repo.commit({"app/message.txt": "from-main-again\n"}, branch="main")
    request = BuildRequest(
        source=GitSource(url=repo.url, ref="release"),
        context="app",
        images=(builder.image("git"),),
    )
    backend, sink = builder.backend(), Sink()
    try:
        if not _builds_git_subdirs(builder):
            with pytest.raises(PermanentBuildError, match="sub-directory 'app'") as info:
                await asyncio.wait_for(backend.build(BuildJob(request, 1), sink), BOUND)
            assert info.value.error_class == "unsupported"
            return
        built = await asyncio.wait_for(backend.build(BuildJob(request, 1), sink), BOUND)
    finally:
        await backend.aclose()
    assert "from-release" in sink.text
    assert "from-main" not in sink.text and "wrong-dockerfile" not in sink.text
    assert served_digest(builder.registry, f"conformance/{builder.name}/git", "1") == built.digest


def _builds_git_subdirs(builder: Builder) -> bool:
    """Debian's dockerd 20.10 (API 1.41): its BuildKit cannot take a git sub-directory."""
    return builder.name != "docker"


# --- what a builder cannot do: refused, naming it -----------------------------------------


@dataclass(frozen=True)
class Unsupported:
    """A request some builder cannot honour; `names` is what its refusal must say."""

    name: str
    lacks: Callable[[Capabilities], bool]
    change: Callable[[BuildRequest, Builder], BuildRequest]
    names: str


def _with(**fields: object) -> Callable[[BuildRequest, Builder], BuildRequest]:
    return lambda request, _builder: msgspec.structs.replace(request, **fields)


UNSUPPORTED = (
    Unsupported(
        "local-source",
        lambda caps: not caps.local_source,
        lambda request, builder: msgspec.structs.replace(request, source=builder.local({})),
        "local directory",
    ),
    Unsupported(
        "multi-platform",
        lambda caps: not caps.multi_platform,
        _with(platforms=("linux/amd64", "linux/arm64")),
        "platform",
    ),
    Unsupported(
        "foreign-platform",
        lambda caps: not caps.platforms,
        _with(platforms=("linux/arm64",)),
        "platform",
    ),
    Unsupported(
        "cache-mode-max",
        lambda caps: "max" not in caps.cache_export_modes,
        _with(cache=CachePolicy(export_ref="127.0.0.1:9/cache/x", mode="max")),
        "mode=max",
    ),
    Unsupported(
        "cache-mode-min",
        lambda caps: "min" not in caps.cache_export_modes,
        _with(cache=CachePolicy(export_ref="127.0.0.1:9/cache/x", mode="min")),
        "mode=min",
    ),
    Unsupported(
        "two-cache-imports",
        lambda caps: not caps.cache_import or (caps.max_cache_imports or 2) < 2,
        _with(cache=CachePolicy(import_refs=("127.0.0.1:9/cache/a", "127.0.0.1:9/cache/b"))),
        "cache.import_refs",
    ),
    Unsupported("secret", lambda caps: not caps.secrets, _with(secrets=("npmrc",)), "npmrc"),
)

CAPABILITIES = {
    "buildkit": BY_BACKEND["buildkit"],
    "docker": docker_capabilities(DockerSettings()),
    "docker-classic": docker_capabilities(DockerSettings(builder="classic")),
    "buildah": BY_BACKEND["buildah"],
    "kaniko": BY_BACKEND["kaniko"],
}
REFUSALS = [
    pytest.param(name, case, id=f"{name}-{case.name}")
    for name in BUILDERS
    for case in UNSUPPORTED
    if case.lacks(CAPABILITIES[name])
]


@pytest.mark.parametrize(("builder_name", "case"), REFUSALS)
async def test_a_request_the_builder_cannot_honour_is_refused_naming_it(
    builder_name: str, case: Unsupported, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    builder = make_builder(builder_name, request, tmp_path)
    assert builder.capabilities == CAPABILITIES[builder_name]
    base = BuildRequest(
        source=builder.source({"Dockerfile": dockerfile(builder.base_image, "RUN true")}),
        images=(builder.image("refused"),),
    )
    began = time.monotonic()
    with pytest.raises(PermanentBuildError) as info:
        await build(builder, case.change(base, builder))
    assert case.names in info.value.message
    assert time.monotonic() - began < 30  # refused up front, not after a build


# --- what a builder claims: honoured -------------------------------------------------------


def _tags(registry: str, repository: str) -> list[str]:
    with urllib.request.urlopen(f"http://{registry}/v2/{repository}/tags/list", timeout=10) as r:
        return list(json.load(r).get("tags") or [])


async def test_the_platforms_it_claims_are_built(builder: Builder) -> None:
    caps = builder.capabilities
    platforms = ("linux/amd64", "linux/arm64") if caps.multi_platform else ("linux/arm64",)
    source = builder.source({"Dockerfile": "FROM scratch\nCOPY x /x\n", "x": "x"})
    request = BuildRequest(source=source, images=(builder.image("platforms"),), platforms=platforms)
    if builder.simulated:
        args, _ = executor_args(request, KanikoSettings())
        assert "--custom-platform=linux/arm64" in args
        return
    await build(builder, request)
    repository = f"conformance/{builder.name}/platforms"
    if caps.multi_platform:
        listed = manifest(builder.registry, repository, "1")["manifests"]
        assert sorted(m["platform"]["architecture"] for m in listed) == ["amd64", "arm64"]
    else:
        assert image_config(builder.registry, repository, "1")["architecture"] == "arm64"


async def test_the_cache_it_claims_is_exported_and_imported(builder: Builder) -> None:
    caps = builder.capabilities
    if builder.simulated or not caps.cache_export_modes:
        # Kaniko's cache repository is written by the executor, which kwok does not run;
        # the classic builder exports none (refused above).
        return
    mode = "max" if "max" in caps.cache_export_modes else "min"
    text = dockerfile(builder.base_image, f"RUN echo cached-{marker()} > /c")
    cache_ref = builder.image("cache", "build")
    first = BuildRequest(
        source=builder.source({"Dockerfile": text}),
        images=(builder.image("cached"),),
        cache=CachePolicy(export_ref=cache_ref, mode=mode),
    )
    await build(builder, first)
    assert _tags(builder.registry, f"conformance/{builder.name}/cache")
    second = msgspec.structs.replace(
        first, id=f"{first.id}-2", cache=CachePolicy(import_refs=(cache_ref,))
    )
    assert (await build(builder, second)).digest is not None


async def test_the_secrets_it_claims_are_mounted_in_their_run_step_only(
    builder: Builder, tmp_path: Path
) -> None:
    if not builder.capabilities.secrets:
        return  # refused, naming the secret (above)
    value = f"conformance-{marker()}-secret"
    (tmp_path / "npmrc").write_text(value)
    digest = hashlib.sha256(value.encode()).hexdigest()
    text = dockerfile(
        builder.base_image,
        "RUN --mount=type=secret,id=npmrc "
        f'test "$(sha256sum /run/secrets/npmrc | cut -c1-64)" = "{digest}" && echo ok > /ok',
        "RUN test ! -s /run/secrets/npmrc && cat /ok",
    )
    request = BuildRequest(
        source=builder.source({"Dockerfile": text}),
        images=(builder.image("secret"),),
        secrets=("npmrc",),
    )
    backend, sink = (
        builder.backend(secrets=(SecretSource(id="npmrc", file=str(tmp_path / "npmrc")),)),
        Sink(),
    )
    try:
        built = await asyncio.wait_for(backend.build(BuildJob(request, 1), sink), BOUND)
    finally:
        await backend.aclose()
    assert built.digest is not None
    assert value not in sink.text
    assert all(value not in (step.error or "") + step.name for step in sink.steps)


# --- the table -----------------------------------------------------------------------------


def test_the_readme_table_is_the_capability_table() -> None:
    assert markdown_table() in (REPO / "README.md").read_text()


def test_every_backend_answers_with_the_capabilities_the_table_declares() -> None:
    # (Tekton's builds are the Kaniko executor's: tests/test_tekton.py drives them.)
    assert set(BY_BACKEND) == {"buildkit", "kaniko", "docker", "buildah", "tekton", "jib"}
    assert docker_capabilities(DockerSettings()) == BY_BACKEND["docker"]


# --- jib: a recipe instead of a Dockerfile --------------------------------------------------


@pytest.fixture
def jib(request: pytest.FixtureRequest, tmp_path: Path) -> Builder:
    return make_jib_builder(request, tmp_path)


def jib_request(builder: Builder, repository: str, **files: str) -> BuildRequest:
    source = builder.local(files or maven_project())
    recipe = JibRecipe(base_image=builder.base_image, main_class=MAIN_CLASS)
    return BuildRequest(source=source, images=(builder.image(repository),), recipe=recipe)


async def test_jib_build_and_push_gives_the_digest_the_registry_serves(jib: Builder) -> None:
    request = jib_request(jib, "app")
    backend, sink = jib.backend(), Sink()
    try:
        built = await asyncio.wait_for(backend.build(BuildJob(request, 1), sink), BOUND)
    finally:
        await backend.aclose()
    assert all(e.build_id == request.id and e.attempt == 1 for e in sink.events)
    assert any(step.completed for step in sink.steps)
    assert built.digest is not None
    assert served_digest(jib.registry, "conformance/jib/app", "1") == built.digest


async def test_a_failing_jib_build_fails_through_the_fleet_with_the_error(
    jib: Builder, fleet: BuildfleetClient, redis_url: str
) -> None:
    request = jib_request(jib, "fails", **maven_project(broken=True))
    async with worker_in_task(jib.config(redis_url)):
        result = await asyncio.wait_for(fleet.wait(await fleet.submit(request)), BOUND)
    assert (result.status, result.error_class, result.attempts) == ("failed", "compile_failed", 1)
    assert result.error is not None and "Broken.java:[4,13] illegal start" in result.error
    assert result.failed_step == "maven-compiler-plugin:compile @ hello"
    assert served_digest(jib.registry, "conformance/jib/fails", "1") is None


async def test_cancel_of_a_jib_build_leaves_no_process(
    jib: Builder, fleet: BuildfleetClient, redis_url: str
) -> None:
    tag = marker()
    async with silent_registry() as silent:  # Jib waits on it until cancelled
        request = msgspec.structs.replace(
            jib_request(jib, "cancelled"), images=(f"{silent}/conformance/jib/c{tag}:1",)
        )
        async with worker_in_task(jib.config(redis_url)):
            await fleet.submit(request)
            async for event in fleet.watch(request.id):
                if isinstance(event, Step) and event.name.startswith("jib-maven-plugin:build"):
                    break
            await fleet.cancel(request.id)
            result = await asyncio.wait_for(fleet.wait(request.id), BOUND)
    assert result.status == "cancelled", result
    await _wait_for("nothing left behind", lambda: not jib.leftovers(tag), 20.0)


async def test_jib_refuses_a_dockerfile_request_naming_it(jib: Builder) -> None:
    source = jib.local({"Dockerfile": dockerfile(jib.base_image, "RUN true")})
    request = BuildRequest(source=source, images=(jib.image("refused"),))
    with pytest.raises(PermanentBuildError) as info:
        await build(jib, request)
    assert info.value.error_class == "unsupported"
    assert info.value.message == (
        "Jib builds from a jib recipe, not from a Dockerfile; "
        "send it to a fleet whose workers run backend buildah or buildkit or docker or "
        "kaniko or tekton"
    )


async def test_a_dockerfile_builder_refuses_a_jib_request_naming_it(
    builder: Builder, fleet: BuildfleetClient, redis_url: str
) -> None:
    source = builder.source(maven_project())
    request = BuildRequest(
        source=source, images=(builder.image("jib"),), recipe=JibRecipe(module=".")
    )
    began = time.monotonic()
    async with worker_in_task(builder.config(redis_url)):
        result = await asyncio.wait_for(fleet.wait(await fleet.submit(request)), BOUND)
    assert (result.status, result.error_class) == ("failed", "unsupported"), result
    assert result.error == (
        f"{builder.capabilities.builder} builds from a Dockerfile, not from a jib recipe; "
        "send it to a fleet whose workers run backend jib"
    )
    assert time.monotonic() - began < 30  # refused up front, not after a build
    if builder.backend_name != "buildkit":  # and by the backend itself, called directly
        with pytest.raises(PermanentBuildError, match="not from a jib recipe"):
            await build(builder, request)

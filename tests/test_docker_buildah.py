"""The docker and buildah backends' own pieces: pure ones without a daemon, then the parts
the conformance suite does not reach, against the session's real dockerd and buildah."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import subprocess
import tarfile
from pathlib import Path

import msgspec
import pytest
from aiohttp import web

from buildfleet import services
from producer.contract import BuildRequest, CachePolicy, GitSource, LocalSource, Log, Step
from worker.backends.base import BuildJob
from worker.backends.buildah import build_argv, push_argv
from worker.backends.buildkit_trace import TraceError, decode_aux, decode_status
from worker.backends.capabilities import BY_BACKEND, refusal
from worker.backends.docker import (
    DockerBackend,
    build_params,
    load_credentials,
    registry_host,
    split_reference,
)
from worker.backends.docker_api import (
    DockerDaemon,
    negotiate,
    registry_auth_header,
    registry_config_header,
)
from worker.backends.docker_context import DockerIgnore, context_tarball
from worker.backends.docker_progress import BuildStream, PushStream, StreamMessage
from worker.backends.steplines import BUILDAH_STEP, NumberedSteps
from worker.errors import PermanentBuildError, TemporaryBuildError
from worker.scheduling import DaemonHealth
from worker.settings import BuildahSettings, DaemonSettings, DockerSettings

from fleet import QUICK_RECOVERY
from registry import served_digest

# Captured from dockerd 20.10.24 building `RUN echo hello 1 && echo err >&2` / `RUN exit 3`.
TRACE_LOG = (
    "GmMKR3NoYTI1Njo2MmM1NmI1YzIwMzgyNDhiN2Y3ZjIyMzU2ZWExM2NlZjc2YTJiZDdmNGY4ZTBmNzdlMTMyMT"
    "EzZDdmYzI5ZGM1EgwIm9jL2AYQl9/MwQMYASIIaGVsbG8gMQo="
)
TRACE_FAILED = (
    "CvkBCkdzaGEyNTY6MmQyY2Q4ZjNjODM3YjlkZGVhMjE4NzY1MDNkNjBiMmJjOGFmYTYzNWU4M2Q1OGNiZDNhNW"
    "EzZjc4NDU2YmVkNxJHc2hhMjU2OjYyYzU2YjVjMjAzODI0OGI3ZjdmMjIzNTZlYTEzY2VmNzZhMmJkN2Y0ZjhlMG"
    "Y3N2UxMzIxMTNkN2ZjMjlkYzUaEFszLzNdIFJVTiBleGl0IDMqCwic2MvYBhD6qo8LMgsInNjL2AYQz8uiJjo5ZX"
    "hlY3V0b3IgZmFpbGVkIHJ1bm5pbmcgWy9iaW4vc2ggLWMgZXhpdCAzXTogZXhpdCBjb2RlOiAz"
)
_messages = msgspec.json.Decoder(StreamMessage)


def message(**fields: object) -> StreamMessage:
    return _messages.decode(json.dumps(fields))


# --- BuildKit's protobuf status, as a Docker daemon sends it ------------------------------


def test_a_captured_trace_decodes_into_vertexes_and_logs() -> None:
    log = decode_aux(TRACE_LOG).logs[0]
    assert (log.data, log.stream) == (b"hello 1\n", 1)
    assert log.vertex.startswith("sha256:62c56b5c")
    vertex = decode_aux(TRACE_FAILED).vertexes[0]
    assert vertex.name == "[3/3] RUN exit 3"
    assert vertex.error == "executor failed running [/bin/sh -c exit 3]: exit code: 3"
    assert vertex.started is not None and vertex.completed is not None
    assert vertex.completed >= vertex.started


def test_unknown_fields_are_skipped_and_garbage_is_refused() -> None:
    # field 9 varint, field 10 fixed64, field 11 fixed32, then vertex 1 {digest "d", name "n"}
    extra = bytes([0x48, 0x05, 0x51, *b"12345678", 0x5D, *b"1234"])
    vertex = bytes([0x0A, 0x01, *b"d", 0x1A, 0x01, *b"n"])
    status = decode_status(extra + bytes([0x0A, len(vertex)]) + vertex)
    assert [(v.digest, v.name) for v in status.vertexes] == [("d", "n")]
    for bad in (b"\x0a\x05ab", b"\xff\xff\xff", b"\x0b"):
        with pytest.raises(TraceError):
            decode_status(bad)
    with pytest.raises(TraceError):
        decode_aux("not base64!")


def test_the_build_stream_becomes_steps_logs_and_a_classified_failure() -> None:
    stream = BuildStream("b1", 2)
    events = [
        *stream.feed(message(id="moby.buildkit.trace", aux=TRACE_LOG)),
        *stream.feed(message(id="moby.buildkit.trace", aux=TRACE_FAILED)),
        *stream.feed(message(error="x", errorDetail={"message": "executor failed running "
                                                     "[/bin/sh -c exit 3]: exit code: 3"})),
    ]  # fmt: skip
    assert [e.text for e in events if isinstance(e, Log)] == ["hello 1\n"]
    assert [s.name for s in events if isinstance(s, Step)] == ["[3/3] RUN exit 3"]
    failure = stream.failure()
    assert isinstance(failure, PermanentBuildError)
    assert (failure.error_class, failure.step) == ("run_failed", "[3/3] RUN exit 3")


def test_the_classic_builders_stream_is_read_across_fragments() -> None:
    stream = BuildStream("b1", 1)
    events = []
    for fragment in ("Step 1/2 : FROM base", "\n", " ---> 371d3726f8e5\nStep 2/2 : RUN x",
                     "\n", "\x1b[91mlast words\n\x1b[0m", "partial"):  # fmt: skip
        events += stream.feed(message(stream=fragment))
    events += stream.feed(
        message(error="e", errorDetail={"code": 3, "message": "The command '/bin/sh -c x' "
                                        "returned a non-zero code: 3"})
    )  # fmt: skip
    steps = [e for e in events if isinstance(e, Step)]
    assert [s.name for s in steps if s.completed is None] == ["[1/2] FROM base", "[2/2] RUN x"]
    assert steps[-1].error is not None and steps[-1].completed is not None
    failure = stream.failure()
    assert (failure.error_class, failure.step) == ("run_failed", "[2/2] RUN x")
    assert failure.log_tail == ("last words", "partial")  # no ANSI colour, no builder chatter


def test_a_stream_that_ends_without_an_image_blames_the_daemon() -> None:
    failure = BuildStream("b1", 1).failure()
    assert isinstance(failure, TemporaryBuildError) and failure.daemon_at_fault


def test_the_push_stream_gives_the_digest_or_a_classified_error() -> None:
    push = PushStream("b1", 1, "r/a:1")
    assert push.feed(message(status="Pushing", id="abc")) == []
    assert push.feed(message(status="Pushed", id="abc"))[0].text == "push r/a:1: abc: Pushed\n"
    push.feed(message(aux={"Tag": "1", "Digest": "sha256:" + "e" * 64, "Size": 527}))
    assert push.digest == "sha256:" + "e" * 64
    denied = PushStream("b1", 1, "r/a:1")
    denied.feed(message(error="denied", errorDetail={"message": "denied: requested access to "
                                                     "the resource is denied"}))  # fmt: skip
    assert isinstance(denied.failure(), PermanentBuildError)
    assert denied.failure().error_class == "auth_denied"


# --- the Engine API's requests ----------------------------------------------------------


def test_api_version_is_negotiated_never_fixed() -> None:
    assert negotiate("1.41", "1.12") == "1.41"  # Debian's dockerd 20.10
    assert negotiate("1.52", "1.44") == "1.47"  # Docker 29: ours, above its minimum
    for daemon, minimum in (("1.39", "1.12"), ("1.60", "1.50")):
        with pytest.raises(PermanentBuildError, match="API"):
            negotiate(daemon, minimum)


def test_build_params_carry_the_request() -> None:
    request = BuildRequest(
        source=GitSource(url="git://h/r.git", ref="main", commit="a" * 40),
        context="svc",
        dockerfile="build/Dockerfile",
        images=("r/a:1",),
        build_args={"V": "$(reboot)"},
        labels={"team": "x"},
        target="final",
        platforms=("linux/arm64",),
        cache=CachePolicy(import_refs=("r/cache:1",), export_ref="r/cache:1", mode="min"),
    )
    params = dict(build_params(request, DockerSettings(network_mode="host"), ("r/a:1",)))
    assert params["remote"] == "git://h/r.git#" + "a" * 40 + ":svc"
    assert params["dockerfile"] == "build/Dockerfile"
    assert json.loads(params["buildargs"]) == {"V": "$(reboot)", "BUILDKIT_INLINE_CACHE": "1"}
    assert json.loads(params["labels"]) == {"team": "x"}
    assert json.loads(params["cachefrom"]) == ["r/cache:1"]
    assert (params["target"], params["platform"], params["version"]) == (
        "final",
        "linux/arm64",
        "2",
    )
    assert (params["networkmode"], params["forcerm"]) == ("host", "1")
    classic = dict(build_params(request, DockerSettings(builder="classic"), ()))
    assert classic["version"] == "1"


def test_references_registries_and_credentials(tmp_path: Path) -> None:
    assert split_reference("127.0.0.1:5000/a/b:1") == ("127.0.0.1:5000/a/b", "1")
    assert split_reference("127.0.0.1:5000/a/b") == ("127.0.0.1:5000/a/b", "latest")
    with pytest.raises(PermanentBuildError, match="digest"):
        split_reference("r/a@sha256:" + "0" * 64)
    assert registry_host("127.0.0.1:5000/a/b") == "127.0.0.1:5000"
    assert registry_host("library/busybox") == "https://index.docker.io/v1/"
    config = tmp_path / "config.json"
    auth = base64.b64encode(b"robot:s3cret:with:colons").decode()
    config.write_text(json.dumps({"auths": {"reg.example": {"auth": auth}}}))
    credentials = load_credentials(str(config))["reg.example"]
    assert (credentials["username"], credentials["password"]) == ("robot", "s3cret:with:colons")
    header = json.loads(base64.urlsafe_b64decode(registry_auth_header(credentials)))
    assert header["serveraddress"] == "reg.example"
    assert json.loads(base64.urlsafe_b64decode(registry_auth_header(None))) == {}
    pulls = json.loads(base64.urlsafe_b64decode(registry_config_header({"r": {"username": "u"}})))
    assert pulls == {"r": {"username": "u"}}
    config.write_text("{not json")
    with pytest.raises(PermanentBuildError, match="auth_file"):
        load_credentials(str(config))


# --- .dockerignore and the context tar ---------------------------------------------------


def test_dockerignore_follows_dockers_rules() -> None:
    ignore = DockerIgnore(
        ["# comment", "*.log", "!keep.log", "build/", "**/secret.txt", "/root-only", "a?c", ""]
    )
    assert ignore.excluded("x.log") and not ignore.excluded("keep.log")
    assert not ignore.excluded("sub/x.log")  # `*` stays within one segment
    assert ignore.excluded("build") and ignore.excluded("build/out/bin")
    assert ignore.excluded("secret.txt") and ignore.excluded("deep/er/secret.txt")
    assert ignore.excluded("root-only") and ignore.excluded("abc")
    assert not ignore.excluded("src/main.c")


async def test_the_context_tar_is_gzipped_and_applies_dockerignore(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "main.c").write_text("int main;")
    (tmp_path / "node_modules" / "big").mkdir(parents=True)
    (tmp_path / "node_modules" / "big" / "x.js").write_text("x")
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    (tmp_path / ".dockerignore").write_text("node_modules\nDockerfile\n.dockerignore\n")
    data = b"".join([chunk async for chunk in context_tarball(tmp_path, "Dockerfile")])
    assert data[:2] == b"\x1f\x8b"
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert set(members) == {"src", "src/main.c", "Dockerfile", ".dockerignore"}
    assert all(m.uid == 0 and m.gid == 0 for m in members.values())


# --- buildah -----------------------------------------------------------------------------


def test_buildah_commands_are_argument_lists() -> None:
    settings = BuildahSettings(root="/r", runroot="/rr", tls_verify=False, auth_file="/a.json")
    request = BuildRequest(
        source=GitSource(url="git://h/r.git", ref="release"),
        context="app",
        images=("r/a:1",),
        build_args={"V": "$(reboot); rm -rf /"},
        labels={"team": "x"},
        platforms=("linux/arm64",),
        cache=CachePolicy(import_refs=("r/cache:7",), export_ref="r:5000/cache:7"),
    )
    argv = build_argv(settings, request, Path("/tmp/iid"))
    assert argv[:7] == [
        "buildah",
        "--root",
        "/r",
        "--runroot",
        "/rr",
        "--storage-driver",
        "overlay",
    ]
    for flag in ("--layers", "--force-rm", "--tls-verify=false"):
        assert flag in argv
    assert argv[argv.index("--isolation") + 1] == "chroot"
    assert argv[argv.index("--build-arg") + 1] == "V=$(reboot); rm -rf /"
    assert argv[argv.index("--cache-to") + 1] == "r:5000/cache"  # a repository: no tag
    assert argv[argv.index("--cache-from") + 1] == "r/cache"
    assert argv[argv.index("--authfile") + 1] == "/a.json"
    assert argv[-3:] == ["--file", "Dockerfile", "git://h/r.git#release:app"]
    local = build_argv(
        settings, BuildRequest(source=LocalSource(path="/src"), push=False), Path("i")
    )
    assert local[-3:] == ["--file", "/src/Dockerfile", "/src"]
    push = push_argv(settings, "r/a:1", Path("/tmp/d"))
    assert push[-2:] == ["r/a:1", "docker://r/a:1"] and "--digestfile" in push


def test_buildah_step_lines_with_and_without_stages() -> None:
    steps = NumberedSteps("b1", 1, pattern=BUILDAH_STEP)
    first = steps.feed("[1/2] STEP 1/3: FROM base AS build\n", 1.0)
    assert [e.name for e in first if isinstance(e, Step)] == ["stage 1/2 [1/3] FROM base AS build"]
    steps.feed("compiling\n", 1.5)
    ended, started = steps.feed("STEP 2/3: RUN make\n", 2.0)
    assert isinstance(ended, Step) and ended.completed == 2.0
    assert isinstance(started, Step) and started.name == "[2/3] RUN make"
    (failed,) = steps.finish(3.0, "exit status 2")
    assert failed.error == "exit status 2" and steps.failed == failed


def test_refusals_name_what_the_builder_cannot_do() -> None:
    many = BuildRequest(
        source=LocalSource(path="/s"), push=False, platforms=("linux/amd64", "linux/arm64")
    )
    assert "2 (platforms linux/amd64, linux/arm64)" in (refusal(many, BY_BACKEND["docker"]) or "")
    assert refusal(many, BY_BACKEND["buildkit"]) is None
    maximal = msgspec.structs.replace(
        many, platforms=(), cache=CachePolicy(export_ref="r/c", mode="max")
    )
    assert "mode=max" in (refusal(maximal, BY_BACKEND["docker"]) or "")
    assert "local directory" in (refusal(maximal, BY_BACKEND["kaniko"]) or "")


# --- against the real daemon -------------------------------------------------------------


async def test_the_daemon_is_probed_and_negotiated(dockerd: str, tmp_path: Path) -> None:
    down = f"unix://{tmp_path}/nothing.sock"
    backend = DockerBackend(DockerSettings())
    try:
        assert await backend.daemon(dockerd).version() == "1.41"
        health = DaemonHealth([dockerd, down], QUICK_RECOVERY, backend.probe)
        await health.probe_all()
        assert health.healthy() == [dockerd]
        with pytest.raises(TemporaryBuildError) as info:
            await backend.daemon(down).version()
        assert info.value.daemon_at_fault and info.value.error_class == "daemon_unreachable"
    finally:
        await backend.aclose()


async def test_dockerignored_files_never_reach_the_daemon(
    dockerd: str, base_image: str, tmp_path: Path
) -> None:
    (tmp_path / "Dockerfile").write_text(
        f"FROM {base_image}\nCOPY . /ctx\n"
        "RUN test ! -e /ctx/secret.txt && test ! -e /ctx/.git && test -e /ctx/keep.txt "
        "&& echo context-ok\n"
    )
    (tmp_path / "secret.txt").write_text("never sent")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("[core]")
    (tmp_path / "keep.txt").write_text("sent")
    (tmp_path / ".dockerignore").write_text("secret.txt\n.git\n")
    backend = DockerBackend(
        DockerSettings(daemons=(DaemonSettings(address=dockerd),), network_mode="host")
    )
    logs: list[str] = []

    async def sink(event: Step | Log) -> None:
        if isinstance(event, Log):
            logs.append(event.text)

    try:
        request = BuildRequest(source=LocalSource(path=str(tmp_path)), push=False)
        await asyncio.wait_for(backend.build(BuildJob(request, 1), sink), 120)
    finally:
        await backend.aclose()
    assert "context-ok\n" in logs


def make_certificates(directory: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""
    directory.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem",
            "-out", "ca.pem", "-days", "2", "-subj", "/CN=buildfleet test CA")  # fmt: skip
    for who, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        (directory / f"{who}.ext").write_text(
            f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n"
        )
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}-key.pem",
                "-out", f"{who}.csr", "-subj", f"/CN={who}")  # fmt: skip
        openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
                "-CAcreateserial", "-out", f"{who}-cert.pem", "-days", "2",
                "-extfile", f"{who}.ext")  # fmt: skip
    client = directory / "client"
    client.mkdir()
    for source, target in (("ca.pem", "ca.pem"), ("client-cert.pem", "cert.pem"),
                           ("client-key.pem", "key.pem")):  # fmt: skip
        (client / target).write_bytes((directory / source).read_bytes())
    return client


async def test_a_daemon_over_tcp_with_tls_builds_and_refuses_strangers(
    services_dir: Path, registry: str, base_image: str, tmp_path: Path
) -> None:
    client_tls = make_certificates(tmp_path / "tls")
    daemon = services.start_dockerd(services_dir, name="dockerd-tls", tls_dir=tmp_path / "tls")
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "Dockerfile").write_text(f"FROM {base_image}\nRUN echo over-tls\n")
    image = f"{registry}/tls/app:1"
    request = BuildRequest(source=LocalSource(path=str(tmp_path / "ctx")), images=(image,))
    daemons = (DaemonSettings(address=daemon.address),)
    trusted = DockerBackend(
        DockerSettings(daemons=daemons, tls_dir=str(client_tls), network_mode="host")
    )
    stranger = DockerBackend(DockerSettings(daemons=daemons, network_mode="host"))

    async def sink(event: Step | Log) -> None:
        return None

    try:
        assert daemon.address.startswith("tcp://127.0.0.1:")
        assert await trusted.probe(daemon.address)
        built = await asyncio.wait_for(trusted.build(BuildJob(request, 1), sink), 120)
        assert not await stranger.probe(daemon.address)
        with pytest.raises(PermanentBuildError, match=r"wants TLS: set docker\.tls_dir") as info:
            await stranger.build(BuildJob(request, 1), sink)
        assert info.value.error_class == "config"
    finally:
        await trusted.aclose()
        await stranger.aclose()
        daemon.stop()
    assert built.digest == served_digest(registry, "tls/app", "1")


async def test_a_stream_message_far_longer_than_a_read_buffer_is_read_whole() -> None:
    """A fake daemon (an aiohttp server, standing in for dockerd's long BuildKit trace
    lines, which a real daemon sends only for some builds): a 1 MiB `aux` line."""
    trace = {"id": "moby.buildkit.trace", "aux": "A" * (1 << 20)}

    async def build(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(json.dumps(trace).encode() + b"\n")
        await response.write(b'{"stream": "done"}\n')
        return response

    async def version(_: web.Request) -> web.Response:
        return web.json_response({"ApiVersion": "1.47", "MinAPIVersion": "1.24", "Version": "27"})

    app = web.Application()
    app.router.add_get("/version", version)
    app.router.add_post("/v1.47/build", build)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    daemon = DockerDaemon(f"tcp://127.0.0.1:{port}")
    try:
        async with daemon.stream("POST", "/build", params=[]) as messages:
            received = [message async for message in messages]
    finally:
        await daemon.aclose()
        await runner.cleanup()
    assert len(received) == 2
    assert received[1].stream == "done"

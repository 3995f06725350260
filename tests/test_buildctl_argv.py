"""The buildctl command a request becomes: an argument list, never a shell string."""

import itertools
import json
import subprocess
from pathlib import Path

import msgspec

from buildfleet.services import find_tool
from producer.contract import BuildRequest, CachePolicy, GitSource, LocalSource
from worker.backends.buildkit import buildctl_argv
from worker.backends.secrets import buildah_flags
from worker.settings import BuildkitSettings, SecretSource

from registry import image_config, served_digest

METADATA = Path("/tmp/m.json")
SHA = "0123456789abcdef0123456789abcdef01234567"


def test_a_git_request_pins_the_commit_and_the_context_subdirectory() -> None:
    request = BuildRequest(
        source=GitSource(url="git://forge/app.git", ref="main", commit=SHA),
        context="services/api",
        dockerfile="docker/Dockerfile",
        images=("reg/app:1", "reg/app:latest"),
        build_args={"VERSION": "1; rm -rf /"},
        target="runtime",
        platforms=("linux/amd64", "linux/arm64"),
        cache=CachePolicy(import_refs=("reg/cache:app",), export_ref="reg/cache:app"),
    )
    argv = buildctl_argv(["buildctl", "--addr", "tcp://d:1234"], request, METADATA)
    assert argv[:4] == ["buildctl", "--addr", "tcp://d:1234", "build"]
    pairs = list(itertools.pairwise(argv))
    assert ("--opt", f"context=git://forge/app.git#{SHA}:services/api") in pairs
    assert ("--opt", "filename=docker/Dockerfile") in pairs
    assert ("--opt", "build-arg:VERSION=1; rm -rf /") in pairs  # one argument, no shell
    assert ("--opt", "target=runtime") in pairs
    assert ("--opt", "platform=linux/amd64,linux/arm64") in pairs
    assert ("--output", 'type=image,"name=reg/app:1,reg/app:latest",push=true') in pairs
    assert ("--import-cache", "type=registry,ref=reg/cache:app") in pairs
    assert (
        "--export-cache",
        "type=registry,ref=reg/cache:app,mode=max,ignore-error=true",
    ) in pairs
    assert ("--metadata-file", str(METADATA)) in pairs


def test_a_local_request_sends_its_context_and_dockerfile_directories() -> None:
    request = BuildRequest(
        source=LocalSource(path="/src/app"),
        context="web",
        dockerfile="build/Dockerfile.prod",
        push=False,
        cache=CachePolicy(disabled=True),
    )
    argv = buildctl_argv(["buildctl"], request, METADATA)
    pairs = list(itertools.pairwise(argv))
    assert ("--local", "context=/src/app/web") in pairs
    assert ("--local", "dockerfile=/src/app/web/build") in pairs
    assert ("--opt", "filename=Dockerfile.prod") in pairs
    assert "--no-cache" in argv
    assert "--output" not in argv


def test_tls_settings_become_buildctl_connection_flags() -> None:
    plain = BuildkitSettings(buildctl="/bin/buildctl")
    mutual = BuildkitSettings(buildctl="/bin/buildctl", tls_dir="/etc/certs")
    assert plain.connection("tcp://d:1") == ["/bin/buildctl", "--addr", "tcp://d:1"]
    assert mutual.connection("tcp://d:1")[-2:] == ["--tlsdir", "/etc/certs"]


def test_secrets_go_to_buildctl_as_where_their_values_are_never_the_values() -> None:
    request = BuildRequest(source=LocalSource(path="/src"), push=False, secrets=("npm", "tok"))
    sources = (
        SecretSource(id="npm", file="/run/secrets/npmrc"),
        SecretSource(id="tok", env="NPM_TOKEN"),
    )
    pairs = list(itertools.pairwise(buildctl_argv(["buildctl"], request, METADATA, sources)))
    assert ("--secret", "id=npm,src=/run/secrets/npmrc") in pairs
    assert ("--secret", "id=tok,env=NPM_TOKEN") in pairs
    assert buildah_flags(sources) == [
        "--secret", "id=npm,src=/run/secrets/npmrc,type=file",
        "--secret", "id=tok,src=NPM_TOKEN,type=env",
    ]  # fmt: skip


def _run_step_cached(stderr: str) -> dict[str, bool]:
    """From buildctl's rawjson progress: each RUN step by name, cached or not."""
    cached: dict[str, bool] = {}
    for line in stderr.splitlines():
        for vertex in json.loads(line).get("vertexes") or ():
            if " RUN " in vertex.get("name", ""):
                name = vertex["name"]
                cached[name] = cached.get(name, False) or bool(vertex.get("cached"))
    return cached


def test_every_flag_the_backend_uses_behaves_on_the_real_buildctl(
    buildkitd: str, registry: str, base_image: str, tmp_path: Path
) -> None:
    """The argument list of a request using every option, run by the buildctl and buildkitd
    that scripts/setup provides: each flag does what the backend relies on it for."""
    context = tmp_path / "app"
    (context / "build").mkdir(parents=True)
    (context / "build" / "Dockerfile.prod").write_text(
        f"FROM {base_image} AS broken\n"
        "RUN false\n"
        f"FROM {base_image} AS runtime\n"
        "ARG VERSION\n"
        f"RUN echo {tmp_path.name} > /made\n"
        'LABEL version="${VERSION}"\n'
        "COPY main.txt /src/\n"
    )
    (context / "main.txt").write_text("flags\n")
    repository = f"flags/{tmp_path.name.lower()}"
    cache_ref = f"{registry}/{repository}-cache:main"
    request = BuildRequest(
        source=LocalSource(path=str(context.parent)),
        context="app",
        dockerfile="build/Dockerfile.prod",
        images=(f"{registry}/{repository}:1", f"{registry}/{repository}:latest"),
        build_args={"VERSION": "1.2; echo no shell"},
        labels={"org.example.team": "builds"},
        target="runtime",  # the failing stage is not built
        platforms=("linux/amd64",),
        cache=CachePolicy(import_refs=(cache_ref,), export_ref=cache_ref),
    )
    metadata = tmp_path / "metadata.json"
    connection = BuildkitSettings(buildctl=find_tool("buildctl")).connection(buildkitd)
    done = subprocess.run(
        buildctl_argv(connection, request, metadata), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert _run_step_cached(done.stderr)  # --progress rawjson: JSON status lines
    digest = json.loads(metadata.read_text())["containerimage.digest"]  # --metadata-file
    for tag in ("1", "latest"):  # --output type=image,"name=a,b",push=true
        assert served_digest(registry, repository, tag) == digest
    config = image_config(registry, repository, "1")
    assert config["architecture"] == "amd64"  # --opt platform=
    labels = config["config"]["Labels"]
    assert labels["version"] == "1.2; echo no shell"  # --opt build-arg:
    assert labels["org.example.team"] == "builds"  # --opt label:
    assert served_digest(registry, f"{repository}-cache", "main") is not None  # --export-cache

    # --no-cache runs the RUN step again, where the same build without it finds it cached.
    again = subprocess.run(
        buildctl_argv(connection, request, metadata), capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert all(_run_step_cached(again.stderr).values())
    uncached = msgspec.structs.replace(request, cache=CachePolicy(disabled=True))
    fresh = subprocess.run(
        buildctl_argv(connection, uncached, metadata), capture_output=True, text=True, timeout=300
    )
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert not any(_run_step_cached(fresh.stderr).values())
    # --import-cache on a daemon that never built it: tests/test_registry_cache.py.

"""The buildctl command a request becomes: an argument list, never a shell string."""

import itertools
from pathlib import Path

from producer.contract import BuildRequest, CachePolicy, GitSource, LocalSource
from worker.backends.buildkit import buildctl_argv
from worker.backends.secrets import buildah_flags
from worker.settings import BuildkitSettings, SecretSource

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

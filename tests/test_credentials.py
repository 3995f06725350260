"""Registry credentials stay on the worker side of a BuildKit build (real services).

A registry that wants basic auth, a buildkitd that knows it, and a worker whose
DOCKER_CONFIG holds the credential: buildctl answers buildkitd's auth requests over its
session, so the push succeeds, while the RUN step of the same build looks for the password
(and its base64 form) in every file of its filesystem and every process environment it can
see, and finds neither. Without the credential the same push is refused: the registry
really does check.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import msgspec
import pytest
from test_secrets import ArgvWatch

from buildfleet import services
from producer.client import BuildfleetClient
from producer.contract import BuildRequest, Failed, LocalSource, Succeeded

from fleet import worker_config, worker_in_task

pytestmark = pytest.mark.timeout(300)
USER = "pusher"


class AuthRegistry:
    def __init__(self, address: str, password: str, buildkitd: str) -> None:
        self.address, self.password, self.buildkitd = address, password, buildkitd

    @property
    def auth(self) -> str:
        return base64.b64encode(f"{USER}:{self.password}".encode()).decode()


@pytest.fixture(scope="module")
def auth_registry(services_dir: Path, registry: str) -> Iterator[AuthRegistry]:
    password = secrets.token_hex(16)
    htpasswd = services_dir / "auth-registry.htpasswd"
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()  # all it takes
    htpasswd.write_text(f"{USER}:{hashed}\n")
    served = services.start_registry(services_dir, name="auth-registry", htpasswd=htpasswd)
    try:
        daemon = services.start_buildkitd(
            services_dir, [registry, served.address], name="buildkitd-auth"
        )
        try:
            yield AuthRegistry(served.address, password, daemon.address)
        finally:
            daemon.stop()
    finally:
        served.stop()


def docker_config(directory: Path, registry: AuthRegistry) -> Path:
    directory.mkdir()
    config = {"auths": {registry.address: {"auth": registry.auth}}}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def looks_for(needles: list[str]) -> str:
    """A RUN step failing if any of `needles` is in a file or a process environment it can
    read. The needles are written in halves, so that no process's argv holds one whole."""
    halves = " ".join(f"'{n[: len(n) // 2]}' '{n[len(n) // 2 :]}'" for n in needles)
    return (
        f"RUN printf '%s%s\\n' {halves} > /needles && "
        "for d in /*; do case $d in /proc|/sys|/dev|/needles) ;; *) "
        'if grep -rqsF -f /needles "$d"; then echo "FOUND under $d"; exit 1; fi;; esac; done && '
        "if cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -qF -f /needles; "
        "then echo FOUND in an environment; exit 1; fi && "
        "rm /needles && echo no credential in reach"
    )


async def test_buildkit_pushes_with_the_workers_credential_which_run_cannot_read(
    fleet: BuildfleetClient,
    redis_url: str,
    auth_registry: AuthRegistry,
    base_image: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "Dockerfile").write_text(
        f"FROM {base_image}\n{looks_for([auth_registry.password, auth_registry.auth])}\n"
    )
    source = LocalSource(path=str(tmp_path / "src"))
    image = f"{auth_registry.address}/private/app:1"
    config = worker_config(redis_url, daemons=[auth_registry.buildkitd])

    async with worker_in_task(config):
        # without a credential: the registry refuses the push
        build_id = await fleet.submit(BuildRequest(source=source, images=(image,)))
        refused = [event async for event in fleet.watch(build_id)][-1]
        assert isinstance(refused, Failed), msgspec.json.encode(refused)
        assert refused.result.error_class == "auth_denied", refused.result.error

        monkeypatch.setenv("DOCKER_CONFIG", str(docker_config(tmp_path / "docker", auth_registry)))
        with ArgvWatch().running() as watch:
            build_id = await fleet.submit(BuildRequest(source=source, images=(image,)))
            events = [event async for event in fleet.watch(build_id)]
    final = events[-1]
    assert isinstance(final, Succeeded), msgspec.json.encode(final)  # the RUN step found none
    assert final.result.digest is not None
    assert watch.commands("buildctl")  # not vacuous
    for argv in watch.seen:
        assert auth_registry.password.encode() not in argv
        assert auth_registry.auth.encode() not in argv

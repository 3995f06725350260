"""Build secrets on the worker: which configured secret each id a request names is, and the
builder flags that mount them.

Invariant: a secret's value is never read here, nor passed on by the worker. A request
carries ids only; the builder (buildctl, buildah) reads the value itself from the file or
the environment variable `[[worker.secrets]]` names, so the value is in no argv, event,
log, span or Redis key. Refusals name the id and where the value was looked for, never the
value.

| request names                          | answer                                            |
|----------------------------------------|---------------------------------------------------|
| an id no `[[worker.secrets]]` lists    | permanent `secret_not_configured`, naming the id  |
| an id whose file is missing/unreadable | permanent `secret_unavailable`, naming id + file  |
| an id whose variable is unset          | permanent `secret_unavailable`, naming id + name  |
| secrets, to a backend without them     | permanent `unsupported` (capabilities.refusal)    |
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from producer.contract import BuildRequest
from worker.errors import PermanentBuildError
from worker.settings import SecretSource


def sources_for(
    request: BuildRequest, configured: Sequence[SecretSource]
) -> tuple[SecretSource, ...]:
    """The configured source of each secret `request` names, in its order; a permanent
    error for the first one this worker cannot provide."""
    by_id = {source.id: source for source in configured}
    sources = []
    for secret in request.secrets:
        source = by_id.get(secret)
        if source is None:
            raise PermanentBuildError(
                f"secret {secret!r} is not configured on this worker ([[worker.secrets]]); "
                f"the build names it in `secrets`",
                error_class="secret_not_configured",
            )
        _check_available(source)
        sources.append(source)
    return tuple(sources)


def _check_available(source: SecretSource) -> None:
    if source.file is not None and not os.access(source.file, os.R_OK):
        raise PermanentBuildError(
            f"secret {source.id!r}: its file {source.file} is missing or unreadable on this worker",
            error_class="secret_unavailable",
        )
    if source.env is not None and source.env not in os.environ:
        raise PermanentBuildError(
            f"secret {source.id!r}: the worker's environment has no variable {source.env}",
            error_class="secret_unavailable",
        )


def buildctl_flags(sources: Sequence[SecretSource]) -> list[str]:
    """buildctl's `--secret id=ID,src=FILE` (or `env=NAME`): buildctl reads the value and
    serves it to buildkitd over its session, as a tmpfs mount of the RUN steps asking."""
    flags: list[str] = []
    for source in sources:
        where = f"src={source.file}" if source.file is not None else f"env={source.env}"
        flags += ["--secret", f"id={source.id},{where}"]
    return flags


def buildah_flags(sources: Sequence[SecretSource]) -> list[str]:
    """buildah's `--secret id=ID,src=FILE|NAME,type=file|env`."""
    flags: list[str] = []
    for source in sources:
        if source.file is not None:
            flags += ["--secret", f"id={source.id},src={source.file},type=file"]
        else:
            flags += ["--secret", f"id={source.id},src={source.env},type=env"]
    return flags

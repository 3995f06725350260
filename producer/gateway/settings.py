"""The gateway's configuration section (`[gateway]` in the fleet's TOML file).

Frozen msgspec Structs, validated once at start-up: an image template that names a
placeholder its rule cannot fill, or that renders to an invalid image name, is an error
then, not a surprise at the first push. Secrets and tokens never appear in a `repr`.

    [gateway]
    host = "0.0.0.0"
    port = 8080
    max_queue_depth = 5000
    api_tokens = ["s3cr3t-token"]

    [[gateway.webhook_secrets]]
    repo = "acme/*"            # an owner pattern; an exact "acme/api" wins over it
    secret = "hunter2"

    [[gateway.rules]]
    repo = "acme/*"
    branches = ["main", "release/*"]
    images = ["registry.local:5000/{repo}:{branch}", "registry.local:5000/{repo}:{short_sha}"]
"""

from __future__ import annotations

import fnmatch
import re
import string
from typing import Annotated, Final, Literal

import msgspec

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Forge = Literal["github", "gitlab", "gitea"]
Priority = Literal["interactive", "batch"]
NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]

IMAGE_NAME: Final = re.compile(r"^[a-z0-9][a-z0-9._:/@-]*$")
"""The contract's image-name pattern (producer.contract), repeated for config validation."""

BRANCH_FIELDS: Final = frozenset(
    {"repo", "owner", "name", "branch", "ref_name", "sha", "short_sha"}
)
TAG_FIELDS: Final = frozenset({"repo", "owner", "name", "tag", "ref_name", "sha", "short_sha"})
_SAMPLE: Final = {
    "repo": "owner/name",
    "owner": "owner",
    "name": "name",
    "branch": "main",
    "tag": "v1.0.0",
    "ref_name": "main",
    "sha": "0" * 40,
    "short_sha": "0" * 7,
}
_REDACTED: Final = "***"


def template_fields(template: str) -> set[str]:
    """The placeholders an image template uses; raises ValueError if it is malformed."""
    fields: set[str] = set()
    for _literal, field, spec, conversion in string.Formatter().parse(template):
        if field is None:
            continue
        if not field or spec or conversion:
            raise ValueError(f"placeholders are plain names like {{branch}}, got {template!r}")
        fields.add(field)
    return fields


class WebhookSecret(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The shared secret of the webhooks of one repository or of every repository matching
    a pattern (`acme/*`; `*` also crosses `/`, so it covers GitLab subgroups)."""

    repo: NonEmpty
    secret: NonEmpty
    forge: Forge | Literal["any"] = "any"

    def __repr__(self) -> str:
        return f"WebhookSecret(repo={self.repo!r}, secret={_REDACTED!r}, forge={self.forge!r})"

    def matches(self, forge: str, repo: str) -> bool:
        if self.forge not in ("any", forge):
            return False
        return fnmatch.fnmatchcase(repo.lower(), self.repo.lower())

    @property
    def exact(self) -> bool:
        return not any(ch in self.repo for ch in "*?[")


class Rule(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Which pushes build which image.

    `repo` is a glob over the repository's full path (`owner/name`, case-insensitive),
    `branches` and `tags` globs over branch and tag names (`release/*`). Image templates
    may use {repo} (owner/name), {owner}, {name}, {branch} (branch rules), {tag} (tag
    rules), {ref_name} (either), {sha} and {short_sha}; branch and tag names are made into
    valid image tags (lower case, other characters become `-`).
    """

    repo: NonEmpty
    images: Annotated[tuple[NonEmpty, ...], msgspec.Meta(min_length=1)]
    branches: tuple[NonEmpty, ...] = ("*",)
    tags: tuple[NonEmpty, ...] = ()
    dockerfile: NonEmpty = "Dockerfile"
    context: NonEmpty = "."
    build_args: dict[str, str] = msgspec.field(default_factory=dict)
    target: str | None = None
    platforms: tuple[str, ...] = ()
    priority: Priority = "interactive"
    push: bool = True
    supersede: bool = True
    """A newer push to the same repository, ref and image cancels this rule's queued build."""
    cancel_running: bool | None = None
    """Supersede a build that is already running too (default: `supersede.cancel_running`)."""

    def __post_init__(self) -> None:
        if not self.branches and not self.tags:
            raise ValueError("branches, tags: a rule needs at least one branch or tag pattern")
        allowed: frozenset[str] = BRANCH_FIELDS & TAG_FIELDS
        if not self.tags:
            allowed = BRANCH_FIELDS
        elif not self.branches:
            allowed = TAG_FIELDS
        for index, template in enumerate(self.images):
            where = f"images[{index}]"
            try:
                fields = template_fields(template)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
            unknown = fields - allowed
            if unknown:
                raise ValueError(
                    f"{where}: placeholder {{{sorted(unknown)[0]}}} cannot be filled for the refs "
                    f"this rule matches; expected some of {sorted(allowed)}"
                )
            sample = template.format(**_SAMPLE)
            if not IMAGE_NAME.match(sample):
                raise ValueError(
                    f"{where}: template renders to an invalid image name {sample!r} (lower case "
                    f"letters, digits and ._:/@- only)"
                )
        for field, path in (("dockerfile", self.dockerfile), ("context", self.context)):
            if path.startswith("/") or ".." in path.split("/"):
                raise ValueError(
                    f"{field}: expected a relative path inside the repository, got {path!r}"
                )


class SupersedeSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    cancel_running: bool = False
    """Also cancel an older build that has started (a rule's `cancel_running` overrides)."""
    record_ttl_s: PositiveInt = 7 * 24 * 3600
    """How long `buildfleet:supersede:{key}` remembers the latest build of a repo+ref+image."""


class GatewaySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The HTTP gateway: webhooks, REST API, limits."""

    host: str = "127.0.0.1"
    port: Port = 8080
    body_limit_bytes: PositiveInt = 5 * 1024 * 1024
    """Larger bodies get 413 without being read."""
    max_queue_depth: PositiveInt = 10_000
    """At or above this many queued builds, batch-priority API submissions get 429."""
    retry_after_s: PositiveInt = 30
    """The `Retry-After` of a 429."""
    api_tokens: tuple[NonEmpty, ...] = ()
    """Bearer tokens of the REST API; with none, /v1 answers 401 to everyone."""
    webhook_secrets: tuple[WebhookSecret, ...] = ()
    rules: tuple[Rule, ...] = ()
    supersede: SupersedeSettings = SupersedeSettings()
    delivery_ttl_s: PositiveInt = 24 * 3600
    """How long a delivery id is remembered, so a redelivery makes no second build."""
    sse_heartbeat_s: PositiveFloat = 15.0
    """A comment line on an idle event stream this often keeps proxies from closing it."""
    shutdown_timeout_s: PositiveFloat = 10.0
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    """`auto` runs on uvloop when it is installed (markedly more requests per second)."""

    def __repr__(self) -> str:
        fields = []
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if name == "api_tokens":
                value = tuple(_REDACTED for _ in value)
            fields.append(f"{name}={value!r}")
        return f"GatewaySettings({', '.join(fields)})"

    def secret_for(self, forge: str, repo: str) -> str | None:
        """The secret of `repo`'s webhooks: an exact entry first, else the first pattern."""
        candidates = [s for s in self.webhook_secrets if s.matches(forge, repo)]
        for candidate in candidates:
            if candidate.exact:
                return candidate.secret
        return candidates[0].secret if candidates else None


def load_gateway_settings(data: object) -> GatewaySettings:
    """The `[gateway]` table (TOML values, or strings from environment overrides) validated;
    a ValueError names the field and what was expected."""
    try:
        return msgspec.convert(data, GatewaySettings, strict=False)
    except msgspec.ValidationError as exc:
        raise ValueError(f"gateway: {exc}") from exc

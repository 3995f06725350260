"""The gateway's configuration section (`[gateway]` in the fleet's TOML file).

Frozen msgspec Structs, validated once at start-up: an image template that names a
placeholder its rule cannot fill, or that renders to an invalid image name, is an error
then, not a surprise at the first push. Webhook secrets never appear in a `repr`; API tokens
are configured as their SHA-256 only.

    [gateway]
    host = "0.0.0.0"
    port = 8080
    max_queue_depth = 5000

    [[gateway.tokens]]
    name = "ci"
    sha256 = "<hex SHA-256 of the token>"
    images = ["registry.local:5000/acme/*"]
    sources = ["https://github.com/acme/*"]
    secrets = ["npm"]          # build secrets its builds may mount (ids; values: workers)

    [gateway.sources]
    hosts = ["git.internal:9418"]  # besides the forges' own hosts

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
import string
from typing import Annotated, Final, Literal

import msgspec

from producer import policy, reference
from producer.contract import MAX_SECRETS, SecretId
from producer.fields import NonEmpty, Port, PositiveFloat, PositiveInt, Priority
from producer.policy import SourcePolicy

Forge = Literal["github", "gitlab", "gitea"]
TokenName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
TenantName = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9._/-]{0,127}$")]
Sha256Hex = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]

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
    """The shared secret of the webhooks of one repository, of every repository matching a
    pattern (`acme/*`, an organization's webhook; `*` also crosses `/`, so it covers GitLab
    subgroups), or of one GitHub App installation (`installation`, with `repo` narrowing it)."""

    secret: NonEmpty
    repo: NonEmpty = "*"
    forge: Forge | Literal["any"] = "any"
    installation: PositiveInt | None = None
    """A GitHub App installation id: the secret signs that installation's events."""

    def __repr__(self) -> str:
        return (
            f"WebhookSecret(repo={self.repo!r}, secret={_REDACTED!r}, forge={self.forge!r}, "
            f"installation={self.installation!r})"
        )

    def serves(self, forge: str) -> bool:
        return self.forge in ("any", forge)

    def covers(self, repo: str, installation: int | None) -> bool:
        """Whether this secret may sign events of `repo` (from `installation`)."""
        if self.installation is not None and self.installation != installation:
            return False
        return fnmatch.fnmatchcase(repo.lower(), self.repo.lower())

    @property
    def exact(self) -> bool:
        return self.installation is None and not any(ch in self.repo for ch in "*?[")


class ForgeSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where a forge's repositories are cloned from: webhook builds clone
    `clone_url` with {repo} replaced by the repository's path, never a URL taken from the
    payload, and the template's host is an allowed git host."""

    clone_url: NonEmpty

    def __post_init__(self) -> None:
        try:
            fields = template_fields(self.clone_url)
        except ValueError as exc:
            raise ValueError(f"clone_url: {exc}") from None
        if fields != {"repo"}:
            raise ValueError(f"clone_url: expected exactly one {{repo}} placeholder, got {fields}")
        try:
            policy.parse_git_url(self.clone_url.format(repo="owner/name"))
        except ValueError as exc:
            raise ValueError(f"clone_url: {exc}") from None

    def url_for(self, repo: str) -> str:
        return self.clone_url.format(repo=repo)

    @property
    def host(self) -> str:
        """`host`, or `host:port` when the template names a port."""
        url = policy.parse_git_url(self.url_for("owner/name"))
        return url.host if url.port is None else f"{url.host}:{url.port}"


class Forges(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    github: ForgeSettings = ForgeSettings("https://github.com/{repo}.git")
    gitlab: ForgeSettings = ForgeSettings("https://gitlab.com/{repo}.git")
    gitea: ForgeSettings = ForgeSettings("https://gitea.com/{repo}.git")

    def of(self, forge: Forge) -> ForgeSettings:
        match forge:
            case "github":
                return self.github
            case "gitlab":
                return self.gitlab
            case "gitea":
                return self.gitea

    @property
    def hosts(self) -> frozenset[str]:
        return frozenset(f.host for f in (self.github, self.gitlab, self.gitea))


class TenantSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A tenant: whose builds see each other's. Webhook builds belong to the tenant listing
    their repository's owner (else to a tenant named after the owner); API builds to their
    token's tenant."""

    name: TenantName
    owners: tuple[NonEmpty, ...] = ()
    """Repository owners (globs, case-insensitive) whose pushes build as this tenant."""
    max_queued: PositiveInt | None = None
    """Builds of this tenant waiting at once; beyond it, 429 with Retry-After."""


class TokenSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A REST API token: its SHA-256 (never the token), and what it may do.

    A token is a random string made once (`python -c 'import secrets;
    print(secrets.token_urlsafe(32))'`); configure its hash (`printf %s TOKEN | sha256sum`).
    """

    name: TokenName
    sha256: Sha256Hex
    images: Annotated[tuple[NonEmpty, ...], msgspec.Meta(min_length=1)]
    """Globs over registry/repository its builds may push to and use as cache
    (`registry.example.com/acme/*`; `*` for any)."""
    sources: tuple[NonEmpty, ...] = ("*",)
    """Globs over the git URLs (or local paths) it may build from, within [gateway.sources]."""
    tenant: TenantName | None = None
    """Its tenant (default: its own name); it sees and cancels that tenant's builds only."""
    max_queued: PositiveInt | None = None
    """Its builds waiting at once; beyond it, 429 with Retry-After."""
    priorities: Annotated[tuple[Priority, ...], msgspec.Meta(min_length=1)] = (
        "interactive",
        "batch",
    )
    secrets: tuple[NonEmpty, ...] = ()
    """Globs over the build secret ids ([[worker.secrets]]) its builds may mount (`npm`,
    `acme-*`); none unless listed."""

    @property
    def tenant_name(self) -> str:
        return self.tenant or self.name


class LimitSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Rates and counts, per gateway process."""

    requests_per_s: PositiveFloat = 20.0
    """REST requests per second per token (a token bucket of `burst`)."""
    burst: PositiveInt = 40
    webhooks_per_s: PositiveFloat = 5.0
    """Webhook deliveries per second per repository (a token bucket of `webhook_burst`)."""
    webhook_burst: PositiveInt = 30
    streams_per_token: PositiveInt = 16
    """Event streams (SSE) one token may hold open at once."""
    streams: PositiveInt = 1000
    """Event streams open at once in all."""
    tenant_max_queued: PositiveInt | None = None
    """The queued-build cap of a tenant [[gateway.tenants]] does not list (None: no cap)."""


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
    secrets: Annotated[tuple[SecretId, ...], msgspec.Meta(max_length=MAX_SECRETS)] = ()
    """Ids of worker secrets ([[worker.secrets]]) the Dockerfile mounts with
    `RUN --mount=type=secret,id=ID`."""
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
            if not reference.is_reference(sample):
                raise ValueError(
                    f"{where}: template renders to an invalid image name {sample!r} (lower case "
                    f"letters, digits and ._:/@- only)"
                )
        for field, path in (("dockerfile", self.dockerfile), ("context", self.context)):
            if path.startswith("/") or ".." in path.split("/"):
                raise ValueError(
                    f"{field}: expected a relative path inside the repository, got {path!r}"
                )
        if len(set(self.secrets)) != len(self.secrets):
            raise ValueError("secrets: expected each secret id once")


class SupersedeSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    cancel_running: bool = False
    """Also cancel an older build that has started (a rule's `cancel_running` overrides)."""
    record_ttl_s: PositiveInt = 7 * 24 * 3600
    """How long `buildfleet:supersede:{key}` remembers the latest build of a repo+ref+image."""


class GatewaySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The HTTP gateway: webhooks, REST API, policy, limits."""

    host: str = "127.0.0.1"
    port: Port = 8080
    body_limit_bytes: PositiveInt = 5 * 1024 * 1024
    """Larger webhook bodies get 413 without being read."""
    api_body_limit_bytes: PositiveInt = 256 * 1024
    """Larger REST bodies (a build request) get 413 without being read."""
    max_queue_depth: PositiveInt = 10_000
    """At or above this many queued builds, batch-priority API submissions get 429."""
    max_queue_depth_interactive: PositiveInt = 50_000
    """At or above this many, interactive submissions and webhook pushes get 429 too."""
    retry_after_s: PositiveInt = 30
    """The `Retry-After` of a 429 for a full queue."""
    tokens: tuple[TokenSettings, ...] = ()
    """REST API tokens ([[gateway.tokens]]); with none, /v1 answers 401 to everyone."""
    api_tokens: tuple[str, ...] = ()
    """Replaced by `tokens`: a non-empty list is refused with a message saying so."""
    tenants: tuple[TenantSettings, ...] = ()
    forges: Forges = Forges()
    sources: SourcePolicy = SourcePolicy()
    limits: LimitSettings = LimitSettings()
    webhook_secrets: tuple[WebhookSecret, ...] = ()
    rules: tuple[Rule, ...] = ()
    supersede: SupersedeSettings = SupersedeSettings()
    delivery_ttl_s: PositiveInt = 24 * 3600
    """How long a delivery id is remembered, so a redelivery makes no second build."""
    refuse_old_pushes: bool = True
    """A push of a commit already built for its ref, or one its ref has moved past (a
    replayed or late delivery), builds nothing (409). Off: every push builds."""
    push_history_ttl_s: PositiveInt = 30 * 24 * 3600
    """How long the commits built for a ref are remembered."""
    sse_heartbeat_s: PositiveFloat = 15.0
    """A comment line on an idle event stream this often keeps proxies from closing it."""
    shutdown_timeout_s: PositiveFloat = 10.0
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    """`auto` runs on uvloop when it is installed (markedly more requests per second)."""

    def __post_init__(self) -> None:
        if self.api_tokens:
            raise ValueError(
                "api_tokens: plain tokens are no longer accepted; list each token as "
                "[[gateway.tokens]] with its name, sha256 and the images it may push"
            )
        if self.max_queue_depth_interactive < self.max_queue_depth:
            raise ValueError("max_queue_depth_interactive: expected at least max_queue_depth")
        for what, values in (
            ("tokens: name", [t.name for t in self.tokens]),
            ("tokens: sha256", [t.sha256 for t in self.tokens]),
            ("tenants: name", [t.name for t in self.tenants]),
        ):
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"{what} {repeated[0]!r} appears more than once")

    def tenant_of_owner(self, owner: str) -> str:
        """The tenant of a repository owner's webhook builds."""
        owner = owner.lower()
        for tenant in self.tenants:
            if any(fnmatch.fnmatchcase(owner, pattern.lower()) for pattern in tenant.owners):
                return tenant.name
        return owner

    def tenant_cap(self, tenant: str) -> int | None:
        for candidate in self.tenants:
            if candidate.name == tenant:
                return candidate.max_queued
        return self.limits.tenant_max_queued

    @property
    def git_hosts(self) -> frozenset[str]:
        """Where git sources may come from: the forges' hosts and [gateway.sources].hosts."""
        return self.forges.hosts | frozenset(self.sources.hosts)


def load_gateway_settings(data: object) -> GatewaySettings:
    """The `[gateway]` table (TOML values, or strings from environment overrides) validated;
    a ValueError names the field and what was expected."""
    try:
        return msgspec.convert(data, GatewaySettings, strict=False)
    except msgspec.ValidationError as exc:
        raise ValueError(f"gateway: {exc}") from exc

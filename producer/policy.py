"""What a producer may ask the fleet to build: checks of a request against a policy. Pure.

    policy = RequestPolicy(hosts=frozenset({"github.com"}), images=("registry.example.com/acme/*",))
    check_request(request, policy)        # PolicyError naming the field, or None

The gateway checks every API request against the policy of the caller's token; the CLI and
the Python client (trusted producers on their own host) may apply the same checks with
`RequestPolicy.trusted()`. Every build runs code somebody else wrote, so:

| what                | rule                                                                  |
|---------------------|-----------------------------------------------------------------------|
| git source          | scheme and host from an allowlist; no credentials, query or fragment; |
|                     | an http(s) URL must name a repository (`.git`), or BuildKit would     |
|                     | fetch it as a plain HTTP context                                      |
| local source        | only under configured directories (none: refused); trusted: anywhere  |
| images, cache refs  | the reference grammar (producer.reference), then the allowed patterns |
|                     | (globs over registry/repository)                                      |
| priority, tenant    | the caller's own                                                      |
| secrets             | ids only (the values live on the workers), at most 16, among the      |
|                     | caller's allowed patterns (none unless configured)                    |
| timeout_s           | at most the configured maximum                                        |
| paths, platforms,   | no characters a builder reads as syntax (`#`, `,`, controls)          |
| target, trace, ids  |                                                                       |

Every refusal names the field the way the message contract does (`- at `$.source.url``).
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

import msgspec

from producer import reference
from producer.contract import (
    BUILD_ID_PATTERN,
    SECRET_ID_PATTERN,
    BuildRequest,
    GitSource,
    LocalSource,
)
from producer.fields import AbsolutePath, NonEmpty

GitScheme = Literal["https", "ssh", "git", "http"]
DEFAULT_SCHEMES: Final[tuple[GitScheme, ...]] = ("https", "ssh", "git")
PRIORITIES: Final = frozenset({"interactive", "batch"})

TRACEPARENT_PATTERN: Final = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
TRACESTATE_MAX: Final = 512
PLATFORM_PATTERN: Final = r"^[a-z0-9_]+/[a-z0-9_]+(/[a-z0-9_.]+)?$"
TARGET_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MAX_PATH: Final = 1024
MAX_SUPERSEDE_KEY: Final = 256
MAX_LABELS: Final = 64

_BUILD_ID: Final = re.compile(BUILD_ID_PATTERN)
_SECRET_ID: Final = re.compile(SECRET_ID_PATTERN)
_TRACEPARENT: Final = re.compile(TRACEPARENT_PATTERN)
_PRINTABLE: Final = re.compile(r"[\x20-\x7e]*")
_PLATFORM: Final = re.compile(PLATFORM_PATTERN)
_TARGET: Final = re.compile(TARGET_PATTERN)
_SCP_LIKE: Final = re.compile(
    r"(?P<user>[A-Za-z0-9._-]+)@(?P<host>[A-Za-z0-9.-]+):(?P<path>[^/:].*)"
)
_HOST: Final = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\]")
_GIT_TRANSPORTS: Final = frozenset({"https", "ssh", "git", "http"})
_URL_FORBIDDEN: Final = re.compile(r"[\x00-\x20\x7f#\\]")
_PATH_FORBIDDEN: Final = re.compile(r"[\x00-\x1f\x7f#]")


class PolicyError(ValueError):
    """The request is not allowed; the text says why and names the field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{reason} - at `{field}`")
        self.field = field
        self.reason = reason


class SourcePolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where builds may take their sources from (`[gateway.sources]`)."""

    schemes: tuple[GitScheme, ...] = DEFAULT_SCHEMES
    """Git URL schemes allowed; `http` (unencrypted) only if listed."""
    hosts: tuple[NonEmpty, ...] = ()
    """Git hosts allowed besides the configured forges': `host` (any port) or `host:port`."""
    local_roots: tuple[AbsolutePath, ...] = ()
    """Local sources (a directory on the worker) are refused unless listed here, and then
    only under these directories."""


@dataclass(frozen=True, slots=True)
class RequestPolicy:
    """Everything one caller may ask for."""

    schemes: frozenset[str] = frozenset(DEFAULT_SCHEMES)
    hosts: frozenset[str] | None = frozenset()
    """Allowed git hosts (`host` or `host:port`); None: any host."""
    local_roots: tuple[str, ...] | None = ()
    """Directories local sources may be under; (): no local source; None: any directory."""
    images: tuple[str, ...] = ("*",)
    """Globs over registry/repository that images and cache references must match."""
    sources: tuple[str, ...] = ("*",)
    """Globs over git URLs (or local paths) the caller may build from."""
    priorities: frozenset[str] = PRIORITIES
    max_timeout_s: float | None = None
    tenant: str | None = None
    """The caller's tenant: a request may name it (or leave the default), no other."""
    secrets: tuple[str, ...] = ()
    """Globs over the secret ids the caller's builds may mount; (): none."""

    @classmethod
    def trusted(cls, max_timeout_s: float | None = None) -> RequestPolicy:
        """A producer on the fleet's own host (the CLI, `buildfleet up`): local sources from
        anywhere, git from any host, any secret the worker has; the grammar and the timeout
        bound still hold."""
        return cls(hosts=None, local_roots=None, max_timeout_s=max_timeout_s, secrets=("*",))


@dataclass(frozen=True, slots=True)
class GitUrl:
    scheme: str
    host: str
    port: int | None
    path: str


def check_request(request: BuildRequest, policy: RequestPolicy) -> None:
    """Raise PolicyError for the first thing `request` may not ask for under `policy`."""
    if not _BUILD_ID.fullmatch(request.id):
        raise PolicyError("$.id", f"expected an id matching {BUILD_ID_PATTERN}")
    _check_source(request, policy)
    for index, image in enumerate(request.images):
        _check_reference(image, f"$.images[{index}]", policy)
    for index, ref in enumerate(request.cache.import_refs):
        _check_reference(ref, f"$.cache.import_refs[{index}]", policy)
    if request.cache.export_ref is not None:
        _check_reference(request.cache.export_ref, "$.cache.export_ref", policy)
    if request.priority not in policy.priorities:
        allowed = ", ".join(sorted(policy.priorities)) or "none"
        raise PolicyError("$.priority", f"priority {request.priority!r} not allowed ({allowed})")
    if policy.tenant is not None and request.tenant not in (policy.tenant, "default"):
        raise PolicyError("$.tenant", f"tenant {request.tenant!r} is not yours")
    if (
        policy.max_timeout_s is not None
        and request.timeout_s is not None
        and request.timeout_s > policy.max_timeout_s
    ):
        raise PolicyError("$.timeout_s", f"expected at most {policy.max_timeout_s:g} seconds")
    _check_secrets(request, policy)
    _check_recipe(request)
    _check_trace(request)
    _check_labels(request)


def parse_git_url(url: str) -> GitUrl:
    """A git URL (`scheme://[user@]host[:port]/path` or scp-like `user@host:path`);
    ValueError saying what is wrong."""
    if _URL_FORBIDDEN.search(url):
        raise ValueError("expected a git URL without spaces, control characters, '#' or '\\'")
    scp = _SCP_LIKE.fullmatch(url) if "://" not in url else None
    if scp is not None:
        return _git_url("ssh", scp["host"], None, scp["path"])
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"expected a git URL: {exc}") from None
    if parts.scheme and parts.scheme.lower() not in _GIT_TRANSPORTS:
        raise ValueError(f"scheme {parts.scheme!r} not allowed (git transports only)")
    if not parts.scheme or not parts.netloc:
        raise ValueError("expected a git URL like https://host/owner/repo.git")
    if parts.query or parts.fragment:
        raise ValueError("expected a git URL without a query or fragment")
    if parts.password is not None or (parts.username is not None and parts.scheme != "ssh"):
        raise ValueError("expected a git URL without credentials (they would be stored in Redis)")
    return _git_url(parts.scheme.lower(), parts.hostname or "", port, parts.path)


def _git_url(scheme: str, host: str, port: int | None, path: str) -> GitUrl:
    host = host.lower()
    if not _HOST.fullmatch(host):
        raise ValueError(f"expected a host name, got {host!r}")
    if not path.strip("/"):
        raise ValueError("expected a repository path")
    return GitUrl(scheme, host, port, path)


def host_allowed(url: GitUrl, hosts: Iterable[str]) -> bool:
    """`hosts` entries are `host` (any port) or `host:port`."""
    allowed = set(hosts)
    return url.host in allowed or f"{url.host}:{url.port}" in allowed


def matches(value: str, patterns: Iterable[str]) -> bool:
    """Case-insensitive globs (`*` also crosses `/`)."""
    lowered = value.lower()
    return any(fnmatch.fnmatchcase(lowered, pattern.lower()) for pattern in patterns)


def _check_source(request: BuildRequest, policy: RequestPolicy) -> None:
    match request.source:
        case GitSource(url=url):
            _check_git(url, policy)
            origin = url
        case LocalSource(path=path):
            _check_local(path, policy)
            origin = path
    if not matches(origin, policy.sources):
        raise PolicyError(
            "$.source", f"source {origin!r} is not among the sources this token may build"
        )


def _check_git(url: str, policy: RequestPolicy) -> None:
    field = "$.source.url"
    try:
        parsed = parse_git_url(url)
    except ValueError as exc:
        raise PolicyError(field, str(exc)) from None
    if parsed.scheme not in policy.schemes:
        allowed = ", ".join(sorted(policy.schemes))
        raise PolicyError(field, f"scheme {parsed.scheme!r} not allowed (allowed: {allowed})")
    if parsed.scheme in ("http", "https") and not parsed.path.rstrip("/").endswith(".git"):
        raise PolicyError(
            field,
            "an http(s) source must be a git repository URL ending in .git (anything else "
            "would be fetched as a plain HTTP context)",
        )
    if policy.hosts is not None and not host_allowed(parsed, policy.hosts):
        raise PolicyError(field, f"host {parsed.host!r} is not an allowed git host")


def _check_local(path: str, policy: RequestPolicy) -> None:
    field = "$.source.path"
    if policy.local_roots is not None and not policy.local_roots:
        raise PolicyError(
            "$.source", "local sources are not allowed here (only from trusted producers)"
        )
    if _PATH_FORBIDDEN.search(path) or not path.startswith("/"):
        raise PolicyError(field, "expected an absolute path without control characters")
    if posixpath.normpath(path) != path.rstrip("/") and path != "/":
        raise PolicyError(field, "expected a normalized path (no '..', '.' or '//')")
    if policy.local_roots is not None and not any(
        path == root or path.startswith(root.rstrip("/") + "/") for root in policy.local_roots
    ):
        raise PolicyError(field, "local source outside the allowed directories")


def _check_reference(text: str, field: str, policy: RequestPolicy) -> None:
    try:
        parsed = reference.parse(text)
    except reference.ReferenceError as exc:
        raise PolicyError(field, str(exc)) from None
    if not matches(parsed.name, policy.images):
        raise PolicyError(field, f"{parsed.name!r} is not among the images this token may use")


def _check_secrets(request: BuildRequest, policy: RequestPolicy) -> None:
    # (how many, and each once: the contract's own __post_init__ says)
    for index, secret in enumerate(request.secrets):
        field = f"$.secrets[{index}]"
        if not _SECRET_ID.fullmatch(secret):
            raise PolicyError(field, f"expected a secret id matching {SECRET_ID_PATTERN}")
        if not any(fnmatch.fnmatchcase(secret, pattern) for pattern in policy.secrets):
            raise PolicyError(
                field, f"secret {secret!r} is not among the secrets this token may use"
            )


def _check_recipe(request: BuildRequest) -> None:
    for field, path in (("$.dockerfile", request.dockerfile), ("$.context", request.context)):
        if len(path) > MAX_PATH or _PATH_FORBIDDEN.search(path):
            raise PolicyError(field, "expected a path without '#' or control characters")
    if request.target is not None and not _TARGET.fullmatch(request.target):
        raise PolicyError("$.target", f"expected a stage name matching {TARGET_PATTERN}")
    for index, platform in enumerate(request.platforms):
        if not _PLATFORM.fullmatch(platform):
            raise PolicyError(f"$.platforms[{index}]", "expected a platform like linux/amd64")
    for name, value in request.build_args.items():
        if "\x00" in value:
            raise PolicyError(f"$.build_args.{name}", "expected a value without NUL")
    key = request.supersede_key
    if key is not None and (len(key) > MAX_SUPERSEDE_KEY or not _PRINTABLE.fullmatch(key)):
        raise PolicyError(
            "$.supersede_key", f"expected printable ASCII of at most {MAX_SUPERSEDE_KEY}"
        )


def _check_trace(request: BuildRequest) -> None:
    trace = request.trace
    if trace.traceparent is not None and not _TRACEPARENT.fullmatch(trace.traceparent):
        raise PolicyError("$.trace.traceparent", "expected a W3C traceparent (00-<32>-<16>-<2>)")
    state = trace.tracestate
    if state is not None and (len(state) > TRACESTATE_MAX or not _PRINTABLE.fullmatch(state)):
        raise PolicyError(
            "$.trace.tracestate", f"expected printable ASCII of at most {TRACESTATE_MAX}"
        )


def _check_labels(request: BuildRequest) -> None:
    if len(request.labels) > MAX_LABELS:
        raise PolicyError("$.labels", f"expected at most {MAX_LABELS} labels")
    for name, value in request.labels.items():
        if not _PRINTABLE.fullmatch(name) or not _PRINTABLE.fullmatch(value):
            raise PolicyError(f"$.labels.{name[:40]}", "expected printable ASCII")

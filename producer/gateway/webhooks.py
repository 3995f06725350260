"""Push webhooks of GitHub, GitLab and Gitea/Forgejo: signature checks and payload parsing.

Pure functions over the raw body and the headers; no I/O. The payload is decoded first only
to learn which repository it claims to be from, since that decides the secret; nothing is
acted on before the signature (or GitLab's token) has been checked in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, TypeVar

import msgspec

from producer.gateway.settings import Forge

ZERO_SHA: Final = frozenset({"0" * 40, "0" * 64})
MAX_DELIVERY_ID: Final = 200
DELIVERY_ID_PATTERN: Final = r"^[\x20-\x7e]{1,200}$"
_PRINTABLE: Final = re.compile(r"^[\x20-\x7e]+$")

SecretLookup = Callable[[str, str], str | None]
"""(forge, repository full path) -> that repository's webhook secret, or None."""


class WebhookError(Exception):
    status: int = 400

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BadRequest(WebhookError):
    status = 400


class Unauthorized(WebhookError):
    status = 401


@dataclass(frozen=True, slots=True)
class Push:
    """A ref update: the branch or tag `ref` of `repo` now points at `sha`."""

    forge: Forge
    repo: str
    clone_url: str
    ref: str
    sha: str
    deleted: bool = False

    @property
    def branch(self) -> str | None:
        return self.ref.removeprefix("refs/heads/") if self.ref.startswith("refs/heads/") else None

    @property
    def tag(self) -> str | None:
        return self.ref.removeprefix("refs/tags/") if self.ref.startswith("refs/tags/") else None


@dataclass(frozen=True, slots=True)
class Ping:
    forge: Forge
    repo: str


@dataclass(frozen=True, slots=True)
class Ignored:
    """A signed event that is not a push (an issue comment, a release...): acknowledged."""

    forge: Forge
    repo: str
    event: str


WebhookEvent = Push | Ping | Ignored


@dataclass(frozen=True, slots=True)
class Delivery:
    forge: Forge
    delivery_id: str | None
    event: WebhookEvent


# --- payload shapes (only the fields we read; everything else is skipped) ----------------


class _Owner(msgspec.Struct):
    login: str = ""


class _Commit(msgspec.Struct):
    id: str = ""


class _HubRepo(msgspec.Struct):
    full_name: str
    clone_url: str = ""


class _GitHubPayload(msgspec.Struct):
    repository: _HubRepo | None = None
    organization: _Owner | None = None
    ref: str | None = None
    after: str = ""
    deleted: bool = False
    head_commit: _Commit | None = None


class _GitLabProject(msgspec.Struct):
    path_with_namespace: str
    git_http_url: str = ""


class _GitLabPayload(msgspec.Struct):
    object_kind: str = ""
    project: _GitLabProject | None = None
    ref: str | None = None
    after: str = ""
    checkout_sha: str | None = None


class _GiteaPayload(msgspec.Struct):
    repository: _HubRepo | None = None
    ref: str | None = None
    ref_type: str | None = None
    after: str = ""
    head_commit: _Commit | None = None


_github_decoder: Final = msgspec.json.Decoder(_GitHubPayload)
_gitlab_decoder: Final = msgspec.json.Decoder(_GitLabPayload)
_gitea_decoder: Final = msgspec.json.Decoder(_GiteaPayload)


_T = TypeVar("_T")


def _decode(decoder: msgspec.json.Decoder[_T], body: bytes) -> _T:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"unexpected payload: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply") from None


def _header(headers: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = headers.get(name)
        if value is not None:
            return value
    return None


def _ascii(value: str) -> bytes:
    return value.encode("utf-8", "replace")


def hmac_sha256_hex(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _check_hmac(secret: str | None, body: bytes, given: str, prefix: str = "") -> None:
    if secret is None:
        raise Unauthorized("invalid signature")
    expected = prefix + hmac_sha256_hex(secret, body)
    if not hmac.compare_digest(_ascii(expected), _ascii(given.strip())):
        raise Unauthorized("invalid signature")


def _check_token(secret: str | None, given: str) -> None:
    if secret is None or not hmac.compare_digest(_ascii(secret), _ascii(given)):
        raise Unauthorized("invalid token")


def _delivery_id(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    value = value.strip()
    if len(value) > MAX_DELIVERY_ID:
        raise BadRequest(f"delivery id longer than {MAX_DELIVERY_ID} characters")
    if not _PRINTABLE.fullmatch(value):
        raise BadRequest("delivery id must be printable ASCII")
    return value


def _sha(*candidates: str | None) -> str:
    for candidate in candidates:
        if candidate:
            return candidate
    return ""


def _push(
    forge: Forge, repo: str, clone_url: str, *, ref: str | None, sha: str, deleted: bool
) -> Push:
    if not ref:
        raise BadRequest("a push payload needs `ref`")
    if not ref.startswith("refs/"):
        ref = "refs/heads/" + ref
    deleted = deleted or sha in ZERO_SHA or not sha
    return Push(forge, repo, clone_url, ref, "" if deleted else sha.lower(), deleted)


def parse_github(headers: Mapping[str, str], body: bytes, secrets: SecretLookup) -> Delivery:
    """`X-GitHub-Event` push (or ping), signed by `X-Hub-Signature-256: sha256=<hex>`."""
    signature = headers.get("X-Hub-Signature-256")
    if not signature:
        raise Unauthorized("missing X-Hub-Signature-256")
    event = headers.get("X-GitHub-Event")
    if not event:
        raise BadRequest("missing X-GitHub-Event")
    delivery = _delivery_id(headers.get("X-GitHub-Delivery"))
    payload = _decode(_github_decoder, body)
    if payload.repository is not None:
        repo = payload.repository.full_name
    elif payload.organization is not None and payload.organization.login:
        repo = payload.organization.login + "/"  # an organization hook's ping: "acme/*" fits
    else:
        raise BadRequest("payload names no repository")
    _check_hmac(secrets("github", repo), body, signature, prefix="sha256=")
    if event == "ping":
        return Delivery("github", delivery, Ping("github", repo))
    if event != "push" or payload.repository is None:
        return Delivery("github", delivery, Ignored("github", repo, event))
    sha = _sha(payload.head_commit.id if payload.head_commit else None, payload.after)
    push = _push(
        "github",
        repo,
        payload.repository.clone_url,
        ref=payload.ref,
        sha=sha,
        deleted=payload.deleted,
    )
    return Delivery("github", delivery, push)


_GITLAB_PUSH_EVENTS: Final = {"Push Hook": "push", "Tag Push Hook": "tag_push"}


def parse_gitlab(headers: Mapping[str, str], body: bytes, secrets: SecretLookup) -> Delivery:
    """`X-Gitlab-Event` Push Hook / Tag Push Hook, authenticated by `X-Gitlab-Token`."""
    token = headers.get("X-Gitlab-Token")
    if not token:
        raise Unauthorized("missing X-Gitlab-Token")
    event = headers.get("X-Gitlab-Event")
    if not event:
        raise BadRequest("missing X-Gitlab-Event")
    delivery = _delivery_id(_header(headers, "X-Gitlab-Event-UUID", "X-Gitlab-Webhook-UUID"))
    payload = _decode(_gitlab_decoder, body)
    if payload.project is None:
        raise BadRequest("payload names no project")
    repo = payload.project.path_with_namespace
    _check_token(secrets("gitlab", repo), token)
    if event not in _GITLAB_PUSH_EVENTS:
        return Delivery("gitlab", delivery, Ignored("gitlab", repo, event))
    push = _push(
        "gitlab",
        repo,
        payload.project.git_http_url,
        ref=payload.ref,
        sha=_sha(payload.checkout_sha, payload.after),
        deleted=payload.checkout_sha is None and payload.after in ZERO_SHA,
    )
    return Delivery("gitlab", delivery, push)


def parse_gitea(headers: Mapping[str, str], body: bytes, secrets: SecretLookup) -> Delivery:
    """`X-Gitea-Event` (or Forgejo's) push, signed by `X-Gitea-Signature: <hex>`.

    Gitea reports a deleted branch or tag as a separate `delete` event.
    """
    signature = _header(headers, "X-Gitea-Signature", "X-Forgejo-Signature")
    if not signature:
        raise Unauthorized("missing X-Gitea-Signature")
    event = _header(headers, "X-Gitea-Event", "X-Forgejo-Event")
    if not event:
        raise BadRequest("missing X-Gitea-Event")
    delivery = _delivery_id(_header(headers, "X-Gitea-Delivery", "X-Forgejo-Delivery"))
    payload = _decode(_gitea_decoder, body)
    if payload.repository is None:
        raise BadRequest("payload names no repository")
    repo = payload.repository.full_name
    _check_hmac(secrets("gitea", repo), body, signature)
    clone_url = payload.repository.clone_url
    if event == "delete" and payload.ref:
        prefix = "refs/tags/" if payload.ref_type == "tag" else "refs/heads/"
        ref = payload.ref if payload.ref.startswith("refs/") else prefix + payload.ref
        return Delivery("gitea", delivery, Push("gitea", repo, clone_url, ref, "", True))
    if event != "push":
        return Delivery("gitea", delivery, Ignored("gitea", repo, event))
    sha = _sha(payload.head_commit.id if payload.head_commit else None, payload.after)
    push = _push("gitea", repo, clone_url, ref=payload.ref, sha=sha, deleted=False)
    return Delivery("gitea", delivery, push)


PARSERS: Final[dict[Forge, Callable[[Mapping[str, str], bytes, SecretLookup], Delivery]]] = {
    "github": parse_github,
    "gitlab": parse_gitlab,
    "gitea": parse_gitea,
}
SIGNATURE_HEADERS: Final[dict[Forge, tuple[str, ...]]] = {
    "github": ("X-Hub-Signature-256",),
    "gitlab": ("X-Gitlab-Token",),
    "gitea": ("X-Gitea-Signature", "X-Forgejo-Signature"),
}

"""Webhooks of GitHub, GitLab and Gitea/Forgejo: authentication, then payload parsing. Pure.

    delivery = PARSERS[forge](headers, body, configured_secrets)

Invariants:
- Authentication comes before the JSON is parsed: the signature (GitLab: the token) is
  checked in constant time against every configured secret of the forge (each distinct
  secret once); none matches -> Unauthorized, whatever the body holds.
- Only then is the payload read, and the repository it names must be covered by a secret
  that verified it: a repository's own (exact) secret wins over an owner pattern, a GitHub
  App installation's secret covers the repositories of that installation.
- A delivery id is required: every current release of the three forges sends one.
- A signed event that names no repository (an installation, a sponsorship, a marketplace
  purchase...) is acknowledged and ignored, never refused: forges show a 4xx as a failed
  delivery.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Final, TypeVar

import msgspec

from producer.gateway.settings import Forge, WebhookSecret

ZERO_SHA: Final = frozenset({"0" * 40, "0" * 64})
MAX_DELIVERY_ID: Final = 200
DELIVERY_ID_PATTERN: Final = r"^[\x20-\x7e]{1,200}$"
REPOSITORY_PATTERN: Final = r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)+$"
_PRINTABLE: Final = re.compile(r"^[\x20-\x7e]+$")
_REPOSITORY: Final = re.compile(REPOSITORY_PATTERN)


class WebhookError(Exception):
    status: int = 400

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BadRequest(WebhookError):
    status = 400


class Unauthorized(WebhookError):
    status = 401


class Push(msgspec.Struct, frozen=True):
    """A ref update: the branch or tag `ref` of `repo` moved from `before` to `sha`."""

    forge: Forge
    repo: str
    ref: str
    sha: str
    deleted: bool = False
    before: str = ""
    """The commit the ref pointed at before ('' for a new ref, or when the forge omits it)."""

    @property
    def branch(self) -> str | None:
        return self.ref.removeprefix("refs/heads/") if self.ref.startswith("refs/heads/") else None

    @property
    def tag(self) -> str | None:
        return self.ref.removeprefix("refs/tags/") if self.ref.startswith("refs/tags/") else None

    @property
    def owner(self) -> str:
        return self.repo.rpartition("/")[0]


class Ping(msgspec.Struct, frozen=True):
    forge: Forge
    repo: str


class Ignored(msgspec.Struct, frozen=True):
    """A signed event that builds nothing (an issue comment, an installation...)."""

    forge: Forge
    repo: str
    """'' for an event that names no repository."""
    event: str


WebhookEvent = Push | Ping | Ignored


class Delivery(msgspec.Struct, frozen=True):
    forge: Forge
    delivery_id: str
    event: WebhookEvent


# --- payload shapes (only the fields read; everything else is skipped) -----------------------


class _Owner(msgspec.Struct):
    login: str = ""


class _Installation(msgspec.Struct):
    id: int | None = None


class _Commit(msgspec.Struct):
    id: str = ""


class _HubRepo(msgspec.Struct):
    full_name: str


class _GitHubPayload(msgspec.Struct):
    repository: _HubRepo | None = None
    organization: _Owner | None = None
    installation: _Installation | None = None
    ref: str | None = None
    before: str | None = ""
    after: str | None = ""
    deleted: bool = False
    head_commit: _Commit | None = None


class _GitLabProject(msgspec.Struct):
    path_with_namespace: str


class _GitLabPayload(msgspec.Struct):
    project: _GitLabProject | None = None
    ref: str | None = None
    before: str | None = ""
    after: str | None = ""
    checkout_sha: str | None = None


class _GiteaPayload(msgspec.Struct):
    repository: _HubRepo | None = None
    ref: str | None = None
    ref_type: str | None = None
    before: str | None = ""
    after: str | None = ""
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


# --- authentication ------------------------------------------------------------------------


def _ascii(value: str) -> bytes:
    return value.encode("utf-8", "replace")


def hmac_sha256_hex(secret: str, body: bytes) -> str:
    return hmac.digest(secret.encode(), body, "sha256").hex()  # one call into OpenSSL


def _verified(
    secrets: Sequence[WebhookSecret], forge: str, proof: Callable[[str], bool]
) -> list[WebhookSecret]:
    """The configured secrets of `forge` that `proof` accepts; every distinct secret is
    tried (no early exit), each once."""
    results: dict[str, bool] = {}
    for entry in secrets:
        if entry.serves(forge) and entry.secret not in results:
            results[entry.secret] = proof(entry.secret)
    return [e for e in secrets if e.serves(forge) and results.get(e.secret, False)]


def _by_signature(
    secrets: Sequence[WebhookSecret],
    forge: str,
    body: bytes,
    *,
    header: str,
    given: str,
    prefix: str = "",
) -> list[WebhookSecret]:
    signature = _ascii(given.strip())

    def proof(secret: str) -> bool:
        return hmac.compare_digest(_ascii(prefix + hmac_sha256_hex(secret, body)), signature)

    verified = _verified(secrets, forge, proof)
    if not verified:
        raise Unauthorized(f"invalid signature ({header})")
    return verified


def _by_token(secrets: Sequence[WebhookSecret], forge: str, given: str) -> list[WebhookSecret]:
    token = _ascii(given)
    verified = _verified(secrets, forge, lambda secret: hmac.compare_digest(_ascii(secret), token))
    if not verified:
        raise Unauthorized("invalid token (X-Gitlab-Token)")
    return verified


def _authorize(
    secrets: Sequence[WebhookSecret],
    verified: Sequence[WebhookSecret],
    forge: str,
    repo: str,
    installation: int | None = None,
) -> None:
    """The repository's own secret wins over patterns; one of the secrets that verified the
    body must be one that may sign this repository's events."""
    governing = [s for s in secrets if s.serves(forge) and s.covers(repo, installation)]
    exact = [s for s in governing if s.exact]
    if not any(s in verified for s in exact or governing):
        raise Unauthorized(f"invalid signature: not signed with {repo}'s secret")


def _required(headers: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = headers.get(name)
        if value is not None:
            return value
    return None


def _delivery_id(value: str | None, header: str) -> str:
    value = (value or "").strip()
    if not value:
        raise BadRequest(f"missing {header}: a delivery id is required")
    if len(value) > MAX_DELIVERY_ID:
        raise BadRequest(f"delivery id longer than {MAX_DELIVERY_ID} characters")
    if not _PRINTABLE.fullmatch(value):
        raise BadRequest("delivery id must be printable ASCII")
    return value


def _repository(name: str, field: str) -> str:
    if len(name) > 255 or not _REPOSITORY.fullmatch(name) or ".." in name.split("/"):
        raise BadRequest(f"{field}: expected a repository path like owner/name")
    return name


def _sha(*candidates: str | None) -> str:
    for candidate in candidates:
        if candidate:
            return candidate
    return ""


def _push(
    forge: Forge, repo: str, *, ref: str | None, sha: str, before: str | None, deleted: bool
) -> Push:
    if not ref:
        raise BadRequest("a push payload needs `ref`")
    if not ref.startswith("refs/"):
        ref = "refs/heads/" + ref
    deleted = deleted or sha in ZERO_SHA or not sha
    previous = "" if not before or before in ZERO_SHA else before.lower()
    return Push(forge, repo, ref, "" if deleted else sha.lower(), deleted, previous)


# --- forges --------------------------------------------------------------------------------


def parse_github(
    headers: Mapping[str, str], body: bytes, secrets: Sequence[WebhookSecret]
) -> Delivery:
    """`X-GitHub-Event` push (or ping), signed by `X-Hub-Signature-256: sha256=<hex>`."""
    signature = headers.get("X-Hub-Signature-256")
    if not signature:
        raise Unauthorized("missing X-Hub-Signature-256")
    event = headers.get("X-GitHub-Event")
    if not event:
        raise BadRequest("missing X-GitHub-Event")
    delivery = _delivery_id(headers.get("X-GitHub-Delivery"), "X-GitHub-Delivery")
    verified = _by_signature(
        secrets, "github", body, header="X-Hub-Signature-256", given=signature, prefix="sha256="
    )
    payload = _decode(_github_decoder, body)
    installation = payload.installation.id if payload.installation else None
    if payload.repository is None:
        owner = payload.organization.login if payload.organization else ""
        if event == "ping" and owner:  # an organization's webhook: "acme/*" fits
            return Delivery("github", delivery, Ping("github", owner + "/"))
        return Delivery("github", delivery, Ignored("github", "", event))
    repo = _repository(payload.repository.full_name, "repository.full_name")
    _authorize(secrets, verified, "github", repo, installation)
    if event == "ping":
        return Delivery("github", delivery, Ping("github", repo))
    if event != "push":
        return Delivery("github", delivery, Ignored("github", repo, event))
    sha = _sha(payload.head_commit.id if payload.head_commit else None, payload.after)
    push = _push(
        "github", repo, ref=payload.ref, sha=sha, before=payload.before, deleted=payload.deleted
    )
    return Delivery("github", delivery, push)


_GITLAB_PUSH_EVENTS: Final = {"Push Hook": "push", "Tag Push Hook": "tag_push"}


def parse_gitlab(
    headers: Mapping[str, str], body: bytes, secrets: Sequence[WebhookSecret]
) -> Delivery:
    """`X-Gitlab-Event` Push Hook / Tag Push Hook, authenticated by `X-Gitlab-Token`."""
    token = headers.get("X-Gitlab-Token")
    if not token:
        raise Unauthorized("missing X-Gitlab-Token")
    event = headers.get("X-Gitlab-Event")
    if not event:
        raise BadRequest("missing X-Gitlab-Event")
    delivery = _delivery_id(
        _required(headers, "X-Gitlab-Event-UUID", "X-Gitlab-Webhook-UUID"), "X-Gitlab-Event-UUID"
    )
    verified = _by_token(secrets, "gitlab", token)
    payload = _decode(_gitlab_decoder, body)
    if payload.project is None:
        return Delivery("gitlab", delivery, Ignored("gitlab", "", event))
    repo = _repository(payload.project.path_with_namespace, "project.path_with_namespace")
    _authorize(secrets, verified, "gitlab", repo)
    if event not in _GITLAB_PUSH_EVENTS:
        return Delivery("gitlab", delivery, Ignored("gitlab", repo, event))
    push = _push(
        "gitlab",
        repo,
        ref=payload.ref,
        sha=_sha(payload.checkout_sha, payload.after),
        before=payload.before,
        deleted=payload.checkout_sha is None and payload.after in ZERO_SHA,
    )
    return Delivery("gitlab", delivery, push)


def parse_gitea(
    headers: Mapping[str, str], body: bytes, secrets: Sequence[WebhookSecret]
) -> Delivery:
    """`X-Gitea-Event` (or Forgejo's) push, signed by `X-Gitea-Signature: <hex>`.

    Gitea reports a deleted branch or tag as a separate `delete` event.
    """
    signature = _required(headers, "X-Gitea-Signature", "X-Forgejo-Signature")
    if not signature:
        raise Unauthorized("missing X-Gitea-Signature")
    event = _required(headers, "X-Gitea-Event", "X-Forgejo-Event")
    if not event:
        raise BadRequest("missing X-Gitea-Event")
    delivery = _delivery_id(
        _required(headers, "X-Gitea-Delivery", "X-Forgejo-Delivery"), "X-Gitea-Delivery"
    )
    verified = _by_signature(secrets, "gitea", body, header="X-Gitea-Signature", given=signature)
    payload = _decode(_gitea_decoder, body)
    if payload.repository is None:
        return Delivery("gitea", delivery, Ignored("gitea", "", event))
    repo = _repository(payload.repository.full_name, "repository.full_name")
    _authorize(secrets, verified, "gitea", repo)
    if event == "delete" and payload.ref:
        prefix = "refs/tags/" if payload.ref_type == "tag" else "refs/heads/"
        ref = payload.ref if payload.ref.startswith("refs/") else prefix + payload.ref
        return Delivery("gitea", delivery, Push("gitea", repo, ref, "", True))
    if event != "push":
        return Delivery("gitea", delivery, Ignored("gitea", repo, event))
    sha = _sha(payload.head_commit.id if payload.head_commit else None, payload.after)
    push = _push("gitea", repo, ref=payload.ref, sha=sha, before=payload.before, deleted=False)
    return Delivery("gitea", delivery, push)


Parser = Callable[[Mapping[str, str], bytes, Sequence[WebhookSecret]], Delivery]
PARSERS: Final[dict[Forge, Parser]] = {
    "github": parse_github,
    "gitlab": parse_gitlab,
    "gitea": parse_gitea,
}

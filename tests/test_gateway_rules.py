"""The gateway's pure parts: settings validation, rules, webhook parsing and signatures."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict
from test_gateway_payloads import (
    ZERO,
    body_of,
    gitea_delete,
    gitea_push,
    github_headers,
    github_ping,
    github_push,
    gitlab_headers,
    gitlab_push,
    sha_for,
)

from producer.gateway.rules import Origin, build_request, plan, slug
from producer.gateway.settings import Rule, WebhookSecret, load_gateway_settings
from producer.gateway.webhooks import (
    BadRequest,
    Delivery,
    Ignored,
    Ping,
    Push,
    Unauthorized,
    parse_gitea,
    parse_github,
    parse_gitlab,
)
from producer.reference import is_reference


def rule(**fields: Any) -> Rule:
    return msgspec.convert({"repo": "*", "images": ["r/{repo}:{branch}"], **fields}, Rule)


def push(ref: str = "refs/heads/main", repo: str = "Acme/API", **kw: Any) -> Push:
    return Push("github", repo, ref, kw.pop("sha", "ab" * 20), **kw)


# --- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"images": ["r/{repo}:{tag}"]}, "placeholder {tag} cannot be filled"),
        ({"branches": [], "tags": ["v*"], "images": ["r:{branch}"]}, "{branch}"),
        ({"images": ["r:{nope}"]}, "{nope}"),
        ({"images": ["r:{branch!r}"]}, "plain names"),
        ({"images": ["Upper/{repo}"]}, "invalid image name"),
        ({"images": []}, "images"),
        ({"branches": [], "tags": []}, "at least one branch or tag"),
        ({"dockerfile": "/etc/Dockerfile"}, "dockerfile: expected a relative path"),
        ({"context": "../up"}, "context: expected a relative"),
        ({"priority": "urgent"}, "priority"),
        ({"imagez": ["x"]}, "imagez"),
        ({"secrets": ["npm,src=/etc/passwd"]}, "$.rules[0].secrets[0]"),
        ({"secrets": ["npm", "npm"]}, "secrets: expected each secret id once"),
        ({"secrets": [f"s{n}" for n in range(17)]}, "$.rules[0].secrets"),
    ],
)
def test_invalid_rules_are_refused_at_startup_naming_the_field(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match="gateway: ") as caught:
        load_gateway_settings({"rules": [{"repo": "*", "images": ["r:{branch}"], **fields}]})
    assert message in str(caught.value)
    assert "$.rules[0]" in str(caught.value)


def test_settings_accept_environment_strings_and_keep_secrets_out_of_repr() -> None:
    settings = load_gateway_settings(
        {
            "port": "9000",
            "max_queue_depth": "5",
            "tokens": [{"name": "ci", "sha256": "ab" * 32, "images": ["*"]}],
            "webhook_secrets": [{"repo": "a/*", "secret": "sec-456"}],
        }
    )
    assert (settings.port, settings.max_queue_depth) == (9000, 5)
    assert "sec-456" not in repr(settings)
    assert "sec-456" not in str(settings.webhook_secrets)
    assert settings.body_limit_bytes == 5 * 1024 * 1024


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"api_tokens": ["plain"]}, "api_tokens: plain tokens are no longer accepted"),
        ({"tokens": [{"name": "a", "sha256": "nothex", "images": ["*"]}]}, "$.tokens[0].sha256"),
        ({"tokens": [{"name": "a", "sha256": "ab" * 32}]}, "images"),
        ({"tokens": [{"name": "a", "sha256": "ab" * 32, "images": []}]}, "$.tokens[0].images"),
        (
            {"tokens": [{"name": "a", "sha256": "ab" * 32, "images": ["*"]}] * 2},
            "tokens: name 'a' appears more than once",
        ),
        ({"forges": {"github": {"clone_url": "file:///srv/{repo}"}}}, "clone_url: scheme"),
        ({"forges": {"github": {"clone_url": "https://h/x.git"}}}, "exactly one {repo}"),
        ({"sources": {"local_roots": ["relative/dir"]}}, "$.sources.local_roots[0]"),
        ({"sources": {"schemes": ["file"]}}, "$.sources.schemes[0]"),
        ({"max_queue_depth": 10, "max_queue_depth_interactive": 5}, "at least max_queue_depth"),
    ],
)
def test_invalid_policy_settings_are_refused_at_startup(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="gateway: ") as caught:
        load_gateway_settings(data)
    assert message in str(caught.value)


def test_tenants_of_webhook_builds_come_from_the_repository_owner() -> None:
    settings = load_gateway_settings(
        {"tenants": [{"name": "acme", "owners": ["acme", "acme-*"], "max_queued": 3}]}
    )
    assert settings.tenant_of_owner("Acme") == "acme"
    assert settings.tenant_of_owner("acme-labs") == "acme"
    assert settings.tenant_of_owner("Other") == "other"
    assert settings.tenant_cap("acme") == 3
    assert settings.tenant_cap("other") is None
    assert settings.git_hosts == {"github.com", "gitlab.com", "gitea.com"}


# --- rules ------------------------------------------------------------------------------------


def test_templates_render_every_placeholder() -> None:
    rules = [rule(images=["reg/{owner}/{name}:{branch}-{short_sha}", "reg/{repo}:{sha}"])]
    [build] = plan(rules, push("refs/heads/Feature/New_UI")).builds
    assert build.images == (
        "reg/acme/api:feature-new_ui-abababa",
        f"reg/acme/api:{'ab' * 20}",
    )


def test_branch_and_tag_patterns() -> None:
    rules = [
        rule(branches=["main", "release/*"]),
        rule(branches=[], tags=["v[0-9]*"], images=["r/{repo}:{tag}"]),
        rule(branches=["*"], tags=["*"], images=["r/{repo}:{ref_name}"]),
    ]
    assert [b.rule for b in plan(rules, push("refs/heads/main")).builds] == [0, 2]
    assert [b.rule for b in plan(rules, push("refs/heads/release/1.x")).builds] == [0, 2]
    assert [b.rule for b in plan(rules, push("refs/heads/dev")).builds] == [2]
    assert [b.rule for b in plan(rules, push("refs/tags/v2.0")).builds] == [1, 2]
    assert [b.rule for b in plan(rules, push("refs/tags/latest")).builds] == [2]
    assert plan(rules, push("refs/pull/1/head")).builds == ()


def test_repository_globs_are_case_insensitive() -> None:
    assert plan([rule(repo="ACME/*")], push(repo="acme/Api")).builds
    assert not plan([rule(repo="acme/*")], push(repo="other/api")).builds


def test_a_rules_secrets_reach_its_build_requests_as_ids() -> None:
    [build] = plan([rule(secrets=["npm", "pip.conf"])], push()).builds
    pushed = push()
    origin = Origin(
        Delivery("github", "d-1", pushed), "https://github.com/acme/api.git", "acme", None, 1e9
    )
    request = build_request(build, pushed, origin)
    assert request.secrets == ("npm", "pip.conf")
    assert request.submitted_at == 1e9  # when the push arrived


def test_a_deleted_ref_builds_nothing_whatever_the_rules() -> None:
    result = plan([rule()], push(deleted=True, sha=""))
    assert result.builds == ()
    assert "deleted" in result.message


def test_no_matching_rule_says_so() -> None:
    result = plan([rule(repo="elsewhere/*")], push())
    assert result.builds == ()
    assert "no rule matches" in result.message


def test_supersede_key_names_repo_ref_and_image_but_not_the_commit() -> None:
    rules = [rule(), rule(dockerfile="other.Dockerfile"), rule(supersede=False)]
    a = plan(rules, push(sha="1" * 40)).builds
    b = plan(rules, push(sha="2" * 40)).builds
    c = plan(rules, push("refs/heads/dev", sha="1" * 40)).builds
    assert a[0].supersede_key == b[0].supersede_key != c[0].supersede_key
    assert a[0].supersede_key != a[1].supersede_key
    assert a[2].supersede_key is None


@given(
    ref_name=st.text(min_size=1, max_size=300),
    tag=st.booleans(),
    sha=st.text("0123456789abcdef", min_size=0, max_size=64),
)
def test_whatever_the_ref_every_planned_image_is_a_valid_name(
    ref_name: str, tag: bool, sha: str
) -> None:
    rules = [
        rule(branches=["*"], tags=["*"], images=["reg/{repo}:{ref_name}", "reg/{repo}:x{sha}"]),
        rule(branches=["*"], images=["reg/{name}:{branch}-{short_sha}"]),
        rule(branches=[], tags=["*"], images=["reg/{name}:{tag}"]),
    ]
    ref = ("refs/tags/" if tag else "refs/heads/") + ref_name
    for build in plan(rules, push(ref, sha=sha)).builds:
        for image in build.images:
            assert is_reference(image)
            assert len(image.rpartition(":")[2]) <= 129


def test_slug() -> None:
    assert slug("Feature/ABC def") == "feature-abc-def"
    assert slug("..hidden") == "hidden"
    assert slug("日本") == "-" or slug("日本") == "_"
    assert len(slug("x" * 500)) == 128


# --- webhook parsing --------------------------------------------------------------------------

lookup = (
    WebhookSecret(repo="acme/api", secret="s1"),
    WebhookSecret(repo="acme/*", secret="org"),
    WebhookSecret(repo="group/sub/api", secret="gl", forge="gitlab"),
    WebhookSecret(repo="gitea/webhooks", secret="gt", forge="gitea"),
    WebhookSecret(installation=42, secret="app", forge="github"),
)


def headers(values: dict[str, str]) -> CIMultiDict[str]:
    return CIMultiDict({k.lower(): v for k, v in values.items()})


def test_github_push_ping_and_other_events() -> None:
    payload = github_push("acme/api", "refs/tags/v1", commits=2)
    body = body_of(payload)
    delivery = parse_github(headers(github_headers(body, "s1", delivery="d1")), body, lookup)
    assert delivery.delivery_id == "d1"
    assert delivery.event == Push(
        "github", "acme/api", "refs/tags/v1", payload["after"], before=payload["before"]
    )
    ping = body_of(github_ping("acme/api"))
    assert isinstance(parse_github(headers(github_headers(ping, "s1", "ping")), ping, lookup).event,
                      Ping)  # fmt: skip
    org_ping = body_of({"zen": "z", "hook_id": 1, "organization": {"login": "acme"}})
    event = parse_github(headers(github_headers(org_ping, "org", "ping")), org_ping, lookup).event
    assert event == Ping("github", "acme/")
    other = parse_github(headers(github_headers(body, "s1", "issues")), body, lookup).event
    assert other == Ignored("github", "acme/api", "issues")


def test_github_signature_is_checked_over_the_exact_bytes() -> None:
    body = body_of(github_push("acme/api"))
    good = github_headers(body, "s1")
    with pytest.raises(Unauthorized):
        parse_github(headers(good), body + b" ", lookup)
    upper = {**good, "X-Hub-Signature-256": good["X-Hub-Signature-256"].upper()}
    with pytest.raises(Unauthorized):
        parse_github(headers(upper), body, lookup)
    no_prefix = {**good, "X-Hub-Signature-256": good["X-Hub-Signature-256"][7:]}
    with pytest.raises(Unauthorized):
        parse_github(headers(no_prefix), body, lookup)
    weird = {**good, "X-Hub-Signature-256": "sha256=ü\udcff"}
    with pytest.raises(Unauthorized):
        parse_github(headers(weird), body, lookup)


def test_github_deletion() -> None:
    body = body_of(github_push("acme/api", deleted=True))
    event = parse_github(headers(github_headers(body, "s1")), body, lookup).event
    assert isinstance(event, Push)
    assert (event.deleted, event.sha) == (True, "")


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"", "malformed JSON"),
        (b"[1, 2]", "Expected `object`"),
        (b'{"repository": {"name": "x"}}', "full_name"),
        (b'{"repository": {"full_name": "../x"}}', "repository.full_name"),
        (b"\xff\xfe", "malformed JSON"),
    ],
)
def test_github_bad_payloads(body: bytes, error: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_github(headers(github_headers(body, "s1")), body, lookup)
    assert error in caught.value.reason


def test_missing_headers() -> None:
    body = body_of(github_push("acme/api"))
    with pytest.raises(Unauthorized, match="missing"):
        parse_github(headers(github_headers(body, None)), body, lookup)
    no_event = github_headers(body, "s1")
    del no_event["X-GitHub-Event"]
    with pytest.raises(BadRequest, match="X-GitHub-Event"):
        parse_github(headers(no_event), body, lookup)
    long_id = github_headers(body, "s1", delivery="x" * 300)
    with pytest.raises(BadRequest, match="delivery id"):
        parse_github(headers(long_id), body, lookup)
    no_id = github_headers(body, "s1")
    del no_id["X-GitHub-Delivery"]
    with pytest.raises(BadRequest, match="missing X-GitHub-Delivery: a delivery id is required"):
        parse_github(headers(no_id), body, lookup)


def test_the_signature_is_checked_before_the_body_is_parsed() -> None:
    for body in (b"{not json", b'{"repository": 7}', b"[" * 100_000):
        with pytest.raises(Unauthorized):
            parse_github(headers(github_headers(body, "not-a-configured-secret")), body, lookup)


def test_a_github_app_installation_secret_covers_that_installations_repositories() -> None:
    payload = {**github_push("stranger/repo"), "installation": {"id": 42}}
    body = body_of(payload)
    event = parse_github(headers(github_headers(body, "app")), body, lookup).event
    assert isinstance(event, Push)
    assert event.repo == "stranger/repo"
    other = body_of({**payload, "installation": {"id": 43}})
    with pytest.raises(Unauthorized):
        parse_github(headers(github_headers(other, "app")), other, lookup)
    # An installation secret does not sign for a repository that has its own.
    own = body_of({**github_push("acme/api"), "installation": {"id": 42}})
    with pytest.raises(Unauthorized):
        parse_github(headers(github_headers(own, "app")), own, lookup)


def test_gitlab_push_tag_push_and_deletion() -> None:
    payload = gitlab_push("group/sub/api", "refs/heads/main")
    event = parse_gitlab(headers(gitlab_headers("gl", delivery="u1")), body_of(payload), lookup)
    assert event.delivery_id == "u1"
    assert event.event == Push(
        "gitlab",
        "group/sub/api",
        "refs/heads/main",
        payload["checkout_sha"],
        before=payload["before"],
    )
    tag = gitlab_push("group/sub/api", "refs/tags/v1", tag=True)
    tag_event = parse_gitlab(headers(gitlab_headers("gl", "Tag Push Hook")), body_of(tag), lookup)
    assert isinstance(tag_event.event, Push)
    assert tag_event.event.tag == "v1"
    gone = body_of(gitlab_push("group/sub/api", deleted=True))
    gone_event = parse_gitlab(headers(gitlab_headers("gl")), gone, lookup).event
    assert isinstance(gone_event, Push)
    assert gone_event.deleted
    with pytest.raises(Unauthorized):
        parse_gitlab(headers(gitlab_headers("gl-wrong")), body_of(payload), lookup)
    issue = parse_gitlab(headers(gitlab_headers("gl", "Issue Hook")), body_of(payload), lookup)
    assert isinstance(issue.event, Ignored)


def gitea_signed(body: bytes, secret: str, event: str = "push") -> CIMultiDict[str]:
    signature = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return headers(
        {"X-Gitea-Event": event, "X-Gitea-Signature": signature, "X-Gitea-Delivery": "g-1"}
    )


def test_gitea_push_and_delete() -> None:
    payload = gitea_push("gitea/webhooks", "refs/heads/main")
    body = body_of(payload)
    event = parse_gitea(gitea_signed(body, "gt"), body, lookup).event
    assert event == Push(
        "gitea", "gitea/webhooks", "refs/heads/main", payload["after"], before=payload["before"]
    )
    for kind, ref in (("branch", "refs/heads/feature"), ("tag", "refs/tags/feature")):
        deleted = body_of(gitea_delete("gitea/webhooks", "feature", kind))
        gone = parse_gitea(gitea_signed(deleted, "gt", "delete"), deleted, lookup).event
        assert gone == Push("gitea", "gitea/webhooks", ref, "", True)
    with pytest.raises(Unauthorized):
        parse_gitea(gitea_signed(body, "nope"), body, lookup)


def test_a_push_with_a_zero_sha_is_a_deletion_on_every_forge() -> None:
    payload = gitea_push("gitea/webhooks", after=ZERO)
    payload["head_commit"] = None
    body = json.dumps(payload).encode()
    event = parse_gitea(gitea_signed(body, "gt"), body, lookup).event
    assert isinstance(event, Push)
    assert event.deleted
    assert sha_for("x") != ZERO

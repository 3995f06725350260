"""The pure policy checks and the one reference grammar (no services)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from producer.contract import BuildRequest, ContractError, request_from_builtins
from producer.policy import PolicyError, RequestPolicy, check_request, parse_git_url
from producer.reference import REFERENCE_PATTERN, Reference, ReferenceError, parse

GATEWAY_LIKE = RequestPolicy(
    hosts=frozenset({"github.com", "git.internal:9418"}),
    images=("registry.local:5000/alpha/*",),
    sources=("https://github.com/alpha/*", "git://git.internal:9418/*"),
    priorities=frozenset({"interactive"}),
    max_timeout_s=3600,
    tenant="alpha",
)


def request(**fields: Any) -> BuildRequest:
    base: dict[str, Any] = {
        "source": {"type": "git", "url": "https://github.com/alpha/app.git", "ref": "main"},
        "images": ["registry.local:5000/alpha/app:1"],
    }
    return request_from_builtins({**base, **fields})


def refusal(policy: RequestPolicy = GATEWAY_LIKE, **fields: Any) -> PolicyError:
    with pytest.raises(PolicyError) as caught:
        check_request(request(**fields), policy)
    return caught.value


# --- references ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("registry.local:5000/acme/api:main", ("registry.local:5000", "acme/api", "main", None)),
        ("busybox", ("docker.io", "library/busybox", None, None)),
        ("r/x:1", ("docker.io", "r/x", "1", None)),
        ("localhost/a/b", ("localhost", "a/b", None, None)),
        ("[::1]:5000/a:t", ("[::1]:5000", "a", "t", None)),
        ("a/b@sha256:" + "c" * 64, ("docker.io", "a/b", None, "sha256:" + "c" * 64)),
        ("reg.io/a__b/c-d.e:V1.0_x", ("reg.io", "a__b/c-d.e", "V1.0_x", None)),
    ],
)
def test_references_parse_into_their_parts(text: str, parts: tuple[str, ...]) -> None:
    assert parse(text) == Reference(*parts)
    assert re.search(REFERENCE_PATTERN, text)


@pytest.mark.parametrize(
    "text",
    [
        "c,type=local,dest=/tmp/x",
        "type=s3,bucket=b",
        "reg/app:tag,push=true",
        "UPPER/case",
        "a//b",
        "a:b:c",
        "-a/b",
        "a/b:",
        "a/b@sha256:short",
        "reg/app:" + "t" * 129,
        "a/b\n",
        "a /b",
        "a/b;rm",
        "é/b",
    ],
)
def test_anything_else_is_not_a_reference_for_the_parser_nor_the_contract(text: str) -> None:
    with pytest.raises(ReferenceError):
        parse(text)
    with pytest.raises(ContractError, match=r"\$\.images\[0\]|\$\.cache"):
        request_from_builtins(
            {"source": {"type": "local", "path": "/x"}, "images": [text], "push": True}
        )
    with pytest.raises(ContractError, match=r"\$\.cache\.export_ref"):
        request_from_builtins(
            {
                "source": {"type": "local", "path": "/x"},
                "push": False,
                "cache": {"export_ref": text},
            }
        )


def test_a_name_longer_than_the_distribution_spec_allows_is_refused() -> None:
    with pytest.raises(ReferenceError, match="at most 255"):
        parse("x" * 256)
    with pytest.raises(ReferenceError, match="at most 512"):
        parse("x/" * 300)


@given(st.text(max_size=80))
def test_the_grammar_never_lets_an_option_character_through(text: str) -> None:
    if re.search(REFERENCE_PATTERN, text):
        assert not set(text) & set(",= \t\n\"'\\;&|$`")
        parse(text)  # the parser and the contract's pattern agree


# --- git URLs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("file:///etc", "scheme 'file'"),
        ("ext::sh%20-c%20id", "scheme 'ext'"),
        ("--upload-pack=touch /tmp/x", "without spaces"),
        ("https://user:pw@github.com/a/b.git", "credentials"),
        ("https://github.com/a/b.git#main:/etc", "'#'"),
        ("https://github.com/a/b.git?x=1", "query"),
        ("https://github.com", "repository path"),
        ("https://github.com:notaport/a.git", "Port"),
        ("/srv/repo.git", "like https://host"),
    ],
)
def test_what_is_not_a_git_url(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        parse_git_url(url)


def test_scp_like_urls_are_ssh() -> None:
    url = parse_git_url("git@github.com:acme/api.git")
    assert (url.scheme, url.host, url.path) == ("ssh", "github.com", "acme/api.git")


# --- requests ------------------------------------------------------------------------------


def test_a_request_within_the_policy_passes() -> None:
    check_request(request(), GATEWAY_LIKE)
    check_request(
        request(
            source={"type": "git", "url": "git://git.internal:9418/alpha/x"},
            cache={"import_refs": ["registry.local:5000/alpha/cache"]},
            timeout_s=3600,
            tenant="alpha",
            platforms=["linux/amd64", "linux/arm/v7"],
            target="final-stage",
        ),
        GATEWAY_LIKE,
    )


@pytest.mark.parametrize(
    ("fields", "field", "why"),
    [
        ({"source": {"type": "local", "path": "/etc"}}, "$.source", "local sources"),
        ({"source": {"type": "git", "url": "file:///etc"}}, "$.source.url", "scheme"),
        (
            {"source": {"type": "git", "url": "https://github.com/alpha/app"}},
            "$.source.url",
            "plain HTTP context",
        ),
        (
            {"source": {"type": "git", "url": "https://evil.example/alpha/app.git"}},
            "$.source.url",
            "not an allowed git host",
        ),
        (
            {"source": {"type": "git", "url": "git://git.internal:9419/alpha/x"}},
            "$.source.url",
            "not an allowed git host",
        ),
        (
            {"source": {"type": "git", "url": "http://github.com/alpha/app.git"}},
            "$.source.url",
            "scheme 'http' not allowed",
        ),
        (
            {"source": {"type": "git", "url": "https://github.com/beta/app.git"}},
            "$.source",
            "not among the sources",
        ),
        ({"images": ["ghcr.io/alpha/app:1"]}, "$.images[0]", "not among the images"),
        ({"images": ["registry.local:5000/beta/app"]}, "$.images[0]", "not among"),
        (
            {"cache": {"export_ref": "docker.io/someone/cache"}},
            "$.cache.export_ref",
            "not among the images",
        ),
        (
            {"cache": {"import_refs": ["registry.local:5000/alpha/ok", "evil.io/x"]}},
            "$.cache.import_refs[1]",
            "not among",
        ),
        ({"priority": "batch"}, "$.priority", "not allowed"),
        ({"tenant": "beta"}, "$.tenant", "not yours"),
        ({"timeout_s": 3601}, "$.timeout_s", "at most 3600 seconds"),
        ({"trace": {"traceparent": "garbage"}}, "$.trace.traceparent", "W3C"),
        ({"trace": {"tracestate": "k=" + "v" * 600}}, "$.trace.tracestate", "at most 512"),
        ({"platforms": ["linux/amd64,type=local"]}, "$.platforms[0]", "platform"),
        ({"target": "a b=c"}, "$.target", "stage name"),
        ({"dockerfile": "Dockerfile#x"}, "$.dockerfile", "'#'"),
        ({"supersede_key": "k\n"}, "$.supersede_key", "printable"),
        ({"labels": {"a": "b\x00"}}, "$.labels.a", "printable"),
        ({"build_args": {"A": "x\x00y"}}, "$.build_args.A", "NUL"),
        ({"id": "abc\n"}, "$.id", "expected an id"),
    ],
)
def test_a_request_outside_the_policy_is_refused_naming_the_field(
    fields: dict[str, Any], field: str, why: str
) -> None:
    error = refusal(**fields)
    assert error.field == field
    assert why in str(error)
    assert str(error).endswith(f"- at `{field}`")


def test_local_sources_only_under_the_configured_roots() -> None:
    policy = RequestPolicy(local_roots=("/srv/builds",), images=("*",))
    check_request(request(source={"type": "local", "path": "/srv/builds/app"}), policy)
    for path, why in (
        ("/srv/builds-evil/app", "outside"),
        ("/srv/builds/../../etc", "normalized"),
        ("/srv//builds/app", "normalized"),
        ("/etc", "outside"),
    ):
        error = refusal(policy, source={"type": "local", "path": path})
        assert (error.field, why in error.reason) == ("$.source.path", True), path


def test_trusted_producers_build_local_directories_and_any_host_within_the_grammar() -> None:
    trusted = RequestPolicy.trusted(max_timeout_s=60)
    check_request(request(source={"type": "local", "path": "/home/me/app"}), trusted)
    check_request(request(source={"type": "git", "url": "git://127.0.0.1:9/x.git"}), trusted)
    assert refusal(trusted, timeout_s=61).field == "$.timeout_s"
    assert refusal(trusted, source={"type": "git", "url": "file:///x"}).field == "$.source.url"


def test_policy_errors_are_value_errors_like_the_contracts() -> None:
    assert issubclass(PolicyError, ValueError)
    assert issubclass(ContractError, ValueError)


# --- build secrets -------------------------------------------------------------------------


def test_a_token_mounts_only_the_secrets_its_patterns_allow() -> None:
    policy = dataclasses.replace(GATEWAY_LIKE, secrets=("npm", "pip-*"))
    check_request(request(secrets=["npm", "pip-internal"]), policy)
    assert refusal(policy, secrets=["npm", "aws"]).field == "$.secrets[1]"
    assert refusal(policy, secrets=["NPM"]).field == "$.secrets[0]"  # ids are case-sensitive
    assert refusal(GATEWAY_LIKE, secrets=["npm"]).field == "$.secrets[0]"  # none by default
    check_request(request(secrets=["anything"]), RequestPolicy.trusted())


def test_secret_ids_keep_their_grammar_even_when_built_in_python() -> None:
    # msgspec validates decoded requests; one constructed in Python is checked by the policy
    built = msgspec.structs.replace(request(), secrets=("npm,src=/etc/passwd",))
    with pytest.raises(PolicyError) as caught:
        check_request(built, RequestPolicy.trusted())
    assert caught.value.field == "$.secrets[0]"
    for secrets in (("npm", "npm"), tuple(f"s{n}" for n in range(17))):
        with pytest.raises(ValueError, match=r"\$\.secrets"):
            msgspec.structs.replace(request(), secrets=secrets)


@pytest.mark.parametrize(
    ("secrets", "why"),
    [
        (["a,src=/x"], "$.secrets[0]"),
        (["-flag"], "$.secrets[0]"),
        (["x" * 65], "$.secrets[0]"),
        ([f"s{n}" for n in range(17)], "$.secrets"),
        (["npm", "npm"], "$.secrets"),
    ],
)
def test_the_contract_refuses_malformed_secret_ids(secrets: list[str], why: str) -> None:
    with pytest.raises(ContractError) as caught:
        request(secrets=secrets)
    assert why in str(caught.value)

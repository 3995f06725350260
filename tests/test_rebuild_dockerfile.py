"""Which images a Dockerfile builds FROM, as BuildKit reads it (pure: no services)."""

from __future__ import annotations

import re

import pytest

from buildfleet.rebuild.dockerfile import (
    DockerfileError,
    base_uses,
    expand,
    needed,
    stages,
    uses_of,
)
from buildfleet.rebuild.reference import ReferenceError, parse_reference

BASE = "registry.local:5000/base/busybox"


def pulled(text: str, target: str | None = None, **build_args: str) -> list[str]:
    """What each needed FROM pulls, as `line:reference`."""
    return [f"{u.stage.line}:{u.ref}" for u in base_uses(text, build_args, target)]


def matching(base: str, text: str, target: str | None = None, **build_args: str) -> list[int]:
    return [
        u.stage.line for u in uses_of(parse_reference(base), base_uses(text, build_args, target))
    ]


def test_global_args_and_build_args_are_substituted_into_from() -> None:
    text = (
        "ARG REGISTRY=registry.local:5000\n"
        "ARG BASE=${REGISTRY}/base/busybox:1.36\n"
        "FROM ${BASE}\n"
        "RUN true\n"
    )
    assert pulled(text) == [f"3:{BASE}:1.36"]
    assert pulled(text, BASE="debian:12") == ["3:docker.io/library/debian:12"]
    assert pulled(text, REGISTRY="mirror.local") == ["3:mirror.local/base/busybox:1.36"]


def test_only_args_declared_before_the_first_from_reach_it() -> None:
    text = "FROM alpine AS first\nARG LATE=debian\nFROM ${LATE:-busybox}\n"
    # LATE is declared in a stage, not globally: the second FROM sees it unset.
    assert pulled(text) == ["3:docker.io/library/busybox"]
    # A build arg for an ARG never declared globally does not reach FROM either.
    assert pulled("FROM ${UNDECLARED:-alpine}\n", UNDECLARED="debian") == [
        "1:docker.io/library/alpine"
    ]


@pytest.mark.parametrize(
    ("word", "env", "expected"),
    [
        ("${X:-fallback}", {}, "fallback"),
        ("${X:-fallback}", {"X": ""}, "fallback"),
        ("${X-fallback}", {"X": ""}, ""),
        ("${X:+alt}", {"X": "1"}, "alt"),
        ("${X:+alt}", {}, ""),
        ("${X+alt}", {"X": ""}, "alt"),
        ("${V#v}", {"V": "v1.2"}, "1.2"),
        ("${V%.*}", {"V": "1.2.3"}, "1.2"),
        ("${V%%.*}", {"V": "1.2.3"}, "1"),
        ("${V##*/}", {"V": "a/b/c"}, "c"),
        ("$X/y", {"X": "reg"}, "reg/y"),
        ("${A:-${B}}", {"B": "nested"}, "nested"),
        ("'$X'", {"X": "no"}, "$X"),
        ('"$X"', {"X": "yes"}, "yes"),
        (r"\$X", {"X": "no"}, "$X"),
    ],
)
def test_substitution_forms(word: str, env: dict[str, str], expected: str) -> None:
    assert expand(word, env) == expected


def test_multi_stage_follows_from_stage_and_copy_from_but_not_unused_stages() -> None:
    text = (
        f"FROM {BASE}:1 AS build\n"
        "RUN make\n"
        "FROM golang:1.22 AS tools\n"
        "FROM alpine:3.19 AS unused\n"
        "FROM build AS final\n"
        "COPY --from=tools /go/bin/x /x\n"
    )
    assert pulled(text) == [f"1:{BASE}:1", "3:docker.io/library/golang:1.22"]
    assert matching("alpine", text) == []  # only an unused stage pulls it
    assert matching("alpine", text, target="unused") == [4]
    assert matching(BASE, text) == [1]  # final <- build <- BASE


def test_run_mount_from_and_numeric_stage_references_count_as_needed() -> None:
    text = (
        "FROM alpine AS a\n"
        "FROM debian AS b\n"
        "FROM busybox\n"
        "RUN --mount=type=bind,from=a,target=/a true\n"
        "COPY --from=1 /x /x\n"
    )
    assert [s.name for s in needed(stages(text))] == ["a", "b", None]


def test_stage_names_are_case_insensitive_and_shadow_images() -> None:
    text = "FROM debian AS Debian\nFROM DEBIAN\n"
    [first, second] = stages(text)
    assert second.parent == first.index
    assert pulled(text) == ["1:docker.io/library/debian"]


def test_continuations_comments_heredocs_and_the_escape_directive() -> None:
    text = (
        "# escape=`\n"
        "FROM `\n"
        "  # a comment inside the instruction\n"
        "  alpine:3.19 `\n"
        "  AS base\n"
        "RUN <<EOF\n"
        "FROM evil.example/not-an-instruction\n"
        "EOF\n"
        "COPY <<-CONF /etc/x\n"
        "\tFROM also-not\n"
        "\tCONF\n"
    )
    assert pulled(text) == ["2:docker.io/library/alpine:3.19"]


def test_scratch_is_no_base_and_a_digest_base_matches_only_that_digest() -> None:
    digest = "sha256:" + "a" * 64
    text = f"FROM scratch AS empty\nFROM {BASE}@{digest}\nCOPY --from=empty / /\n"
    assert pulled(text) == [f"2:{BASE}@{digest}"]
    assert matching(f"{BASE}@{digest}", text) == [2]
    assert matching(f"{BASE}@sha256:{'b' * 64}", text) == []
    assert matching(BASE, text) == [2]


@pytest.mark.parametrize(
    ("base", "reference", "match"),
    [
        ("busybox", "docker.io/library/busybox:1.36", True),
        ("library/busybox", "busybox", True),
        ("index.docker.io/library/busybox", "busybox:latest", True),
        ("busybox:latest", "busybox", True),  # no tag means latest
        ("busybox:1.36", "busybox", False),
        ("busybox:1.36", "busybox:1.36@sha256:" + "c" * 64, True),
        ("busybox", "example.com/busybox", False),
        ("REGISTRY.local:5000/x", "registry.local:5000/x:2", True),
        ("localhost/x", "localhost/x", True),
        ("localhost/x", "docker.io/localhost/x", False),
    ],
)
def test_base_references_match_by_repository_tag_or_digest(
    base: str, reference: str, match: bool
) -> None:
    assert parse_reference(base).matches(parse_reference(reference)) is match


@pytest.mark.parametrize(
    "reference",
    ["", "UPPER/case", "a//b", "registry:5000/x:bad tag", "x@sha256:short", "-x", "a" * 600],
)
def test_bad_references_are_refused_with_the_reason(reference: str) -> None:
    with pytest.raises(ReferenceError):
        parse_reference(reference)


def test_a_from_that_cannot_be_worked_out_is_reported_not_guessed() -> None:
    [use] = base_uses("ARG V\nFROM debian:${V/x/y}\n")
    assert use.ref is None
    assert use.problem is not None and "unsupported substitution" in use.problem
    [empty] = base_uses("FROM ${NOTHING}\n")
    assert empty.ref is None and empty.problem is not None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("RUN true\n", "line 1: no FROM"),
        ("FROM\n", "line 1: FROM '': expected [--platform=P] IMAGE [AS NAME]"),
        ("RUN true\nFROM a AS\n", "line 2: FROM 'a AS': expected"),
        ("FROM a XS b\n", "line 1: FROM 'a XS b': expected"),
        ("# escape=x\nFROM a\n", "line 1: escape must be \\ or `"),
        ("ARG 1BAD=x\nFROM a\n", "line 1: ARG '1BAD=x': bad name"),
    ],
)
def test_a_dockerfile_buildkit_would_refuse_is_an_error_naming_the_line(
    text: str, message: str
) -> None:
    with pytest.raises(DockerfileError, match=re.escape(message)):
        base_uses(text)


def test_an_unknown_target_names_the_stages_there_are() -> None:
    with pytest.raises(DockerfileError, match=r"target 'nope' is not a stage \(build, final\)"):
        base_uses("FROM a AS build\nFROM build AS final\n", target="nope")


def test_here_strings_and_double_angles_inside_words_open_no_heredoc() -> None:
    text = (
        "FROM alpine AS a\n"
        'RUN cat <<<"here" && echo a<<b\n'
        "FROM debian AS b\n"
        "RUN 3<<EOF cat\n"
        "FROM not-a-stage\n"
        "EOF\n"
        "FROM busybox\n"
        "COPY --from=a /x /x\n"
    )
    assert [s.name for s in stages(text)] == ["a", "b", None]

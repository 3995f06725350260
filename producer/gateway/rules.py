"""Which images a push builds, as build requests: the configured rules applied to a ref
update. Pure.

Every rule whose repository glob matches and whose branch (or tag) patterns match the
pushed ref yields one build, pushing every image its templates render to. A deleted ref
builds nothing. The supersede key names the repository, the ref and the image (the rule's
dockerfile, context and target), so a newer push replaces only its own older build.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from typing import Any, Final

import msgspec

from producer import policy, reference
from producer.contract import BuildRequest, ContractError, TraceContext, request_from_builtins
from producer.fields import Priority
from producer.gateway.settings import Rule
from producer.gateway.webhooks import Delivery, Push

_NOT_TAG_CHAR: Final = re.compile(r"[^a-z0-9_.-]+")
_TRACEPARENT: Final = re.compile(policy.TRACEPARENT_PATTERN)
_TRACESTATE: Final = re.compile(rf"^[\x20-\x7e]{{0,{policy.TRACESTATE_MAX}}}$")
SHORT_SHA: Final = 7


def slug(name: str) -> str:
    """A branch or tag name as an image tag: lower case, [a-z0-9_.-], at most 128 long."""
    cleaned = _NOT_TAG_CHAR.sub("-", name.lower()).lstrip(".-")
    return cleaned[:128] or "_"


class PlannedBuild(msgspec.Struct, frozen=True):
    rule: int
    """Index of the rule in the configuration."""
    images: tuple[str, ...]
    dockerfile: str
    context: str
    build_args: dict[str, str]
    secrets: tuple[str, ...]
    target: str | None
    platforms: tuple[str, ...]
    priority: Priority
    push: bool
    supersede_key: str | None
    cancel_running: bool | None


class Skipped(msgspec.Struct, frozen=True):
    rule: int
    reason: str


class Plan(msgspec.Struct, frozen=True):
    builds: tuple[PlannedBuild, ...]
    skipped: tuple[Skipped, ...] = ()
    message: str = ""


def template_values(push: Push) -> dict[str, str]:
    repo = push.repo.lower().strip("/")
    owner, _, name = repo.rpartition("/")
    branch, tag = push.branch, push.tag
    ref_name = branch if branch is not None else tag or push.ref
    values = {
        "repo": repo,
        "owner": owner,
        "name": name,
        "ref_name": slug(ref_name),
        "sha": push.sha,
        "short_sha": push.sha[:SHORT_SHA],
    }
    if branch is not None:
        values["branch"] = slug(branch)
    if tag is not None:
        values["tag"] = slug(tag)
    return values


def rule_matches(rule: Rule, push: Push) -> bool:
    if not fnmatch.fnmatchcase(push.repo.lower(), rule.repo.lower()):
        return False
    if (branch := push.branch) is not None:
        return any(fnmatch.fnmatchcase(branch, p) for p in rule.branches)
    if (tag := push.tag) is not None:
        return any(fnmatch.fnmatchcase(tag, p) for p in rule.tags)
    return False


def supersede_key(push: Push, rule: Rule) -> str:
    return "|".join(
        (push.forge, push.repo.lower(), push.ref, rule.context, rule.dockerfile, rule.target or "")
    )


def plan(rules: Sequence[Rule], push: Push) -> Plan:
    """The builds `push` makes under `rules`, and why any matching rule made none."""
    if push.deleted:
        return Plan((), message=f"{push.ref} was deleted: nothing to build")
    if push.branch is None and push.tag is None:
        return Plan((), message=f"{push.ref} is neither a branch nor a tag: nothing to build")
    values = template_values(push)
    builds: list[PlannedBuild] = []
    skipped: list[Skipped] = []
    for index, rule in enumerate(rules):
        if not rule_matches(rule, push):
            continue
        try:
            images = tuple(dict.fromkeys(t.format(**values) for t in rule.images))
        except KeyError as exc:  # a {tag} template on a branch push: the rule allows both
            skipped.append(Skipped(index, f"placeholder {exc} is not defined for {push.ref}"))
            continue
        bad = [image for image in images if not reference.is_reference(image)]
        if bad:
            skipped.append(Skipped(index, f"invalid image name {bad[0]!r}"))
            continue
        builds.append(
            PlannedBuild(
                rule=index,
                images=images,
                dockerfile=rule.dockerfile,
                context=rule.context,
                build_args=dict(rule.build_args),
                secrets=rule.secrets,
                target=rule.target,
                platforms=rule.platforms,
                priority=rule.priority,
                push=rule.push,
                supersede_key=supersede_key(push, rule) if rule.supersede else None,
                cancel_running=rule.cancel_running,
            )
        )
    if builds:
        message = f"{len(builds)} build(s) for {push.repo} {push.ref}"
    elif skipped:
        message = f"every rule matching {push.repo} {push.ref} was skipped"
    else:
        message = f"no rule matches {push.repo} {push.ref}: nothing to build"
    return Plan(tuple(builds), tuple(skipped), message)


# --- requests ------------------------------------------------------------------------------


def trace_context(traceparent: str, tracestate: str) -> TraceContext | None:
    """The caller's W3C trace context from its headers, when it is well formed (else the
    build starts a trace of its own)."""
    traceparent = traceparent.strip()
    if not _TRACEPARENT.fullmatch(traceparent):
        return None
    tracestate = tracestate.strip()
    if not _TRACESTATE.fullmatch(tracestate):
        tracestate = ""
    return TraceContext(traceparent=traceparent, tracestate=tracestate or None)


class Origin(msgspec.Struct, frozen=True):
    """Where a push's builds come from and whose they are."""

    delivery: Delivery
    clone_url: str
    """From the forge's configured clone URL, never from the payload."""
    tenant: str
    trace: TraceContext | None
    received_at: float
    """When the gateway received the push (time.time()): its builds' `submitted_at`."""


def requests_for(
    plan: Plan, push: Push, origin: Origin
) -> tuple[list[BuildRequest], list[PlannedBuild], list[Skipped]]:
    """The plan's builds as requests, and the builds that could not be made (`skipped`)."""
    skipped = list(plan.skipped)
    requests: list[BuildRequest] = []
    planned: list[PlannedBuild] = []
    for build in plan.builds:
        try:
            requests.append(build_request(build, push, origin))
            planned.append(build)
        except ContractError as exc:
            skipped.append(Skipped(build.rule, str(exc)))
    return requests, planned, skipped


def build_request(build: PlannedBuild, push: Push, origin: Origin) -> BuildRequest:
    labels = {"origin": "webhook", "forge": push.forge, "repo": push.repo, "ref": push.ref}
    labels["rule"] = str(build.rule)
    labels["delivery"] = origin.delivery.delivery_id
    obj: dict[str, Any] = {
        "source": {"type": "git", "url": origin.clone_url, "ref": push.ref, "commit": push.sha},
        "images": build.images,
        "dockerfile": build.dockerfile,
        "context": build.context,
        "build_args": build.build_args,
        "secrets": build.secrets,
        "platforms": build.platforms,
        "priority": build.priority,
        "push": build.push,
        "labels": labels,
        "tenant": origin.tenant,
        "submitted_at": origin.received_at,
    }
    if build.target is not None:
        obj["target"] = build.target
    if build.supersede_key is not None:
        obj["supersede_key"] = build.supersede_key
    if origin.trace is not None:
        trace = origin.trace
        obj["trace"] = {"traceparent": trace.traceparent, "tracestate": trace.tracestate}
    return request_from_builtins(obj)

"""The gateway's configured rules as a batch: every image a push to each branch would build.

A rule names repositories by a glob; the batch builds the repositories it names exactly
and those given with `--repo` that its glob matches. Each repository is cloned from
`--clone-url` (a template of {repo}, {owner} and {name}); every branch the rules match is
planned as if it had just been pushed at the commit it points at now, through the gateway's
own `plan`, so the images are the ones a push would build.
"""

from __future__ import annotations

import asyncio
import fnmatch
import string
from collections.abc import Sequence
from typing import Final

from buildfleet.rebuild.gitread import GitReader
from buildfleet.rebuild.plan import Entry, Plan, Refused, SourceError
from producer.contract import ContractError, request_from_builtins
from producer.gateway.rules import PlannedBuild
from producer.gateway.rules import plan as plan_push
from producer.gateway.settings import Rule
from producer.gateway.webhooks import Push

_GLOB: Final = frozenset("*?[")
TEMPLATE_FIELDS: Final = frozenset({"repo", "owner", "name"})


def check_clone_url(template: str) -> None:
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    if not fields or not fields <= TEMPLATE_FIELDS:
        raise SourceError(
            f"--clone-url {template!r}: expected a template of {{repo}} (or {{owner}} and "
            "{name}), e.g. git://forge.local/{repo}.git"
        )


def _origin(index: int) -> str:
    return f"gateway.rules[{index}]"


def _repositories(rules: Sequence[Rule], repos: Sequence[str], plan: Plan) -> list[str]:
    named: dict[str, None] = {}
    for index, rule in enumerate(rules):
        if not rule.branches:
            reason = "builds on tag pushes only: nothing to rebuild"
            plan.refused.append(Refused(rule.repo, _origin(index), reason, "skipped"))
            continue
        if not any(ch in rule.repo for ch in _GLOB):
            named[rule.repo.lower()] = None
            continue
        matching = [r for r in repos if fnmatch.fnmatchcase(r.lower(), rule.repo.lower())]
        if not matching:
            reason = f"repository pattern {rule.repo!r} names no repository: give them with --repo"
            plan.refused.append(Refused(rule.repo, _origin(index), reason, "skipped"))
        for repo in matching:
            named[repo.lower()] = None
    return list(named)


def _request(build: PlannedBuild, push: Push, url: str) -> dict[str, object]:
    request: dict[str, object] = {
        "source": {"type": "git", "url": url, "ref": push.ref, "commit": push.sha},
        "images": build.images,
        "dockerfile": build.dockerfile,
        "context": build.context,
        "build_args": build.build_args,
        "secrets": build.secrets,
        "platforms": build.platforms,
        "push": build.push,
        "priority": "batch",
        "labels": {"repo": push.repo, "ref": push.ref, "rule": str(build.rule)},
    }
    if build.target is not None:
        request["target"] = build.target
    return request


async def _repository(rules: Sequence[Rule], repo: str, clone_url: str, reader: GitReader) -> Plan:
    owner, _, name = repo.rpartition("/")
    url = clone_url.format(repo=repo, owner=owner, name=name)
    plan = Plan()
    try:
        heads = await reader.branches(url)
    except SourceError as exc:
        plan.refused.append(Refused(repo, "gateway.rules", str(exc), "failed", url))
        return plan
    for branch, sha in sorted(heads.items()):
        push = Push("github", repo, f"refs/heads/{branch}", sha)
        planned = plan_push(rules, push)
        for build in planned.builds:
            origin = f"{_origin(build.rule)} {repo}@{branch}"
            try:
                request = request_from_builtins(_request(build, push, url))
            except ContractError as exc:
                plan.refused.append(Refused(repo, origin, str(exc), "failed", url))
                continue
            plan.entries.append(Entry(request, origin))
        for skipped in planned.skipped:
            origin = f"{_origin(skipped.rule)} {repo}@{branch}"
            plan.refused.append(Refused(repo, origin, skipped.reason, "skipped", url))
    return plan


async def rule_entries(
    rules: Sequence[Rule], *, repos: Sequence[str], clone_url: str, reader: GitReader
) -> Plan:
    check_clone_url(clone_url)
    plan = Plan()
    names = _repositories(rules, repos, plan)
    for part in await asyncio.gather(*(_repository(rules, r, clone_url, reader) for r in names)):
        plan.extend(part)
    return plan

"""Push payloads shaped like each forge's documented webhook, and their signed headers.

Shared by the gateway's tests (and mirrored by bench/bench_gateway.py); the tests at the
bottom pin the shapes the gateway relies on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from typing import Any

ZERO = "0" * 40


def sha_for(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _commit(sha: str, index: int, repo_url: str, *, gitea: bool = False) -> dict[str, Any]:
    person = {"name": "Monalisa Octocat", "email": "mona@example.com", "username": "octocat"}
    commit: dict[str, Any] = {
        "id": sha,
        "tree_id": sha_for(f"tree-{sha}"),
        "distinct": True,
        "message": f"Change number {index}\n\nA longer body explaining the change in detail.",
        "timestamp": "2024-05-01T12:00:00+00:00",
        "url": f"{repo_url}/commit/{sha}",
        "author": person,
        "committer": person,
        "added": [f"src/new_{index}.py"],
        "removed": [],
        "modified": ["README.md", f"src/module_{index}.py", "Dockerfile"],
    }
    if gitea:
        commit["verification"] = None
    return commit


def _user(login: str) -> dict[str, Any]:
    return {
        "login": login,
        "id": 583231,
        "node_id": "MDQ6VXNlcjU4MzIzMQ==",
        "avatar_url": f"https://avatars.example.com/u/{login}",
        "url": f"https://api.github.com/users/{login}",
        "html_url": f"https://github.com/{login}",
        "type": "User",
        "site_admin": False,
    }


def github_push(
    repo: str = "acme/api",
    ref: str = "refs/heads/main",
    after: str | None = None,
    *,
    commits: int = 3,
    deleted: bool = False,
    clone_url: str | None = None,
) -> dict[str, Any]:
    """A `push` event as GitHub documents it (trimmed of nothing the gateway reads)."""
    owner, name = repo.split("/", 1)
    after = ZERO if deleted else (after or sha_for(f"{repo}{ref}"))
    html = f"https://github.com/{repo}"
    shas = [sha_for(f"{after}-{i}") for i in range(commits - 1)] + [after]
    commit_list = [] if deleted else [_commit(s, i, html) for i, s in enumerate(shas)]
    return {
        "ref": ref,
        "before": sha_for(f"before-{after}"),
        "after": after,
        "repository": {
            "id": 35129377,
            "node_id": "MDEwOlJlcG9zaXRvcnkzNTEyOTM3Nw==",
            "name": name,
            "full_name": repo,
            "private": False,
            "owner": _user(owner),
            "html_url": html,
            "description": "An example repository",
            "fork": False,
            "url": f"https://api.github.com/repos/{repo}",
            "git_url": f"git://github.com/{repo}.git",
            "ssh_url": f"git@github.com:{repo}.git",
            "clone_url": clone_url or f"{html}.git",
            "default_branch": "main",
            "master_branch": "main",
        },
        "pusher": {"name": "octocat", "email": "mona@example.com"},
        "sender": _user("octocat"),
        "created": False,
        "deleted": deleted,
        "forced": False,
        "base_ref": None,
        "compare": f"{html}/compare/{after[:12]}",
        "commits": commit_list,
        "head_commit": commit_list[-1] if commit_list else None,
    }


def github_ping(repo: str = "acme/api") -> dict[str, Any]:
    owner = repo.split("/", 1)[0]
    return {
        "zen": "Keep it logically awesome.",
        "hook_id": 30,
        "hook": {"type": "Repository", "id": 30, "events": ["push"], "active": True},
        "repository": {"full_name": repo, "clone_url": f"https://github.com/{repo}.git"},
        "sender": _user(owner),
    }


def gitlab_push(
    repo: str = "group/sub/api",
    ref: str = "refs/heads/main",
    after: str | None = None,
    *,
    tag: bool = False,
    deleted: bool = False,
    commits: int = 3,
    clone_url: str | None = None,
) -> dict[str, Any]:
    """A Push Hook (or Tag Push Hook) payload as GitLab documents it."""
    after = ZERO if deleted else (after or sha_for(f"{repo}{ref}"))
    web = f"https://gitlab.example.com/{repo}"
    shas = [sha_for(f"{after}-{i}") for i in range(commits - 1)] + [after]
    commit_list = [] if deleted else [_commit(s, i, web) for i, s in enumerate(shas)]
    project = {
        "id": 15,
        "name": repo.rsplit("/", 1)[-1],
        "description": "",
        "web_url": web,
        "avatar_url": None,
        "git_ssh_url": f"git@gitlab.example.com:{repo}.git",
        "git_http_url": clone_url or f"{web}.git",
        "namespace": repo.rsplit("/", 1)[0],
        "visibility_level": 0,
        "path_with_namespace": repo,
        "default_branch": "main",
        "homepage": web,
        "url": f"git@gitlab.example.com:{repo}.git",
        "ssh_url": f"git@gitlab.example.com:{repo}.git",
        "http_url": f"{web}.git",
    }
    return {
        "object_kind": "tag_push" if tag else "push",
        "event_name": "tag_push" if tag else "push",
        "before": ZERO if tag else sha_for(f"before-{after}"),
        "after": after,
        "ref": ref,
        "ref_protected": True,
        "checkout_sha": None if deleted else after,
        "user_id": 4,
        "user_name": "John Smith",
        "user_username": "jsmith",
        "user_email": "john@example.com",
        "user_avatar": "https://s.gravatar.com/avatar/d4c74594d841139328695756648b6bd6?s=8://s.gravatar.com/avatar/d4c74594d841139328695756648b6bd6?s=80",
        "project_id": 15,
        "project": project,
        "repository": {
            "name": project["name"],
            "url": project["url"],
            "description": "",
            "homepage": web,
            "git_http_url": project["git_http_url"],
            "git_ssh_url": project["git_ssh_url"],
            "visibility_level": 0,
        },
        "commits": commit_list,
        "total_commits_count": len(commit_list),
    }


def gitea_push(
    repo: str = "gitea/webhooks",
    ref: str = "refs/heads/main",
    after: str | None = None,
    *,
    commits: int = 3,
    clone_url: str | None = None,
) -> dict[str, Any]:
    """A push event as Gitea (and Forgejo) send it."""
    owner = repo.split("/", 1)[0]
    after = after or sha_for(f"{repo}{ref}")
    html = f"https://gitea.example.com/{repo}"
    shas = [sha_for(f"{after}-{i}") for i in range(commits - 1)] + [after]
    commit_list = [_commit(s, i, html, gitea=True) for i, s in enumerate(shas)]
    user = {"id": 1, "login": owner, "full_name": "", "email": "owner@example.com",
            "username": owner}  # fmt: skip
    return {
        "ref": ref,
        "before": sha_for(f"before-{after}"),
        "after": after,
        "compare_url": f"{html}/compare/{after}",
        "commits": commit_list,
        "total_commits": len(commit_list),
        "head_commit": commit_list[-1],
        "repository": _gitea_repo(repo, user, clone_url or f"{html}.git"),
        "pusher": user,
        "sender": user,
    }


def _gitea_repo(repo: str, user: dict[str, Any], clone_url: str) -> dict[str, Any]:
    return {
        "id": 140,
        "owner": user,
        "name": repo.split("/", 1)[1],
        "full_name": repo,
        "description": "",
        "private": False,
        "fork": False,
        "html_url": f"https://gitea.example.com/{repo}",
        "ssh_url": f"git@gitea.example.com:{repo}.git",
        "clone_url": clone_url,
        "default_branch": "main",
    }


def gitea_delete(repo: str = "gitea/webhooks", ref: str = "feature", kind: str = "branch") -> Any:
    user = {"id": 1, "login": "gitea", "username": "gitea"}
    return {
        "ref": ref,
        "ref_type": kind,
        "pusher_type": "user",
        "repository": _gitea_repo(repo, user, f"https://gitea.example.com/{repo}.git"),
        "sender": user,
    }


def body_of(payload: Any) -> bytes:
    return json.dumps(payload).encode()


def github_headers(
    body: bytes, secret: str | None, event: str = "push", delivery: str | None = None
) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "User-Agent": "GitHub-Hookshot/044aadd",
    }
    if secret is not None:
        digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        headers["X-Hub-Signature-256"] = f"sha256={digest}"
    return headers


def gitlab_headers(
    token: str | None, event: str = "Push Hook", delivery: str | None = None
) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        "X-Gitlab-Event": event,
        "X-Gitlab-Event-UUID": delivery or str(uuid.uuid4()),
    }
    if token is not None:
        headers["X-Gitlab-Token"] = token
    return headers


def gitea_headers(
    body: bytes,
    secret: str | None,
    event: str = "push",
    delivery: str | None = None,
    *,
    forgejo: bool = False,
) -> dict[str, str]:
    prefix = "X-Forgejo-" if forgejo else "X-Gitea-"
    headers = {
        "Content-Type": "application/json",
        f"{prefix}Event": event,
        f"{prefix}Delivery": delivery or str(uuid.uuid4()),
    }
    if secret is not None:
        headers[f"{prefix}Signature"] = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return headers


# --- the shapes themselves ----------------------------------------------------------------


def test_github_push_is_several_kilobytes_and_names_its_head_commit() -> None:
    payload = github_push(commits=6)
    assert len(body_of(payload)) > 4000
    assert payload["head_commit"]["id"] == payload["after"]


def test_deleted_refs_carry_the_zero_sha() -> None:
    assert github_push(deleted=True)["after"] == ZERO
    assert github_push(deleted=True)["head_commit"] is None
    assert gitlab_push(deleted=True)["checkout_sha"] is None


# --- events that name no repository (shaped like GitHub's published examples) ---------------


def _account(login: str, kind: str = "Organization") -> dict[str, Any]:
    return {**_user(login), "type": kind}


def _installation(installation: int, owner: str) -> dict[str, Any]:
    return {
        "id": installation,
        "account": _account(owner),
        "repository_selection": "selected",
        "access_tokens_url": f"https://api.github.com/app/installations/{installation}/access_tokens",
        "app_id": 1,
        "target_id": 2,
        "target_type": "Organization",
        "permissions": {"contents": "read", "metadata": "read"},
        "events": ["push"],
    }


def github_events_without_a_repository(owner: str, installation: int) -> dict[str, Any]:
    """Event name -> payload, for the events GitHub sends to App and organization webhooks
    that carry no `repository` (their top-level shapes as GitHub documents them)."""
    sender = _user("octocat")
    org = {"login": owner, "id": 38302899, "url": f"https://api.github.com/orgs/{owner}"}
    inst = _installation(installation, owner)
    small_repo = {"id": 1, "name": "app", "full_name": f"{owner}/app", "private": True}
    return {
        "installation": {"action": "created", "installation": inst,
                         "repositories": [small_repo], "sender": sender},
        "installation_repositories": {
            "action": "added", "installation": inst, "repository_selection": "selected",
            "repositories_added": [small_repo], "repositories_removed": [],
            "requester": None, "sender": sender,
        },
        "marketplace_purchase": {
            "action": "purchased", "effective_date": "2024-01-01T00:00:00+00:00",
            "sender": sender,
            "marketplace_purchase": {"account": _account(owner), "billing_cycle": "monthly",
                                     "unit_count": 1, "on_free_trial": False,
                                     "plan": {"id": 7, "name": "Pro"}},
        },
        "sponsorship": {
            "action": "created", "sender": sender,
            "sponsorship": {"node_id": "S_x", "created_at": "2024-01-01T00:00:00Z",
                            "sponsorable": _user(owner), "sponsor": sender,
                            "privacy_level": "public", "tier": {"monthly_price_in_dollars": 5}},
        },
        "security_advisory": {
            "action": "published",
            "security_advisory": {"ghsa_id": "GHSA-xxxx-yyyy-zzzz", "summary": "A flaw",
                                  "severity": "high", "identifiers": [], "references": [],
                                  "vulnerabilities": []},
        },
        "github_app_authorization": {"action": "revoked", "sender": sender},
        "organization": {"action": "member_added", "organization": org, "sender": sender,
                         "membership": {"state": "active", "role": "member", "user": sender},
                         "installation": {"id": installation}},
        "membership": {"action": "added", "scope": "team", "member": sender, "sender": sender,
                       "team": {"id": 3, "name": "devs", "slug": "devs"}, "organization": org},
        "team": {"action": "created", "team": {"id": 3, "name": "devs"}, "organization": org,
                 "sender": sender, "installation": {"id": installation}},
        "org_block": {"action": "blocked", "blocked_user": _user("spammer"),
                      "organization": org, "sender": sender},
        "projects_v2_item": {"action": "archived", "organization": org, "sender": sender,
                             "projects_v2_item": {"id": 9, "content_type": "Issue"},
                             "changes": {"archived_at": {"from": None, "to": "2024-01-01"}}},
    }  # fmt: skip

"""Fixture git repositories served by the test harness's `git daemon`.

    repo = git_server.create_repo("app", {"Dockerfile": "FROM ...", "src/x.txt": "x"})
    repo.url                       # git://127.0.0.1:PORT/app.git
    repo.head                      # sha of the last commit
    sha = repo.commit({"src/x.txt": "y"}, message="change x", delete=["old.txt"])
    repo.context(sha)              # git://127.0.0.1:PORT/app.git#<sha>  (a BuildKit context)

Repositories are working trees (pushes update the checked-out branch), configured so that
any commit can be fetched by its sha, which is how BuildKit fetches pinned commits.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")

# Fixed identity and dates: the same files on the same parent give the same sha.
_GIT_ENV = {
    "GIT_AUTHOR_NAME": "buildfleet tests",
    "GIT_AUTHOR_EMAIL": "tests@buildfleet.invalid",
    "GIT_COMMITTER_NAME": "buildfleet tests",
    "GIT_COMMITTER_EMAIL": "tests@buildfleet.invalid",
    "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_TERMINAL_PROMPT": "0",
}


def git(cwd: Path, *args: str) -> str:
    """Run git in `cwd` with a fixed identity; return stdout stripped."""
    env = {**os.environ, **_GIT_ENV}
    result = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} in {cwd} failed:\n{result.stderr}")
    return result.stdout.strip()


@dataclass(frozen=True)
class GitRepo:
    """One repository under the daemon's root."""

    name: str
    path: Path
    url: str
    branch: str

    @property
    def head(self) -> str:
        return git(self.path, "rev-parse", "HEAD")

    def context(self, ref: str | None = None, subdir: str = "") -> str:
        """A BuildKit git context: `URL#ref[:subdir]` (ref defaults to HEAD's sha)."""
        fragment = ref or self.head
        return f"{self.url}#{fragment}:{subdir}" if subdir else f"{self.url}#{fragment}"

    def commit(
        self,
        files: Mapping[str, str | bytes] | None = None,
        *,
        message: str = "update",
        delete: Iterable[str] = (),
        branch: str | None = None,
    ) -> str:
        """Write `files` (path -> content), delete paths, commit; return the new sha."""
        if branch is not None and branch != git(self.path, "branch", "--show-current"):
            exists = git(self.path, "branch", "--list", branch)
            git(self.path, "checkout", "-q", *([] if exists else ["-b"]), branch)
        for rel, content in (files or {}).items():
            target = self.path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
        for rel in delete:
            git(self.path, "rm", "-q", "-r", "--", rel)
        git(self.path, "add", "-A")
        git(self.path, "commit", "-q", "--allow-empty", "-m", message)
        return self.head

    def tag(self, name: str, ref: str = "HEAD") -> None:
        git(self.path, "tag", "-f", name, ref)


@dataclass(frozen=True)
class GitServer:
    """The git daemon's root directory and its base URL (`git://127.0.0.1:PORT/`)."""

    root: Path
    url: str

    def create_repo(
        self, name: str, files: Mapping[str, str | bytes] | None = None, *, branch: str = "main"
    ) -> GitRepo:
        """A new repository `NAME.git`, with a first commit of `files` if given."""
        if not _NAME.match(name) or ".." in name:
            raise ValueError(f"bad repository name {name!r}")
        repo_name = name if name.endswith(".git") else f"{name}.git"
        path = self.root / repo_name
        if path.exists():
            raise FileExistsError(f"repository {path} already exists")
        path.mkdir(parents=True)
        git(path, "init", "-q", "-b", branch)
        git(path, "config", "uploadpack.allowAnySHA1InWant", "true")
        git(path, "config", "receive.denyCurrentBranch", "updateInstead")
        repo = GitRepo(name=repo_name, path=path, url=f"{self.url}{repo_name}", branch=branch)
        if files is not None:
            repo.commit(files, message="initial")
        return repo

"""Maven with the Jib plugin: its command line, and its output as Step and Log events. Pure.

The command is an argument list built from validated values only: the module's pom.xml
(a path the backend resolved inside its own copy of the source), image references (the
contract's reference grammar: no spaces, commas or `=`), a Java class name, the worker's
own settings. Nothing a request carries becomes an option or a Maven property of its own
choosing (no `-D` from build args, no profiles, no goals).

Maven announces each plugin goal it runs with a boundary line,
`[INFO] --- jib-maven-plugin:3.5.2:build (default-cli) @ app ---` (Maven 3.9 shortens the
plugin to `jib:3.5.2:build`); each such line starts a Step, the lines up to the next one are
its Log events. A failure is Maven's `[ERROR] Failed to execute goal ...` paragraph.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from producer import reference
from producer.contract import BuildRequest, JibRecipe, Log, Step
from worker.backends.steplines import TextSteps
from worker.settings import JibSettings

GOAL_LINE: Final = re.compile(
    r"^\[INFO\] --- (?P<plugin>[\w.-]+):(?P<version>[\w.-]+):(?P<goal>[\w.-]+)"
    r"(?: \((?P<execution>[^)]*)\))? @ (?P<project>\S+) ---$"
)
_ANSI: Final = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_FAILED_GOAL: Final = re.compile(r"^\[ERROR\] Failed to execute goal (\S+) .*? on project \S+: ")
_HELP: Final = re.compile(r"\s*-> \[Help \d+\]$")
_ERROR: Final = "[ERROR] "
_CHATTER: Final = re.compile(
    r"^\[(?:INFO|ERROR)\]\s*(?:-{8,}|BUILD (?:FAILURE|SUCCESS)|Total time:|Finished at:"
    r"|To see the full stack trace|Re-run Maven using|For more information about the errors"
    r"|(?:-> )?\[Help \d+\]|$)"
)
"""Maven's own lines around a failure: shown, but not a failure's tail."""
_PLACEHOLDER_IMAGE: Final = "buildfleet.invalid/jib/unpushed:latest"
"""The name a build that is not pushed gives its tarball's image (no registry is contacted)."""


class JibRequestError(ValueError):
    """A request the jib backend cannot build as asked; the text says what to change."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where Jib pushes: one repository, one or more tags."""

    image: str
    tags: tuple[str, ...]


def target(request: BuildRequest) -> Target:
    """The repository and tags of `request.images`: Jib pushes one repository per build."""
    if not request.images:
        return Target(_PLACEHOLDER_IMAGE, ())
    refs = [reference.parse(image) for image in request.images]
    if any(ref.digest for ref in refs):
        raise JibRequestError("Jib pushes to tags, not digests: drop the @sha256:... of images")
    names = {ref.name for ref in refs}
    if len(names) > 1:
        raise JibRequestError(
            f"Jib pushes one repository per build (several tags), not {len(names)}: "
            f"{', '.join(sorted(names))}"
        )
    first = request.images[0]
    tags = tuple(dict.fromkeys(ref.tag or "latest" for ref in refs[1:]))
    return Target(first, tuple(t for t in tags if t != (refs[0].tag or "latest")))


def insecure(settings: JibSettings, images: list[str]) -> bool:
    """Whether Jib may talk plain HTTP: only when every registry it reaches is configured so
    (Jib's switch is for all of them at once)."""
    registries = {reference.parse(image).registry for image in images}
    return bool(registries) and registries <= set(settings.insecure_registries)


def check(recipe: JibRecipe, request: BuildRequest) -> Target:
    """Where `request` pushes, or JibRequestError saying why Jib cannot build it."""
    if recipe.tool != "maven":
        raise JibRequestError(
            f"the jib backend builds Maven projects; recipe.tool={recipe.tool!r} "
            "is not supported yet"
        )
    return target(request)


def maven_argv(
    settings: JibSettings, recipe: JibRecipe, request: BuildRequest, pom: Path, digest_file: Path
) -> list[str]:
    """`mvn ... compile jib:build` (or `jib:buildTar` when nothing is pushed) for one request."""
    where = check(recipe, request)
    goal = "build" if request.push else "buildTar"
    plugin = f"com.google.cloud.tools:jib-maven-plugin:{settings.plugin_version}:{goal}"
    repository = Path(settings.maven_repository)
    argv = [settings.mvn, "--batch-mode", "--no-transfer-progress", "--file", str(pom),
            "-Dstyle.color=never", f"-Dmaven.repo.local={repository}",
            "compile", plugin,
            f"-Dimage={where.image}",
            f"-Djib.outputPaths.digest={digest_file}",
            f"-Djib.baseImageCache={repository.parent / 'jib-base-cache'}",
            "-Djib.disableUpdateChecks=true", "-Djib.console=plain"]  # fmt: skip
    if where.tags:
        argv.append(f"-Djib.to.tags={','.join(where.tags)}")
    pulled = [where.image] if request.push else []
    if recipe.base_image is not None:
        argv.append(f"-Djib.from.image={recipe.base_image}")
        if recipe.base_image != "scratch":  # Jib's empty base: no registry
            pulled.append(recipe.base_image)
    if recipe.main_class is not None:
        argv.append(f"-Djib.container.mainClass={recipe.main_class}")
    if insecure(settings, pulled):
        argv.append("-Djib.allowInsecureRegistries=true")
    return argv


def clean(line: str) -> str:
    """One output line without colour codes or its line end."""
    return _ANSI.sub("", line).rstrip("\r\n")


@dataclass
class MavenSteps(TextSteps):
    """Feed it Maven's output line by line; it answers with Step and Log events."""

    errors: list[str] = field(default_factory=list)
    """Maven's `[ERROR]` lines, the failure's paragraph among them."""

    def feed(self, raw: str, now: float) -> list[Step | Log]:
        line = clean(raw)
        match = GOAL_LINE.match(line)
        if match is None:
            if line.startswith(_ERROR):
                self.errors.append(line.removeprefix(_ERROR))
                del self.errors[:-200]
            kept = line.strip() and not _CHATTER.match(line)
            return self.output(raw, line if kept else None)
        return self.start(f"{match['plugin']}:{match['goal']} @ {match['project']}", now)

    def failure(self) -> str | None:
        """Maven's reason for failing: the `Failed to execute goal` line and the error lines
        that follow it, up to Maven's help links; None when Maven printed none."""
        for n, line in enumerate(self.errors):
            match = _FAILED_GOAL.match(_ERROR + line)
            if match is None:
                continue
            reason = [_HELP.sub("", line[match.end() - len(_ERROR) :])]
            for more in self.errors[n + 1 :]:
                if not more.strip() or more.startswith("-> [Help") or more.startswith("To see"):
                    break
                reason.append(_HELP.sub("", more.strip()))
            parts = match.group(1).split(":")  # group:plugin:version:goal
            name = f"{parts[-3]}:{parts[-1]}" if len(parts) >= 3 else match.group(1)
            return f"{name} failed: {': '.join(part for part in reason if part)}"
        return None

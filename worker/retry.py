"""Which failures are worth another attempt, and when that attempt runs. Pure.

The classification table below is the documented contract: a failure is Permanent when
the same request would fail the same way again, Temporary when the infrastructure was at
fault. An error nobody recognises is Temporary: retrying a few times and then dead-lettering
with the message loses nothing, while failing a build for a passing fault would.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Annotated, Final

import msgspec

from producer.backoff import full_jitter
from worker.errors import BuildError, PermanentBuildError, TemporaryBuildError


@dataclass(frozen=True, slots=True)
class Rule:
    pattern: re.Pattern[str]
    error_class: str
    temporary: bool
    daemon_at_fault: bool = False


def _rule(pattern: str, error_class: str, *, temporary: bool, daemon: bool = False) -> Rule:
    return Rule(re.compile(pattern, re.IGNORECASE), error_class, temporary, daemon)


# First match wins: the more specific rules come first.
CLASSIFICATION: Final[tuple[Rule, ...]] = (
    _rule(r"did not complete successfully: exit code", "run_failed", temporary=False),
    # Docker 20.10's BuildKit, Docker's classic builder, Buildah
    _rule(r"^executor failed running \[.*\]: exit code: \d+", "run_failed", temporary=False),
    _rule(r"^The command '.*' returned a non-zero code: \d+", "run_failed", temporary=False),
    _rule(r"^building at STEP \"RUN .*\": exit status \d+", "run_failed", temporary=False),
    # Maven (the jib backend): the project's own code or build file is at fault.
    _rule(r"compilation failure|compilation error", "compile_failed", temporary=False),
    _rule(
        r"could not find artifact|non-resolvable (?:parent|import) pom"
        r"|plugin .* or one of its dependencies could not be resolved.*could not find"
        r"|non-parseable pom|malformed pom",
        "project_invalid",
        temporary=False,
    ),
    _rule(
        r"set the configuration parameter 'allowInsecureRegistries'",
        "insecure_registry",
        temporary=False,
    ),
    _rule(
        r"could not transfer artifact",
        "dependency_unavailable",
        temporary=True,
    ),
    _rule(
        r"dockerfile parse error|unknown instruction|parse error on line",
        "dockerfile",
        temporary=False,
    ),
    # A context BuildKit cannot fetch as git or http (ftp://, file://) is read as a local
    # one, which a remote build has none of.
    _rule(r"no local sources enabled", "unsupported_source", temporary=False),
    _rule(
        r"failed to read dockerfile|dockerfile.*no such file", "dockerfile_missing", temporary=False
    ),
    _rule(r"target stage .* could not be found", "dockerfile", temporary=False),
    _rule(
        r"invalid reference format|invalid reference:|repository name must be lowercase"
        r"|invalid tag format|failed to parse (?:image|stage) name",
        "invalid_reference",
        temporary=False,
    ),
    _rule(
        r"unsupported (?:url|source|protocol) scheme|unsupported protocol"
        r"|unsupported context source|invalid (?:git|context) (?:url|source)",
        "unsupported_source",
        temporary=False,
    ),
    _rule(
        r"failed to calculate checksum|failed to compute cache key",
        "context_file_missing",
        temporary=False,
    ),
    _rule(
        r"401 unauthorized|403 forbidden|authorization failed|insufficient_scope"
        r"|make sure your credentials for .* are set up correctly"
        r"|access denied|requested access to the resource is denied",
        "auth_denied",
        temporary=False,
    ),
    _rule(r"429 too many requests|toomanyrequests", "registry_rate_limited", temporary=True),
    _rule(
        r"\b50[0234] (internal server error|bad gateway|service unavailable|gateway time-?out)"
        r"|status(?: code)?:? 50[0234]\b",
        "registry_unavailable",
        temporary=True,
    ),
    _rule(
        r"(failed to resolve source metadata|failed to do request).*(not found|404)"
        r"|manifest unknown|: not found$|short-name .* did not resolve to an alias",
        "base_image_not_found",
        temporary=False,
    ),
    _rule(
        r"repository not found|does not appear to be a git repository"
        r"|couldn't find remote ref|unknown revision",
        "source_not_found",
        temporary=False,
    ),
    _rule(
        r"failed to dial grpc|error while dialing|code = unavailable|\bunavailable: "
        r"|error reading from server|transport is closing"
        r"|listing workers|failed to get status|connection closed before server preface",
        "daemon_unreachable",
        temporary=True,
        daemon=True,
    ),
    _rule(
        r"connection reset by peer|broken pipe|closed pipe|unexpected eof|i/o timeout"
        r"|connection refused|no route to host|tls handshake timeout|unknown host",
        "connection_lost",
        temporary=True,
    ),
    _rule(
        r"failed to push|failed to export|error writing layer blob", "push_failed", temporary=True
    ),
)


def classify(
    message: str, *, step: str | None = None, log_tail: tuple[str, ...] = ()
) -> BuildError:
    """The domain error for a failure message (buildctl's, Kaniko's, a registry's)."""
    for rule in CLASSIFICATION:
        if rule.pattern.search(message):
            if rule.temporary:
                return TemporaryBuildError(
                    message,
                    error_class=rule.error_class,
                    daemon_at_fault=rule.daemon_at_fault,
                    step=step,
                    log_tail=log_tail,
                )
            return PermanentBuildError(
                message, error_class=rule.error_class, step=step, log_tail=log_tail
            )
    return TemporaryBuildError(message, error_class="unknown", step=step, log_tail=log_tail)


class RetrySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Temporary failures retry with exponential backoff and full jitter (attempt n waits
    uniform(0, min(max_delay_s, base_delay_s * 2^(n-1)))) for as long as the next attempt
    would start within `budget_s` of the first failure: by default long enough to ride out
    a daemon or registry restart of a few minutes. Then the build is dead-lettered."""

    budget_s: Annotated[float, msgspec.Meta(ge=0)] = 600.0
    base_delay_s: Annotated[float, msgspec.Meta(ge=0)] = 2.0
    max_delay_s: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    max_attempts: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """An optional cap on attempts as well (none by default: the budget is time)."""


@dataclass(frozen=True, slots=True)
class RetryDecision:
    retry: bool
    delay_s: float = 0.0


def decide(
    error: BuildError,
    attempt: int,
    elapsed_s: float,
    settings: RetrySettings,
    rng: random.Random | None = None,
) -> RetryDecision:
    """Whether attempt `attempt` (1-based), which failed with `error` `elapsed_s` after the
    build's first temporary failure, gets a successor, and after what delay."""
    if not isinstance(error, TemporaryBuildError):
        return RetryDecision(retry=False)
    if settings.max_attempts is not None and attempt >= settings.max_attempts:
        return RetryDecision(retry=False)
    if error.delay is not None:
        delay = min(error.delay, settings.max_delay_s)
    else:
        delay = full_jitter(
            attempt - 1, base=settings.base_delay_s, cap=settings.max_delay_s, rng=rng
        )
    if elapsed_s + delay > settings.budget_s:
        return RetryDecision(retry=False)
    return RetryDecision(retry=True, delay_s=delay)

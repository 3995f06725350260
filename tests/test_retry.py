"""The classification table and the backoff."""

import random

import pytest

from worker.errors import PermanentBuildError, TemporaryBuildError
from worker.retry import RetrySettings, classify, decide


@pytest.mark.parametrize(
    ("message", "error_class", "temporary"),
    [
        (
            'failed to solve: process "/bin/sh -c exit 3" did not complete successfully: '
            "exit code: 3",
            "run_failed",
            False,
        ),
        (
            "failed to solve: dockerfile parse error on line 2: unknown instruction: RUNN",
            "dockerfile",
            False,
        ),
        (
            "failed to solve: 127.0.0.1:5000/base/nope: failed to resolve source metadata for "
            "127.0.0.1:5000/base/nope:latest: 127.0.0.1:5000/base/nope:latest: not found",
            "base_image_not_found",
            False,
        ),
        ("failed to push reg/x: 401 Unauthorized", "auth_denied", False),
        (
            "failed to get status: rpc error: code = Unavailable desc = connection error: desc = "
            '"transport: Error while dialing: dial tcp 127.0.0.1:1: connect: connection refused"',
            "daemon_unreachable",
            True,
        ),
        # buildctl's words when buildkitd dies in the middle of a solve
        (
            "failed to solve: Unavailable: error reading from server: EOF",
            "daemon_unreachable",
            True,
        ),
        (
            "failed to push 127.0.0.1:5000/app: 503 Service Unavailable",
            "registry_unavailable",
            True,
        ),
        ("failed to copy: read tcp: connection reset by peer", "connection_lost", True),
        ("failed to push 127.0.0.1:5000/app: 429 Too Many Requests", "registry_rate_limited", True),
        ("something nobody has seen before", "unknown", True),
    ],
)
def test_classification(message: str, error_class: str, temporary: bool) -> None:
    error = classify(message)
    assert error.error_class == error_class
    assert isinstance(error, TemporaryBuildError) is temporary


# buildctl v0.34.2's own words (captured from real builds), for requests that fail the same
# way every time: retrying them would only delay the answer.
@pytest.mark.parametrize(
    ("message", "error_class"),
    [
        (
            'failed to solve: failed to parse stage name "Invalid_Ref:::x": invalid reference '
            "format: repository name (library/Invalid_Ref) must be lowercase",
            "invalid_reference",
        ),
        (
            'failed to solve: failed to parse stage name "busybox@sha256:nothex": invalid '
            "reference format",
            "invalid_reference",
        ),
        (
            "failed to solve: failed to push UPPER/Case:1: invalid reference format: repository "
            "name (Case) must be lowercase",
            "invalid_reference",
        ),
        (
            "failed to solve: failed to read dockerfile: no local sources enabled",
            "unsupported_source",
        ),
        (
            "failed to solve: dockerfile parse error on line 2: unknown instruction: RUNN (did "
            "you mean RUN?)",
            "dockerfile",
        ),
    ],
)
def test_configuration_like_errors_are_permanent_at_once(message: str, error_class: str) -> None:
    error = classify(message)
    assert isinstance(error, PermanentBuildError)
    assert error.error_class == error_class


def test_only_the_daemon_rule_blames_the_daemon() -> None:
    daemon = classify("failed to dial gRPC: connection refused")
    registry = classify("failed to push: connection reset by peer")
    assert isinstance(daemon, TemporaryBuildError) and daemon.daemon_at_fault
    assert isinstance(registry, TemporaryBuildError) and not registry.daemon_at_fault


def test_a_permanent_failure_is_never_retried() -> None:
    error = PermanentBuildError("exit code: 1", error_class="run_failed")
    assert not decide(error, 1, 0.0, RetrySettings()).retry


def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    settings = RetrySettings(max_attempts=10, base_delay_s=1.0, max_delay_s=8.0)
    error = TemporaryBuildError("reset", error_class="connection_lost")
    rng = random.Random(7)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]:
        delays = [decide(error, attempt, 0.0, settings, rng).delay_s for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # the whole range is used: full jitter


def test_the_last_attempt_is_not_retried_and_a_stated_delay_wins() -> None:
    settings = RetrySettings(max_attempts=3)
    error = TemporaryBuildError("429", error_class="registry_rate_limited", delay=7.0)
    assert decide(error, 2, 0.0, settings).delay_s == 7.0
    assert not decide(error, 3, 0.0, settings).retry


def test_retries_go_on_for_the_time_budget_not_a_count() -> None:
    """A daemon restart of a few minutes is ridden out: attempts continue while the next
    one would start within the budget, however many there have been."""
    settings = RetrySettings(budget_s=300.0, base_delay_s=2.0, max_delay_s=30.0)
    error = TemporaryBuildError("daemon gone", error_class="daemon_unreachable")
    rng = random.Random(3)
    assert decide(error, 25, 200.0, settings, rng).retry
    assert not decide(error, 2, 299.0, RetrySettings(budget_s=300.0, base_delay_s=10.0), rng).retry
    assert not decide(error, 1, 301.0, settings, rng).retry

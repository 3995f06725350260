"""The fleet's copies of arq's internal key names are arq's own (one place says them)."""

from __future__ import annotations

import arq.constants

from producer import keys


def test_arq_internals_are_the_ones_arq_uses() -> None:
    assert arq.constants.job_key_prefix == keys.ARQ_JOB_PREFIX
    assert arq.constants.in_progress_key_prefix == keys.ARQ_IN_PROGRESS_PREFIX
    assert arq.constants.retry_key_prefix == keys.ARQ_RETRY_PREFIX
    assert arq.constants.result_key_prefix == keys.ARQ_RESULT_PREFIX
    assert arq.constants.health_check_key_suffix == keys.ARQ_HEALTH_CHECK_SUFFIX


def test_every_fleet_key_lives_under_the_fleet_prefix() -> None:
    names = [
        keys.DEFAULT_QUEUE,
        keys.EVENTS_STREAM,
        keys.CANCEL_CHANNEL,
        keys.queued_channel(keys.DEFAULT_QUEUE),
        keys.DEAD_LETTER_STREAM,
        keys.build_key("b"),
        keys.events_key("b"),
        keys.lease_key("b"),
        keys.slot_key("tcp://d:1"),
        keys.delivery_key("github", "d"),
        keys.supersede_record_key("t", "k"),
        keys.push_history_key("github", "a/b", "refs/heads/main"),
        keys.tenant_queued_key("t"),
        keys.tenant_recent_key("t"),
        keys.token_queued_key("t"),
        keys.gateway_wake_key("g"),
        keys.DURATIONS_KEY,
        keys.batch_key("b"),
        keys.batch_entries_key("b"),
    ]
    assert all(name.startswith(keys.PREFIX) for name in names)
    assert len(set(names)) == len(names)

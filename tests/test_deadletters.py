"""The dead-letter stream's byte caps (the entry helper the store writes with)."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from producer import deadletters
from producer.client import BuildfleetClient
from producer.contract import BuildRequest, ContractError, LocalSource, encode
from producer.keys import DEAD_LETTER_STREAM


def test_an_entry_keeps_its_request_up_to_the_cap_and_only_its_size_beyond() -> None:
    small = deadletters.entry("b1", "why", 1.0, b"x" * 100, max_bytes=100)
    assert small["request"] == b"x" * 100
    assert "truncated" not in small
    big = deadletters.entry("b2", "w" * 10_000, 1.0, b"x" * 101, max_bytes=100)
    assert (big["request"], big["request_bytes"], big["truncated"]) == (b"", "101", "1")
    assert len(big["reason"]) == deadletters.MAX_REASON


def test_the_streams_length_is_its_budget_over_the_cap() -> None:
    assert deadletters.maxlen(256 * 1024 * 1024, 64 * 1024) == 3_956  # 256 MiB / (64 KiB + ...)
    assert deadletters.maxlen(1, 64 * 1024) == 1


async def test_a_truncated_dead_letter_is_listed_but_not_replayed(
    fleet: BuildfleetClient, redis: aioredis.Redis
) -> None:
    request = encode(BuildRequest(id="kept", source=LocalSource(path="/x"), push=False))
    for build_id, body in (("kept", request), ("dropped", b"y" * 200)):
        fields = deadletters.entry(build_id, "failed", 1.0, body, max_bytes=len(request))
        await redis.xadd(DEAD_LETTER_STREAM, fields)  # type: ignore[arg-type]
    letters = {letter.build_id: letter for letter in await fleet.dead_letters()}
    assert (letters["kept"].truncated, letters["dropped"].truncated) == (False, True)
    assert await fleet.replay("kept")
    with pytest.raises(ContractError, match="cannot be replayed"):
        await fleet.replay("dropped")

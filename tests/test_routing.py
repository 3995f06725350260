"""Rendezvous routing: stable, spread, and minimal movement when a daemon leaves."""

import collections

from worker.routing import rank

DAEMONS = [f"tcp://buildkitd-{n}:1234" for n in range(4)]
KEYS = [f"git://forge/repo-{n}.git::.::Dockerfile" for n in range(400)]


def test_the_same_cache_key_always_ranks_the_same_daemon_first() -> None:
    for key in KEYS[:20]:
        assert rank(key, DAEMONS)[0] == rank(key, list(reversed(DAEMONS)))[0]


def test_keys_spread_over_all_daemons() -> None:
    firsts = collections.Counter(rank(key, DAEMONS)[0] for key in KEYS)
    assert set(firsts) == set(DAEMONS)
    assert min(firsts.values()) > len(KEYS) / len(DAEMONS) / 2


def test_removing_a_daemon_moves_only_the_keys_it_held() -> None:
    before = {key: rank(key, DAEMONS)[0] for key in KEYS}
    after = {key: rank(key, DAEMONS[1:])[0] for key in KEYS}
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == DAEMONS[0]}


def test_the_ranking_is_the_spill_order() -> None:
    ranking = rank(KEYS[0], DAEMONS)
    assert sorted(ranking) == sorted(DAEMONS)
    without_first = rank(KEYS[0], [d for d in DAEMONS if d != ranking[0]])
    assert without_first == ranking[1:]


def test_random_routing_ignores_the_key() -> None:
    firsts = {rank(KEYS[0], DAEMONS, strategy="random")[0] for _ in range(200)}
    assert len(firsts) > 1

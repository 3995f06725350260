"""The Python client's public surface is what `producer.client.__all__` says, no more, no
less: a name added or dropped there is an API change and must change this test too."""

from __future__ import annotations

import inspect

import producer.client

PUBLIC = {
    "BuildEvent",
    "BuildNotFound",
    "BuildRequest",
    "BuildResult",
    "BuildState",
    "BuildfleetClient",
    "CachePolicy",
    "CancelOutcome",
    "Cancelled",
    "ContractError",
    "DaemonStatus",
    "DeadLetter",
    "DeadLettered",
    "Failed",
    "FleetStatus",
    "FleetUnavailable",
    "GitSource",
    "Listed",
    "LocalSource",
    "Log",
    "Queued",
    "Retrying",
    "Started",
    "Step",
    "Submission",
    "Succeeded",
    "WorkerStatus",
    "is_terminal",
    "new_build_id",
}


def test_the_client_exports_exactly_its_public_names() -> None:
    assert set(producer.client.__all__) == PUBLIC


def test_every_public_name_exists_and_says_what_it_is() -> None:
    for name in producer.client.__all__:
        value = getattr(producer.client, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), f"{name} has no docstring"


def test_the_clients_public_methods_are_documented() -> None:
    client = producer.client.BuildfleetClient
    methods = [
        name
        for name, member in inspect.getmembers(client)
        if not name.startswith("_") and (inspect.isfunction(member) or inspect.ismethod(member))
    ]
    assert {"submit", "watch", "cancel", "get"} <= set(methods)
    undocumented = [name for name in methods if not inspect.getdoc(getattr(client, name))]
    assert not undocumented, undocumented

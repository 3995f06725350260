"""`buildfleet up` against a stranger's Dockerfile: its RUN steps reach neither the fleet's
Redis nor anything else on this host, and Redis wants the work directory's password, which
nothing prints or logs.

The probe is busybox `nc` sending a RESP PING to every address of this host (127.0.0.1, the
bridge's gateway, the host's own addresses) on Redis's port and on a port this test listens
on at 0.0.0.0. Redis counts every command it refuses for want of a password
(`errorstat_NOAUTH`): a probe that reached it would move that count. The control test runs
the same probe on a buildkitd sharing the host's network, where it does reach Redis. The
last tests open build networks side by side (root, the host's real iptables) and check each
gets a bridge and subnet of its own, a dead owner's slot is taken over, and close() leaves
no rule or claim behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from buildfleet.build_network import BuildNetwork
from buildfleet.services import find_tool

pytestmark = pytest.mark.timeout(300)

PROBE = r"""FROM {base}
ARG HOSTS
ARG PORTS
ARG NONCE
RUN gateway=$(ip route | awk '/^default/ {print $3}'); \
    for host in 127.0.0.1 $gateway $HOSTS; do for port in $PORTS; do \
      if printf 'PING\r\n' | nc -w 3 "$host" "$port"; \
      then echo "probe: reached $host:$port"; \
      else echo "probe: no connection to $host:$port"; fi; \
    done; done
"""


def _host_addresses() -> list[str]:
    """This host's IPv4 addresses other than loopback."""
    listed = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    addresses = [line.split()[3].split("/")[0] for line in listed.splitlines()]
    return [address for address in addresses if not address.startswith("127.")]


@contextlib.contextmanager
def _listener() -> Iterator[tuple[int, list[str]]]:
    """A TCP port listening on every address of this host; the peers it accepted."""
    accepted: list[str] = []
    server = socket.create_server(("0.0.0.0", 0))  # what a RUN step must not reach
    server.settimeout(0.2)
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                conn, peer = server.accept()
                accepted.append(peer[0])
                conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        done.set()
        thread.join()
        server.close()


def _probe_context(directory: Path, base_image: str) -> Path:
    directory.mkdir()
    (directory / "Dockerfile").write_text(PROBE.replace("{base}", base_image))
    return directory


def _probe_args(ports: list[int]) -> dict[str, str]:
    return {
        "HOSTS": " ".join(_host_addresses()),
        "PORTS": " ".join(map(str, ports)),
        "NONCE": secrets.token_hex(8),  # never a cached RUN
    }


def _outcomes(build_output: str) -> set[str]:
    """What the probe printed, one entry per address and port it tried."""
    return {
        line.split("probe: ", 1)[1]
        for line in build_output.splitlines()
        if "| probe: " in line or re.search(r"^#\d+ [\d.]+ probe: ", line)
    }


def _noauth_refusals(client: redis.Redis) -> int:
    """How many commands Redis refused because the client had not authenticated."""
    stats = client.info("errorstats")
    return int(stats.get("errorstat_NOAUTH", {}).get("count", 0))


def _first_reply(port: int, command: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(command)
        return sock.recv(256)


def _descendants(pid: int) -> set[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    children = {int(line) for line in found.stdout.split()}
    return children.union(*(_descendants(child) for child in children)) if children else set()


def _listening(pids: set[int]) -> list[str]:
    """The local addresses of the TCP sockets these processes listen on (IPv4 and IPv6)."""
    listed = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in listed.splitlines():
        owners = {int(pid) for pid in re.findall(r"pid=(\d+),", line)}
        if owners & pids:
            found.append(line.split()[3])
    return found


@contextlib.contextmanager
def _up(workdir: Path, cwd: Path) -> Iterator[tuple[dict[str, object], subprocess.Popen[str]]]:
    env = {k: v for k, v in os.environ.items() if k != "BUILDFLEET_REDIS_URL"}
    env["BUILDFLEET_WORKDIR"] = str(workdir)
    argv = [sys.executable, "-m", "buildfleet.cli", "up", "--json", "--workers", "1"]
    with (workdir.parent / "up.log").open("wb") as log:
        up = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert up.stdout is not None
        line = up.stdout.readline()
        fleet = json.loads(line)
        fleet["_line"] = line
        yield fleet, up
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=120) == 0


def test_up_run_steps_reach_neither_its_redis_nor_the_host(tmp_path: Path) -> None:
    workdir = tmp_path / "fleet"
    workdir.mkdir()
    with _up(workdir, cwd=tmp_path) as (fleet, up), _listener() as (listening, accepted):
        password_file = Path(str(fleet["redis_password_file"]))
        assert password_file.parent == workdir
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        password = password_file.read_text().strip()
        redis_url = str(fleet["redis_url"])
        port = urlsplit(redis_url).port
        assert port is not None and urlsplit(redis_url).password is None

        # Redis refuses whoever lacks the password.
        assert _first_reply(port, b"PING\r\n").startswith(b"-NOAUTH")
        assert _first_reply(port, b"AUTH not-the-password\r\n").startswith(b"-WRONGPASS")
        client = redis.Redis(host="127.0.0.1", port=port, password=password)
        assert client.ping()
        refused_before = _noauth_refusals(client)

        # A build whose RUN step knocks on every address of the host; `up` says how the
        # command line gets the password: from the file.
        context = _probe_context(tmp_path / "probe", str(fleet["base_image"]))
        env = {
            **os.environ,
            "BUILDFLEET_REDIS_URL": redis_url,
            "BUILDFLEET_REDIS_PASSWORD": password,
        }
        args = _probe_args([port, listening])
        build_args = [
            arg for name, value in args.items() for arg in ("--build-arg", f"{name}={value}")
        ]
        submitted = subprocess.run(
            [sys.executable, "-m", "buildfleet.cli", "submit", str(context),
             "--image", f"{fleet['registry']}/probe/network:1", *build_args, "--wait", "--logs"],
            env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        outcomes = _outcomes(submitted.stdout)
        hosts = {"127.0.0.1", *args["HOSTS"].split()}
        expected = {
            f"no connection to {host}:{probed}" for host in hosts for probed in (port, listening)
        }
        assert expected <= outcomes, submitted.stdout
        assert [line for line in outcomes if not line.startswith("no connection")] == []
        gateway = {line for line in outcomes if line.startswith("no connection to 10.213.")}
        assert len(gateway) == 2, outcomes  # the bridge's own address, both ports
        assert _noauth_refusals(client) == refused_before
        assert accepted == []

        # Every service of the fleet listens on loopback only.
        spawned = _descendants(up.pid)
        listening_on = _listening(spawned)
        assert len(listening_on) >= 8, listening_on  # redis, registry, buildkitd, git, ...
        assert [a for a in listening_on if not a.startswith("127.0.0.1:")] == []

        # The password is in no output, log, or process's argv.
        assert password not in str(fleet["_line"])
        logs = [workdir.parent / "up.log", *(workdir / "logs").iterdir()]
        assert [log for log in logs if password in log.read_text(errors="replace")] == []
        argvs = []
        for pid in spawned:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                argvs.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))
        assert argvs and [argv for argv in argvs if password in argv] == []


def test_the_probe_does_reach_redis_from_a_build_on_the_hosts_network(
    tmp_path: Path, buildkitd: str, base_image: str, redis_url: str
) -> None:
    """The control: the conftest buildkitd shares the host's network with RUN steps."""
    client = redis.Redis.from_url(redis_url)
    port = urlsplit(redis_url).port
    assert port is not None
    refused_before = _noauth_refusals(client)
    context = _probe_context(tmp_path / "probe", base_image)
    args = _probe_args([port])
    build_args = [
        arg for name, value in args.items() for arg in ("--opt", f"build-arg:{name}={value}")
    ]
    built = subprocess.run(
        [find_tool("buildctl"), "--addr", buildkitd, "build", "--frontend", "dockerfile.v0",
         "--progress", "plain", "--local", f"context={context}", "--local",
         f"dockerfile={context}", *build_args],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert f"reached 127.0.0.1:{port}" in _outcomes(built.stderr)
    assert "-NOAUTH" in built.stderr
    assert _noauth_refusals(client) > refused_before


def _input_rules() -> str:
    return subprocess.run(["iptables", "-S", "INPUT"], capture_output=True, text=True).stdout


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_build_networks_side_by_side_get_their_own_bridge_and_undo_everything(
    tmp_path: Path,
) -> None:
    claims = tmp_path / "claims"
    first = BuildNetwork(tmp_path / "a", claims=claims)
    second = BuildNetwork(tmp_path / "b", claims=claims)
    first.open()
    try:
        second.open()
        bridges = [first.bridge, second.bridge]
        try:
            assert bridges[0] != bridges[1]
            assert not first.subnet.overlaps(second.subnet)
            for network in (first, second):
                assert f"-i {network.bridge} " in _input_rules()
                assert (claims / str(network.slot)).read_text().strip() == str(os.getpid())
                [bridge, firewall] = network.conflist()["plugins"]  # type: ignore[misc]
                assert bridge["ipam"]["dataDir"] == str(network.home / "cni-ipam")
                assert firewall["type"] == "firewall"
        finally:
            second.close()
    finally:
        first.close()
    rules = _input_rules()
    assert [bridge for bridge in bridges if f"-i {bridge} " in rules] == []
    assert sorted(p.name for p in claims.iterdir()) == [".lock"]


def test_a_build_network_takes_over_the_slot_of_a_dead_owner(tmp_path: Path) -> None:
    claims = tmp_path / "claims"
    holder = BuildNetwork(tmp_path / "a", claims=claims)
    holder.open()
    try:
        slot = holder.slot
        (claims / str(slot)).write_text(f"{_dead_pid()}\n")  # its owner died, SIGKILLed
        taker = BuildNetwork(tmp_path / "b", claims=claims)
        taker.open()
        try:
            assert taker.slot == slot
        finally:
            taker.close()
    finally:
        holder.slot = None  # the claim is the taker's, and gone with it
    assert sorted(p.name for p in claims.iterdir()) == [".lock"]

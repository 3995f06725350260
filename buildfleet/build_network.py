"""A network of its own for the RUN steps of one local buildkitd: a CNI bridge, walled off
from the host.

Invariants:
- Each network holds one slot N of this host: bridge `bfrun-N`, subnet 10.213.N.0/24. Slots
  are claimed under a lock in a host-wide directory (`/run/buildfleet-cni`, each claim
  naming the claiming process), so fleets started side by side, by any worktree, never
  share a bridge or a subnet; a claim whose process is gone is taken over.
- A RUN step's 127.0.0.1 is its own loopback. Every packet from the bridge to this host is
  rejected (iptables and ip6tables INPUT rules on the bridge), so neither services on
  loopback nor those bound to 0.0.0.0 or the bridge's address are reachable; traffic to
  other hosts is routed and masqueraded, and the CNI firewall plugin keeps other bridges out.
- `close()` undoes `open()`: the rules go, the bridge is deleted, the claim is released.
  Both are idempotent, so a retried start (another process took the port) may reopen.

Needs root (it changes the host's firewall and links), like the rootful buildkitd it serves.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

from buildfleet.processes import ServiceError

CNI_PLUGINS = Path("/usr/lib/cni")
"""Debian's containernetworking-plugins."""
CLAIMS = Path("/run/buildfleet-cni")
_SLOTS = ipaddress.IPv4Network("10.213.0.0/16")
_ISOLATION_CHAINS = ("CNI-ISOLATION-STAGE-1", "CNI-ISOLATION-STAGE-2")
_COMMENT = "buildfleet: RUN steps do not reach this host"


class BuildNetwork:
    """The bridge network of the buildkitd whose files live in `home`."""

    def __init__(self, home: Path, *, claims: Path = CLAIMS) -> None:
        self.home = home
        self._claims = claims
        self.slot: int | None = None

    @property
    def bridge(self) -> str:
        return f"bfrun-{self._slot()}"

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return _subnet(self._slot())

    @property
    def conflist_path(self) -> Path:
        return self.home / "cni.conflist"  # buildkitd reads a list only from `.conflist`

    def buildkitd_toml(self) -> str:
        """buildkitd.toml's `[worker.oci]` network settings (v0.34.2 ignores the flags
        `--oci-cni-config-path` and `--oci-cni-binary-dir`; the file it reads)."""
        return (
            '[worker.oci]\n  networkMode = "cni"\n'
            f"  cniConfigPath = {json.dumps(str(self.conflist_path))}\n"
            f"  cniBinaryPath = {json.dumps(str(CNI_PLUGINS))}\n"
        )

    def open(self) -> None:
        """Claim a slot, write the CNI configuration and wall the bridge off from the host."""
        if os.geteuid() != 0:
            raise ServiceError("an isolated build network needs root (it adds firewall rules)")
        if not (CNI_PLUGINS / "bridge").is_file():
            raise ServiceError(f"no CNI plugins in {CNI_PLUGINS}: run scripts/setup")
        if self.slot is None:
            self.slot = _claim(self._claims)
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            self.conflist_path.write_text(json.dumps(self.conflist(), indent=2) + "\n")
            for tool, rule in self._rules():
                if not _xtables(tool, "-C", rule):
                    _xtables(tool, "-I", rule, check=True)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.slot is None:
            return
        for tool, rule in [*self._rules(), *self._isolation_rules()]:
            while _xtables(tool, "-D", rule):
                pass
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True, check=False)
        (self._claims / str(self.slot)).unlink(missing_ok=True)
        self.slot = None

    def conflist(self) -> dict[str, object]:
        """A bridge with its own subnet and address book, plus the firewall plugin (buildkitd
        adds the loopback network itself)."""
        subnet = self.subnet
        return {
            "cniVersion": "1.0.0",
            "name": self.bridge,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isDefaultGateway": True,
                    "ipMasq": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": str(subnet)}]],
                        "dataDir": str(self.home / "cni-ipam"),
                    },
                },
                {"type": "firewall", "backend": "iptables", "ingressPolicy": "same-bridge"},
            ],
        }

    def _rules(self) -> list[tuple[str, list[str]]]:
        """(tool, chain and rule): every packet from the bridge to this host is refused."""
        rule = ["INPUT", "-i", self.bridge, "-m", "comment", "--comment", _COMMENT, "-j", "REJECT"]
        return [("iptables", rule), ("ip6tables", rule)]

    def _isolation_rules(self) -> list[tuple[str, list[str]]]:
        """The rules the firewall plugin added for this bridge (it never removes them)."""
        rules = []
        for chain in _ISOLATION_CHAINS:
            listed = subprocess.run(
                ["iptables", "-w", "-S", chain], capture_output=True, text=True, check=False
            )
            for line in listed.stdout.splitlines():
                words = shlex.split(line)
                if words[:2] == ["-A", chain] and self.bridge in words:
                    rules.append(("iptables", words[1:]))
        return rules

    def _slot(self) -> int:
        if self.slot is None:
            raise ServiceError("the build network is not open")
        return self.slot


def _xtables(tool: str, action: str, rule: list[str], *, check: bool = False) -> bool:
    """`iptables` (or ip6tables) ACTION CHAIN RULE..., waiting for the host's xtables lock;
    True when it succeeded (for -C: the rule exists)."""
    argv = [tool, "-w", action, *rule]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise ServiceError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.returncode == 0


@contextlib.contextmanager
def _locked(claims: Path) -> Iterator[None]:
    claims.mkdir(mode=0o700, parents=True, exist_ok=True)
    with (claims / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _claim(claims: Path) -> int:
    """The first slot nobody alive holds, whose subnet no route of this host overlaps."""
    routed = _routed_networks()
    with _locked(claims):
        for slot in range(_SLOTS.num_addresses // 256):
            if any(_subnet(slot).overlaps(net) for net in routed):
                continue
            claim = claims / str(slot)
            if claim.exists() and _alive(claim.read_text().strip()):
                continue
            claim.write_text(f"{os.getpid()}\n")
            return slot
    raise ServiceError(f"every build network slot in {_SLOTS} is taken (claims in {claims})")


def _subnet(slot: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network((int(_SLOTS.network_address) + 256 * slot, 24))


def _alive(owner: str) -> bool:
    try:
        os.kill(int(owner), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _routed_networks() -> list[ipaddress.IPv4Network]:
    """The destinations of this host's IPv4 routes other than the default route (our own
    bridges' routes included: their claims are checked separately)."""
    networks = []
    with open("/proc/net/route") as table:
        next(table)
        for line in table:
            fields = line.split()
            dest, mask = (int(fields[i], 16).to_bytes(4, "little") for i in (1, 7))
            network = ipaddress.IPv4Network(
                (ipaddress.IPv4Address(dest), bin(int.from_bytes(mask, "big")).count("1")),
                strict=False,
            )
            if network.prefixlen:
                networks.append(network)
    return [n for n in networks if not _is_ours(n)]


def _is_ours(network: ipaddress.IPv4Network) -> bool:
    return network.subnet_of(_SLOTS)

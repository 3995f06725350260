"""Benchmark: signed GitHub pushes through one gateway process vs an aiohttp hello-world.

    python bench/bench_gateway.py [--duration 12] [--rounds 4] [--connections 32] [--threads 1]

Starts its own redis-server on a free loopback port, one gateway process (one rule, one
secret: every push enqueues a real build in Redis and supersedes the queued build of the same
repo+ref) and one aiohttp hello-world process, then runs wrk (Debian package `wrk`) against
each in turn with a Lua script that posts realistic, validly signed push payloads (several KB,
64 repo/branch combinations, a unique X-GitHub-Delivery per request), the two in turn for
`--rounds` slices each (the host's speed drifts; interleaving spreads the drift over both).
Prints req/s, the worst slice's p99, the ratio to the hello-world (overall and by round),
the CPU of each process, and the wrk command lines that reproduce a slice.

Internal modes used by the above: `--serve-gateway PORT REDIS_URL LOOP on|off`, `--serve-hello PORT`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SECRET = "bench-webhook-secret"
REPOS = [f"acme/service-{n}" for n in range(16)]
BRANCHES = ["main", "develop", "release/1.0", "release/2.0"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gateway_settings(port: int, event_loop: str = "auto", supersede: bool = True) -> object:
    from producer.gateway.settings import load_gateway_settings

    return load_gateway_settings(
        {
            "host": "127.0.0.1",
            "port": port,
            "event_loop": event_loop,
            "supersede": {"enabled": supersede},
            # The payloads repeat (wrk cannot sign new ones): measure pushes as if each were
            # new, and no limit but the gateway's own speed.
            "refuse_old_pushes": False,
            "limits": {"webhooks_per_s": 1e9, "webhook_burst": 1_000_000_000},
            "webhook_secrets": [{"repo": "acme/*", "secret": SECRET}],
            "rules": [
                {
                    "repo": "acme/*",
                    "branches": ["*"],
                    "images": [
                        "registry.local:5000/{repo}:{branch}",
                        "registry.local:5000/{repo}:{short_sha}",
                    ],
                }
            ],
        }
    )


def serve_gateway(port: int, redis_url: str, event_loop: str, supersede: bool) -> None:
    from producer.gateway.server import run_gateway
    from producer.gateway.settings import GatewaySettings
    from producer.settings import RedisSettings

    settings = gateway_settings(port, event_loop, supersede)
    assert isinstance(settings, GatewaySettings)
    run_gateway(settings, RedisSettings(url=redis_url), on_ready=lambda url: print(url, flush=True))


def serve_hello(port: int) -> None:
    from aiohttp import web

    async def hello(_request: web.Request) -> web.Response:
        return web.Response(text="Hello, World!")

    app = web.Application()
    app.router.add_get("/", hello)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def payloads() -> list[tuple[bytes, str]]:
    from test_gateway_payloads import github_push, sha_for

    out = []
    for repo in REPOS:
        for branch in BRANCHES:
            body = json.dumps(
                github_push(repo, f"refs/heads/{branch}", sha_for(repo + branch), commits=5)
            ).encode()
            signature = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            out.append((body, signature))
    return out


def lua_script(items: list[tuple[bytes, str]]) -> str:
    run = uuid.uuid4().hex[:8]
    bodies = ",\n".join(f"[==[{body.decode()}]==]" for body, _ in items)
    signatures = ",\n".join(json.dumps(sig) for _, sig in items)
    return f"""
local bodies = {{
{bodies}
}}
local signatures = {{
{signatures}
}}
local counter = 0
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)  -- a global of that thread's own Lua state
end
function request()
  counter = counter + 1
  local i = (counter % #bodies) + 1
  return wrk.format("POST", "/hooks/github", {{
    ["Content-Type"] = "application/json",
    ["X-GitHub-Event"] = "push",
    ["X-Hub-Signature-256"] = signatures[i],
    ["X-GitHub-Delivery"] = "{run}-" .. (tid or 0) .. "-" .. counter,
  }}, bodies[i])
end
"""


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far (Linux /proc)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


def schedstat(pid: int) -> tuple[float, float, int]:
    """(seconds on a core, seconds runnable but waiting for one, times it was scheduled in)
    of a process's main thread (/proc/PID/schedstat)."""
    run_ns, wait_ns, slices = Path(f"/proc/{pid}/schedstat").read_text().split()
    return int(run_ns) / 1e9, int(wait_ns) / 1e9, int(slices)


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks (/proc/stat)."""
    fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Tally:
    """One side's measured slices: requests served, each slice's p99, CPU spent, errors."""

    requests: float = 0.0
    cpu: float = 0.0
    errors: int = 0
    p99s: list[float] = field(default_factory=list)
    each: list[float] = field(default_factory=list)

    def add(self, requests: float, p99: float, cpu: float, errors: int = 0) -> None:
        self.requests += requests
        self.cpu += cpu
        self.errors += errors
        self.p99s.append(p99)
        self.each.append(requests)


def run_wrk(argv: list[str]) -> tuple[float, float, int, str]:
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99_match = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    assert p99_match, out
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99_match.group(2)]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return rate, float(p99_match.group(1)) * scale, int(non2xx.group(1)) if non2xx else 0, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=12, help="seconds of wrk per side")
    parser.add_argument(
        "--rounds", type=int, default=4, help="alternate the two sides this many times"
    )
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--event-loop",
        choices=["auto", "asyncio", "uvloop"],
        default="auto",
        help="the gateway's event loop (auto: uvloop when installed); hello-world uses asyncio's",
    )
    parser.add_argument(
        "--no-supersede",
        action="store_true",
        help="turn supersede off: pushes only enqueue (no cancel of the older queued build)",
    )
    parser.add_argument(
        "--serve-gateway", nargs=4, metavar=("PORT", "REDIS_URL", "LOOP", "SUPERSEDE")
    )
    parser.add_argument("--serve-hello", metavar="PORT")
    args = parser.parse_args()
    if args.serve_gateway:
        port, url, loop, supersede = args.serve_gateway
        serve_gateway(int(port), url, loop, supersede == "on")
        return 0
    if args.serve_hello:
        serve_hello(int(args.serve_hello))
        return 0

    wrk = shutil.which("wrk")
    redis_server = shutil.which("redis-server")
    if not wrk or not redis_server:
        print("needs wrk and redis-server (apt-get install wrk redis-server)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    redis_port, gateway_port, hello_port = free_port(), free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            subprocess.Popen(
                [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(workdir)],
                stdout=subprocess.DEVNULL,
            )
        )  # fmt: skip
        me = [sys.executable, str(Path(__file__).resolve())]
        procs.append(
            subprocess.Popen(
                [
                    *me,
                    "--serve-gateway",
                    str(gateway_port),
                    redis_url,
                    args.event_loop,
                    "off" if args.no_supersede else "on",
                ],
                env=env,
            )
        )
        procs.append(subprocess.Popen([*me, "--serve-hello", str(hello_port)], env=env))
        wait_http(f"http://127.0.0.1:{gateway_port}/readyz")
        wait_http(f"http://127.0.0.1:{hello_port}/")

        # Each wrk run has delivery ids of its own (a script of its own): a push repeating
        # an earlier run's id would be a duplicate delivery, which builds nothing.
        scripts = [workdir / f"push-{n}.lua" for n in range(args.rounds + 1)]
        for script in scripts:
            script.write_text(lua_script(payloads()))
        warm_script, round_scripts = scripts[0], scripts[1:]
        size = len(payloads()[0][0])
        slice_s = max(1, round(args.duration / args.rounds))
        common = ["-t", str(args.threads), "-c", str(args.connections), "-d", f"{slice_s}s"]
        hello_cmd = [wrk, *common, "--latency", f"http://127.0.0.1:{hello_port}/"]
        gw_cmds = [
            [wrk, *common, "--latency", "-s", str(script), f"http://127.0.0.1:{gateway_port}"]
            for script in round_scripts
        ]

        # warm up both as they are measured (connections, Redis pool, Lua scripts), then measure
        warm = [wrk, *common, "--latency"]
        run_wrk([*warm, "-s", str(warm_script), f"http://127.0.0.1:{gateway_port}"])
        run_wrk([*warm, f"http://127.0.0.1:{hello_port}/"])
        hello, gateway = Tally(), Tally()
        redis_cpu = wrk_cpu = busy = ticks = 0.0
        sched = (0.0, 0.0, 0)
        for gw_cmd in gw_cmds:  # interleaved, so that the host's drift hits both alike
            before = cpu_seconds([procs[2].pid])
            rate, p99, _, _ = run_wrk(hello_cmd)
            hello.add(rate * slice_s, p99, cpu_seconds([procs[2].pid]) - before)
            before, redis_before = cpu_seconds([procs[1].pid]), cpu_seconds([procs[0].pid])
            wrk_before, (busy_before, ticks_before) = children_cpu(), machine_busy()
            sched_before = schedstat(procs[1].pid)
            rate, p99, errors, gw_out = run_wrk(gw_cmd)
            sched_after = schedstat(procs[1].pid)
            sched = (
                sched[0] + sched_after[0] - sched_before[0],
                sched[1] + sched_after[1] - sched_before[1],
                sched[2] + sched_after[2] - sched_before[2],
            )
            gateway.add(rate * slice_s, p99, cpu_seconds([procs[1].pid]) - before, errors)
            redis_cpu += cpu_seconds([procs[0].pid]) - redis_before
            wrk_cpu += children_cpu() - wrk_before
            busy_now, ticks_now = machine_busy()
            busy, ticks = busy + busy_now - busy_before, ticks + ticks_now - ticks_before
        seconds = slice_s * args.rounds
        gw_rate, hello_rate = gateway.requests / seconds, hello.requests / seconds
        gw_requests, gw_cpu, gw_errors = gateway.requests, gateway.cpu, gateway.errors
        machine = busy / ticks

        import redis as sync_redis

        r = sync_redis.Redis.from_url(redis_url)
        queued = r.zcard("buildfleet:queue")
        builds = sum(
            1 for k in r.scan_iter("buildfleet:build:*", count=1000) if b":events" not in k
        )
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{gateway_port}/metrics").read().decode()
        superseded = re.search(
            r"^buildfleet_gateway_superseded_total (\S+)$", metrics, re.MULTILINE
        )
        duplicates = re.search(r'outcome="duplicate"\} (\S+)$', metrics, re.MULTILINE)

        from producer.gateway.server import event_loop_factory

        loop = "uvloop" if event_loop_factory(args.event_loop) else "asyncio"
        print(f"payload: {size} bytes signed GitHub push, {len(REPOS) * len(BRANCHES)} repo/refs")
        print(
            f"gateway event loop: {loop}; supersede {'off' if args.no_supersede else 'on'}; "
            f"machine load average {os.getloadavg()[0]:.2f}"
        )
        print(
            f"{args.rounds} rounds of {slice_s} s each, hello-world then gateway, worst p99 shown"
        )
        print(f"hello-world   : {hello_rate:10.0f} req/s   p99 {max(hello.p99s):7.2f} ms")
        print(
            f"gateway /hooks: {gw_rate:10.0f} req/s   p99 {max(gateway.p99s):7.2f} ms   "
            f"non-2xx {gw_errors}"
        )
        rounds = " ".join(f"{g / h:.3f}" for g, h in zip(gateway.each, hello.each, strict=True))
        print(
            f"ratio         : {gw_rate / hello_rate:.3f}x  (goal >= 0.15x, p99 < 25 ms); "
            f"by round {rounds}"
        )
        hello_us = 1e6 * hello.cpu / hello.requests
        gw_us = 1e6 * gw_cpu / gw_requests
        print(
            f"server CPU per request: hello-world {hello_us:.0f} us, gateway {gw_us:.0f} us "
            f"(+ redis {1e6 * redis_cpu / gw_requests:.0f} us); CPU-bound ratio "
            f"{hello_us / gw_us:.3f}x  (what an otherwise idle core gives)"
        )
        print(
            f"while pushing: gateway {gw_cpu / seconds:.2f} cores, Redis "
            f"{redis_cpu / seconds:.2f}, wrk {wrk_cpu / seconds:.2f}; the machine's "
            f"{os.cpu_count()} cores {100 * machine:.0f}% busy"
        )
        on_core, waiting, slices = sched
        asleep = max(0.0, seconds - on_core - waiting)
        print(
            f"the gateway's time while pushing: on a core {100 * on_core / seconds:.0f}%, "
            f"waiting for a core {100 * waiting / seconds:.0f}%, asleep with nothing to do "
            f"{100 * asleep / seconds:.0f}% ({slices / seconds:.0f} wake-ups/s, "
            f"{1e6 * asleep / max(1, slices):.0f} us asleep each: every request it holds is "
            "waiting on Redis or on wrk)"
        )
        print(
            f"builds created: {builds}  still queued: {queued}  "
            f"superseded: {superseded.group(1) if superseded else 0}  duplicate deliveries "
            f"(each builds nothing; must be 0): {duplicates.group(1) if duplicates else 0}"
        )
        print("reproduce (servers as started by this script):")
        print("  " + " ".join(hello_cmd))
        print("  " + " ".join(gw_cmds[-1]))
        print(
            f"  (python {Path(__file__).name} --serve-gateway PORT REDIS_URL LOOP on|off serves the gateway)"
        )
        if gw_errors:
            print(gw_out)
        return 0
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    sys.exit(main())

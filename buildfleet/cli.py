"""The `buildfleet` command.

Exit codes: 0 success, 1 the build failed or was cancelled, 2 bad usage or configuration,
3 infrastructure unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec

from buildfleet.config import ConfigError, FleetConfig, load_config
from buildfleet.display import describe, follow, status_lines
from buildfleet.rebuild.plan import BatchNotFound, SourceError
from producer.client import BuildfleetClient, BuildNotFound, FleetUnavailable
from producer.contract import (
    BuildRequest,
    BuildResult,
    ContractError,
    request_from_builtins,
)
from producer.policy import PolicyError, RequestPolicy
from producer.reference import ReferenceError
from producer.views import trace_id_of

EXIT_OK: Final = 0
EXIT_BUILD_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3

_json = msgspec.json.Encoder()


class UsageError(Exception):
    """Bad arguments; the message says which."""


def _pairs(values: Sequence[str] | None, option: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in values or ():
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"{option} expects NAME=VALUE, got {item!r}")
        pairs[name] = value
    return pairs


def request_from_args(args: argparse.Namespace) -> BuildRequest:
    if args.git:
        source: dict[str, Any] = {"type": "git", "url": args.git, "ref": args.ref}
        if args.commit:
            source["commit"] = args.commit
    elif args.path:
        path = Path(args.path).resolve()
        if not path.is_dir():
            raise UsageError(f"{args.path!r} is not a directory")
        source = {"type": "local", "path": str(path)}
    else:
        raise UsageError("give a local directory, or --git URL")
    request: dict[str, Any] = {
        "source": source,
        "images": args.image or [],
        "dockerfile": args.dockerfile,
        "context": args.context,
        "build_args": _pairs(args.build_arg, "--build-arg"),
        "secrets": args.secret or [],
        "labels": _pairs(args.label, "--label"),
        "platforms": args.platform or [],
        "push": not args.no_push,
        "priority": args.priority,
        "cache": {
            "import_refs": args.cache_from or [],
            "export_ref": args.cache_to,
            "disabled": args.no_cache,
        },
    }
    for key in ("target", "timeout_s", "id"):
        if getattr(args, key) is not None:
            request[key] = getattr(args, key)
    return request_from_builtins(request)


def _print_result(result: BuildResult, as_json: bool) -> int:
    if as_json:
        sys.stdout.write(_json.encode(result).decode() + "\n")
    return EXIT_OK if result.ok else EXIT_BUILD_FAILED


async def _submit(config: FleetConfig, args: argparse.Namespace) -> int:
    from opentelemetry import trace

    from worker.telemetry import configure_from_environment, current_trace_context

    request = request_from_args(args)
    # The CLI runs on the fleet's own host: a trusted producer (local directories, any git
    # host), held to the reference grammar and the timeout bound all the same.
    policy = RequestPolicy.trusted(max_timeout_s=config.queue.max_timeout_s)
    configure_from_environment()  # with OTEL_* set, the build's trace starts here
    async with BuildfleetClient.connect(config.redis, config.queue, policy=policy) as fleet:
        tracer = trace.get_tracer("buildfleet.cli")
        with tracer.start_as_current_span("buildfleet submit", kind=trace.SpanKind.PRODUCER):
            if not request.trace.traceparent and (context := current_trace_context()):
                request = msgspec.structs.replace(request, trace=context)
            build_id = await fleet.submit(request)
        if not args.wait:
            sys.stdout.write(_json.encode({"id": build_id}).decode() if args.json else build_id)
            sys.stdout.write("\n")
            return EXIT_OK
        if args.json:
            return _print_result(await fleet.wait(build_id), as_json=True)
        result = await follow(build_id, fleet.watch(build_id), logs=args.logs)
        if result is None:
            raise BuildNotFound(build_id)
        return _print_result(result, as_json=False)


async def _watch(config: FleetConfig, args: argparse.Namespace) -> int:
    async with BuildfleetClient.connect(config.redis, config.queue) as fleet:
        if args.json:
            result = None
            async for event in fleet.watch(args.build_id):
                sys.stdout.write(_json.encode(event).decode() + "\n")
                sys.stdout.flush()
            result = await fleet.wait(args.build_id)
            return EXIT_OK if result.ok else EXIT_BUILD_FAILED
        result = await follow(args.build_id, fleet.watch(args.build_id), logs=args.logs)
        if result is None:
            raise BuildNotFound(args.build_id)
        return _print_result(result, as_json=False)


async def _get(config: FleetConfig, args: argparse.Namespace) -> int:
    async with BuildfleetClient.connect(config.redis, config.queue) as fleet:
        state = await fleet.get(args.build_id)
    trace_id = trace_id_of(state.request)
    trace_url = config.telemetry.trace_url(trace_id) if trace_id else None
    if args.json:
        answer = msgspec.to_builtins(state)
        answer.update(trace_id=trace_id, trace_url=trace_url)
        sys.stdout.write(_json.encode(answer).decode() + "\n")
        return EXIT_OK
    result = state.result
    lines = [
        ("build", state.build_id),
        ("status", f"{state.status} (attempt {state.attempt})"),
        ("digest", result.digest if result else None),
        ("error", f"{result.error_class}: {result.error}" if result and result.error else None),
        ("trace", trace_id or "none (submitted without a trace context)"),
        ("link", trace_url),
    ]
    sys.stdout.writelines(f"{name:>7}  {value}\n" for name, value in lines if value)
    return EXIT_OK


async def _cancel(config: FleetConfig, args: argparse.Namespace) -> int:
    async with BuildfleetClient.connect(config.redis, config.queue) as fleet:
        outcome = await fleet.cancel(args.build_id, reason=args.reason)
        sys.stdout.write(f"{args.build_id}: {outcome.value}\n")
        return EXIT_OK


async def _events(config: FleetConfig, args: argparse.Namespace) -> int:
    async with BuildfleetClient.connect(config.redis, config.queue) as fleet:
        async for event in fleet.tail(from_start=args.from_start):
            line = _json.encode(event).decode() if args.json else describe(event)
            sys.stdout.write(line if args.json else f"[{event.build_id}] {line}")
            sys.stdout.write("\n")
            sys.stdout.flush()
    return EXIT_OK


async def _status(config: FleetConfig, args: argparse.Namespace) -> int:
    async with BuildfleetClient.connect(config.redis, config.queue) as fleet:
        status = await fleet.status()
    if args.json:
        sys.stdout.write(_json.encode(status).decode() + "\n")
    else:
        sys.stdout.write("\n".join(status_lines(status)) + "\n")
    return EXIT_OK


def _rate(text: str) -> float:
    """`N`, `N/s` or `N/m` submissions; per second."""
    number, _, unit = text.partition("/")
    per = {"": 1.0, "s": 1.0, "m": 60.0}.get(unit)
    try:
        rate = float(number) / per if per else 0.0
    except ValueError:
        rate = 0.0
    if not rate > 0 or rate == float("inf"):
        raise argparse.ArgumentTypeError(
            f"expected a positive rate like 20, 20/s or 600/m, got {text!r}"
        )
    return rate


def _resume_hint(argv: Sequence[str], batch_id: str) -> str:
    """The command line that resumes this batch: this one, with --batch set."""
    kept: list[str] = []
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word == "--batch":
            skip = True
        elif not word.startswith("--batch="):
            kept.append(word)
    return shlex.join(["buildfleet", *kept, "--batch", batch_id])


def _rebuild_sources(config: FleetConfig, args: argparse.Namespace) -> Sources:
    from buildfleet.rebuild.command import Sources
    from buildfleet.rebuild.reference import parse_reference
    from buildfleet.rebuild.skaffold import SkaffoldOptions

    return Sources(
        paths=tuple(args.sources),
        rules=args.rules,
        gateway_rules=config.gateway.rules,
        clone_url=args.clone_url,
        repos=tuple(args.repo or ()),
        skaffold=SkaffoldOptions(
            profiles=tuple(args.profile or ()), default_repo=args.default_repo, tag=args.tag
        ),
        base=parse_reference(args.base) if args.base else None,
        build_args=_pairs(args.build_arg, "--build-arg"),
    )


async def _rebuild(config: FleetConfig, args: argparse.Namespace) -> int:
    import tempfile

    from rich.console import Console

    from buildfleet.rebuild import command as batch
    from buildfleet.rebuild.console import Progress, print_plan
    from buildfleet.rebuild.gitread import GitReader

    out = Console(file=sys.stderr)
    for report in (args.report, args.junit):
        if report is not None and not report.resolve().parent.is_dir():
            raise UsageError(f"{report}: its directory does not exist")
    if args.cancel or args.follow:
        if args.sources or args.rules:
            raise UsageError("--cancel and --follow name a batch; give no sources with them")
        async with BuildfleetClient.connect(config.redis, config.queue) as fleet:
            if args.cancel:
                counts = await batch.cancel_batch(fleet, batch.check_batch_id(args.cancel))
                done = ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))
                out.print(f"batch {args.cancel} cancelled: {done or 'no builds'}")
                return EXIT_OK
            report = await batch.follow_batch(
                fleet, batch.check_batch_id(args.follow), Progress(out)
            )
            batch.write_reports(report, args.report, args.junit)
    else:
        batch_id = batch.check_batch_id(args.batch) if args.batch else batch.new_batch_id()
        sources = _rebuild_sources(config, args)
        with tempfile.TemporaryDirectory(prefix="buildfleet-rebuild-") as workdir:
            plan = await batch.make_plan(sources, GitReader(Path(workdir)))
        if args.dry_run:
            print_plan(plan, as_json=args.json, out=out)
            return EXIT_BUILD_FAILED if any(r.status == "failed" for r in plan.refused) else EXIT_OK
        options = batch.RunOptions(
            batch_id=batch_id,
            rate=args.rate,
            max_in_flight=args.max_in_flight,
            wait=args.wait or args.report is not None or args.junit is not None,
            resume_hint=_resume_hint(args.argv, batch_id),
            base=args.base,
            report_json=args.report,
            report_junit=args.junit,
        )
        async with BuildfleetClient.connect(config.redis, config.queue) as fleet:
            report = await batch.run_batch(fleet, plan, options, Progress(out))
    if args.json:
        sys.stdout.write(_json.encode(report).decode() + "\n")
    return EXIT_BUILD_FAILED if report.failed else EXIT_OK


async def _dlq(config: FleetConfig, args: argparse.Namespace) -> int:
    async with BuildfleetClient.connect(config.redis, config.queue) as fleet:
        if args.action == "replay":
            if not args.build_id:
                raise UsageError("dlq replay needs the build id")
            new_id = await fleet.replay(args.build_id)
            sys.stdout.write(
                (_json.encode({"id": new_id}).decode() if args.json else new_id) + "\n"
            )
            return EXIT_OK
        for letter in await fleet.dead_letters(count=args.count):
            if args.json:
                sys.stdout.write(_json.encode(letter).decode() + "\n")
            else:
                sys.stdout.write(f"{letter.build_id}  {letter.reason}\n")
        return EXIT_OK


async def _worker(config: FleetConfig, args: argparse.Namespace) -> int:
    from worker.app import run_worker
    from worker.telemetry import configure_from_environment

    overrides = {"concurrency": args.concurrency, "metrics_port": args.metrics_port}
    if changed := {name: value for name, value in overrides.items() if value is not None}:
        config = msgspec.structs.replace(
            config, worker=msgspec.structs.replace(config.worker, **changed)
        )
    configure_from_environment(prometheus=config.worker.metrics_port is not None)
    await run_worker(config.for_worker(), burst=args.burst)
    return EXIT_OK


def _gateway(config: FleetConfig, args: argparse.Namespace) -> int:
    from producer.gateway.server import run_gateway
    from worker.telemetry import configure_from_environment

    configure_from_environment()

    run_gateway(config.gateway, config.redis, config.queue, telemetry=config.telemetry)
    return EXIT_OK


def _up(config: FleetConfig, args: argparse.Namespace) -> int:
    from buildfleet.local_fleet import run_local_fleet

    return run_local_fleet(config, workers=args.workers, as_json=args.json, backend=args.backend)


def _add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", help="a local directory to build")
    parser.add_argument("--git", metavar="URL", help="build a git repository instead")
    parser.add_argument("--ref", default="HEAD", help="branch or tag (with --git)")
    parser.add_argument("--commit", help="exact commit to build (with --git)")
    parser.add_argument("--image", action="append", help="image name to push (repeatable)")
    parser.add_argument("--dockerfile", default="Dockerfile", help="relative to the context")
    parser.add_argument("--context", default=".", help="sub-directory of the source")
    parser.add_argument("--build-arg", action="append", metavar="NAME=VALUE")
    parser.add_argument(
        "--secret",
        action="append",
        metavar="ID",
        help="a [[worker.secrets]] id the Dockerfile mounts (RUN --mount=type=secret,id=ID)",
    )
    parser.add_argument("--label", action="append", metavar="NAME=VALUE")
    parser.add_argument("--target")
    parser.add_argument("--platform", action="append")
    parser.add_argument("--no-push", action="store_true")
    parser.add_argument("--priority", choices=("interactive", "batch"), default="interactive")
    parser.add_argument("--timeout", dest="timeout_s", type=float, metavar="SECONDS")
    parser.add_argument("--id", help="build id (submitting the same id twice builds once)")
    parser.add_argument("--cache-from", action="append", metavar="REF")
    parser.add_argument("--cache-to", metavar="REF")
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--wait", action="store_true", help="follow the build until it ends")
    parser.add_argument("--logs", action="store_true", help="with --wait: print build output")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _add_rebuild_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "sources",
        nargs="*",
        help="TOML manifests, Skaffold configs (file, directory, or URL#REF[:PATH]); "
        "none: the gateway's rules",
    )
    parser.add_argument("--base", metavar="IMAGE", help="only images built FROM this image")
    parser.add_argument("--build-arg", action="append", metavar="NAME=VALUE")
    parser.add_argument("--dry-run", action="store_true", help="print what would be built")
    parser.add_argument("--batch", metavar="ID", help="the batch's id: the same id resumes it")
    parser.add_argument("--rate", type=_rate, default=20.0, help="submissions: N, N/s or N/m")
    parser.add_argument("--max-in-flight", type=_positive_int, metavar="N")
    parser.add_argument("--wait", action="store_true", help="follow the batch to its end")
    parser.add_argument("--report", type=Path, metavar="FILE.json")
    parser.add_argument("--junit", type=Path, metavar="FILE.xml")
    parser.add_argument("--profile", "-p", action="append", help="Skaffold profile")
    parser.add_argument("--default-repo", metavar="REGISTRY/PATH", help="for Skaffold images")
    parser.add_argument("--tag", help="for Skaffold images (default: the commit, or latest)")
    parser.add_argument("--rules", action="store_true", help="the gateway's configured rules")
    parser.add_argument("--clone-url", metavar="TEMPLATE", help="with rules: git://host/{repo}.git")
    parser.add_argument("--repo", action="append", metavar="OWNER/NAME", help="for rule globs")
    parser.add_argument("--cancel", metavar="BATCH", help="cancel a batch's builds")
    parser.add_argument("--follow", metavar="BATCH", help="follow a batch's builds to the end")


if TYPE_CHECKING:
    from buildfleet.rebuild.command import Sources

Command = Callable[[FleetConfig, argparse.Namespace], Coroutine[Any, Any, int]]


def make_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="fleet configuration (TOML)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("-v", "--verbose", action="store_true")
    parser = argparse.ArgumentParser(
        prog="buildfleet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return subparsers.add_parser(name, help=help_text, parents=[common])

    up = command("up", "a whole local fleet on this machine")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument(
        "--backend",
        choices=("buildkit", "docker", "buildah"),
        default="buildkit",
        help="the builder the fleet runs on (its own buildkitd or dockerd; buildah needs none)",
    )
    up.set_defaults(sync_handler=_up)

    gateway = command("gateway", "the HTTP gateway: webhooks and the REST API")
    gateway.set_defaults(sync_handler=_gateway)

    worker = command("worker", "one worker process")
    worker.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    worker.add_argument("--concurrency", type=int)
    worker.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve /metrics (Prometheus), /healthz and /readyz on this port",
    )
    worker.set_defaults(handler=_worker)

    submit = command("submit", "submit one build")
    _add_submit_arguments(submit)
    submit.set_defaults(handler=_submit)

    for name, handler, help_text in (
        ("watch", _watch, "live progress of one build until it ends"),
        ("get", _get, "the current state or result of one build"),
        ("cancel", _cancel, "cancel a build"),
    ):
        sub = command(name, help_text)
        sub.add_argument("build_id")
        sub.set_defaults(handler=handler)
        if name == "watch":
            sub.add_argument("--logs", action="store_true")
        if name == "cancel":
            sub.add_argument("--reason", default="cancelled by request")

    status = command("status", "queue depth, running builds, workers alive")
    status.set_defaults(handler=_status)
    events = command("events", "tail the fleet's event stream")
    events.add_argument("--from-start", action="store_true")
    events.set_defaults(handler=_events)
    rebuild = command(
        "rebuild", "a batch: manifests, Skaffold configs or the gateway's rules, paced and capped"
    )
    _add_rebuild_arguments(rebuild)
    rebuild.set_defaults(handler=_rebuild)

    dlq = command("dlq", "dead-lettered builds: list them, or replay one")
    dlq.add_argument("action", choices=("list", "replay"))
    dlq.add_argument("build_id", nargs="?")
    dlq.add_argument("--count", type=int, default=50)
    dlq.set_defaults(handler=_dlq)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose or args.command in ("worker", "up") else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(args.config)
        if sync_handler := getattr(args, "sync_handler", None):
            return int(sync_handler(config, args))
        handler: Command = args.handler
        return asyncio.run(handler(config, args))
    except (
        ConfigError,
        ContractError,
        PolicyError,
        UsageError,
        SourceError,
        ReferenceError,
    ) as exc:
        print(f"buildfleet: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (BuildNotFound, BatchNotFound) as exc:
        print(f"buildfleet: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FleetUnavailable, OSError) as exc:
        print(f"buildfleet: infrastructure unreachable: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

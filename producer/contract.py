"""The message contract between producers and workers.

Everything that crosses Redis is one of these Structs, encoded by msgspec. Queued messages
outlive deploys, so every field added later must have a default, and decoders ignore fields
they do not know (a newer producer's message is still processed by an older worker).
"""

from __future__ import annotations

import os
import time
from typing import Annotated, Final, Literal, TypeVar

import msgspec

from producer import reference
from producer.fields import PositiveFloat, Priority

BUILD_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

BuildId = Annotated[str, msgspec.Meta(pattern=BUILD_ID_PATTERN)]
ImageName = Annotated[
    str, msgspec.Meta(pattern=reference.REFERENCE_PATTERN, max_length=reference.MAX_LENGTH)
]
"""An image or cache reference (producer.reference): never an option string."""
GitRef = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9._/+-]*$", max_length=255)]
BuildArgName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=255)]
SECRET_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # noqa: S105 (a grammar)
MAX_SECRETS: Final = 16
SecretId = Annotated[str, msgspec.Meta(pattern=SECRET_ID_PATTERN)]
"""A build secret's id: what `RUN --mount=type=secret,id=ID` names. Only the id ever
travels; the value lives on the worker ([[worker.secrets]])."""


class ContractError(ValueError):
    """A message does not follow the contract; the text names the field and what was expected."""


def new_build_id() -> str:
    """A time-ordered, URL-safe id: milliseconds since the epoch, then 48 random bits."""
    return f"{time.time_ns() // 1_000_000:012x}-{os.urandom(6).hex()}"


class GitSource(msgspec.Struct, frozen=True, tag="git", forbid_unknown_fields=False):
    """A git repository. `commit` pins the exact revision; otherwise `ref` is resolved."""

    url: Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]
    ref: GitRef = "HEAD"
    commit: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{7,64}$")] | None = None

    @property
    def revision(self) -> str:
        return self.commit or self.ref


class LocalSource(msgspec.Struct, frozen=True, tag="local"):
    """A directory on the worker's own filesystem (local fleets and tests)."""

    path: Annotated[str, msgspec.Meta(min_length=1)]


Source = GitSource | LocalSource

ModulePath = Annotated[
    str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.][A-Za-z0-9._/-]*$", max_length=1024)
]
"""A project directory inside the source: relative, never an option (no leading '-')."""
JavaClassName = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z_$][A-Za-z0-9_$]*(\.[A-Za-z_$][A-Za-z0-9_$]*)*$", max_length=512
    ),
]


class JibRecipe(
    msgspec.Struct,
    frozen=True,
    tag="jib",
    tag_field="type",
    omit_defaults=True,
    forbid_unknown_fields=True,
):
    """Build a Java project's image with Jib instead of a Dockerfile.

    `module` is the directory of the project's build file (pom.xml) inside the source;
    `base_image` replaces the project's own `from` image; `main_class` its entrypoint's
    class (else Jib infers it). Gradle is in the grammar; backends answer whether they
    build it. Unknown fields are refused, unlike elsewhere in the contract: a recipe field
    an older worker ignored would build a different image than the one asked for."""

    tool: Literal["maven", "gradle"] = "maven"
    module: ModulePath = "."
    base_image: ImageName | None = None
    main_class: JavaClassName | None = None

    def __post_init__(self) -> None:
        if ".." in self.module.split("/"):
            raise ValueError(
                f"Expected a relative module path inside the source, got {self.module!r}"
            )


Recipe = JibRecipe
"""How to build, when not from a Dockerfile (a tagged union as recipes are added)."""


class CachePolicy(msgspec.Struct, frozen=True, omit_defaults=True):
    """Registry cache: import from `import_refs`, export to `export_ref` (registry
    references only)."""

    import_refs: tuple[ImageName, ...] = ()
    export_ref: ImageName | None = None
    mode: Literal["min", "max"] = "max"
    disabled: bool = False


class TraceContext(msgspec.Struct, frozen=True, omit_defaults=True):
    """W3C trace context of the producer, so a build's spans join the caller's trace."""

    traceparent: str | None = None
    tracestate: str | None = None


class BuildRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One image build, as a producer asks for it."""

    source: Source
    images: tuple[ImageName, ...] = ()
    id: BuildId = msgspec.field(default_factory=new_build_id)
    dockerfile: str = "Dockerfile"
    context: str = "."
    recipe: Recipe | None = None
    """None: build `dockerfile`; else the recipe says how."""
    build_args: dict[BuildArgName, str] = msgspec.field(default_factory=dict)
    secrets: Annotated[tuple[SecretId, ...], msgspec.Meta(max_length=MAX_SECRETS)] = ()
    """Ids of the worker's secrets the Dockerfile mounts (`RUN --mount=type=secret,id=ID`)."""
    target: str | None = None
    platforms: tuple[str, ...] = ()
    push: bool = True
    cache: CachePolicy = CachePolicy()
    priority: Priority = "interactive"
    tenant: str = "default"
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    timeout_s: PositiveFloat | None = None
    supersede_key: str | None = None
    trace: TraceContext = TraceContext()
    submitted_at: float = 0.0

    def __post_init__(self) -> None:
        for field, path in (("dockerfile", self.dockerfile), ("context", self.context)):
            if path.startswith("/") or ".." in path.split("/"):
                raise ValueError(
                    f"Expected a relative path inside the source, got {path!r} - at `$.{field}`"
                )
        if len(self.secrets) > MAX_SECRETS:
            raise ValueError(f"Expected at most {MAX_SECRETS} secrets - at `$.secrets`")
        if len(set(self.secrets)) != len(self.secrets):
            raise ValueError("Expected each secret id once - at `$.secrets`")
        if self.push and not self.images:
            raise ValueError("Expected at least one image name when push is true - at `$.images`")
        if self.recipe is not None:
            self._check_recipe_fields()

    def _check_recipe_fields(self) -> None:
        """A recipe replaces the Dockerfile: its fields would be silently ignored."""
        for field, value, default in (
            ("dockerfile", self.dockerfile, "Dockerfile"),
            ("target", self.target, None),
            ("build_args", self.build_args, {}),
        ):
            if value != default:
                raise ValueError(
                    f"A {self.recipe_kind} recipe builds no Dockerfile: drop `{field}` "
                    f"- at `$.{field}`"
                )

    @property
    def cache_key(self) -> str:
        """What decides which daemon holds this build's cache: the repository + dockerfile."""
        match self.source:
            case GitSource(url=url):
                origin = url
            case LocalSource(path=path):
                origin = path
        match self.recipe:
            case JibRecipe(module=module):
                return f"{origin}::{self.context}::jib:{module}"
            case None:
                return f"{origin}::{self.context}::{self.dockerfile}"

    @property
    def recipe_kind(self) -> str:
        """What the request builds from: "dockerfile", or its recipe's type ("jib")."""
        return "dockerfile" if self.recipe is None else "jib"


Status = Literal[
    "queued", "running", "retrying", "succeeded", "failed", "cancelled", "dead_lettered"
]
TERMINAL_STATUSES: Final = frozenset({"succeeded", "failed", "cancelled", "dead_lettered"})


class BuildResult(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """How a build ended."""

    build_id: str
    status: Status
    digest: str | None = None
    images: tuple[str, ...] = ()
    attempts: int = 1
    backend: str | None = None
    daemon: str | None = None
    queue_wait_s: float = 0.0
    capacity_wait_s: float = 0.0
    build_s: float = 0.0
    error_class: str | None = None
    error: str | None = None
    failed_step: str | None = None
    log_tail: tuple[str, ...] = ()
    finished_at: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"


class _Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", omit_defaults=True):
    build_id: str
    attempt: int = 1
    at: float = msgspec.field(default_factory=time.time)


class Queued(_Event, tag="queued", frozen=True):
    priority: Priority = "interactive"


class Started(_Event, tag="started", frozen=True):
    worker: str = ""
    backend: str = ""
    daemon: str | None = None


class Step(_Event, tag="step", frozen=True):
    """A BuildKit vertex (or Kaniko stage) that started, finished, was cached or failed."""

    vertex: str
    name: str
    cached: bool = False
    started: float | None = None
    completed: float | None = None
    error: str | None = None


class Log(_Event, tag="log", frozen=True):
    text: str
    vertex: str | None = None
    stream: Literal[1, 2] = 1


class Retrying(_Event, tag="retrying", frozen=True):
    reason: str
    error_class: str = ""
    next_attempt_at: float = 0.0


class _Ended(_Event, frozen=True):
    result: BuildResult
    reason: str = ""


class Succeeded(_Ended, tag="succeeded", frozen=True):
    pass


class Failed(_Ended, tag="failed", frozen=True):
    pass


class Cancelled(_Ended, tag="cancelled", frozen=True):
    pass


class DeadLettered(_Ended, tag="dead_lettered", frozen=True):
    pass


BuildEvent = (
    Queued | Started | Step | Log | Retrying | Succeeded | Failed | Cancelled | DeadLettered
)
TerminalEvent = Succeeded | Failed | Cancelled | DeadLettered


def is_terminal(event: BuildEvent) -> bool:
    """Whether the event ends its build (succeeded, failed, cancelled, dead-lettered)."""
    return isinstance(event, _Ended)


def result_of(event: BuildEvent) -> BuildResult | None:
    """The result a terminal event carries; None for every other event."""
    return event.result if isinstance(event, _Ended) else None


class BuildState(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What `get` answers: where a build stands now, and its result once it has ended."""

    build_id: str
    status: Status
    attempt: int = 1
    request: BuildRequest | None = None
    result: BuildResult | None = None


# One encoder and one decoder per type, created once.
_T = TypeVar("_T")
_json_encoder: Final = msgspec.json.Encoder()
_request_decoder: Final = msgspec.json.Decoder(BuildRequest)
_event_decoder: Final[msgspec.json.Decoder[BuildEvent]] = msgspec.json.Decoder(BuildEvent)
_result_decoder: Final = msgspec.json.Decoder(BuildResult)
_state_decoder: Final = msgspec.json.Decoder(BuildState)


def encode(message: msgspec.Struct) -> bytes:
    return _json_encoder.encode(message)


def _decode(decoder: msgspec.json.Decoder[_T], data: bytes | str, what: str) -> _T:
    try:
        return decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ContractError(f"invalid {what}: {exc}") from exc
    except RecursionError as exc:
        raise ContractError(f"invalid {what}: JSON nested too deeply") from exc


class _Kind(msgspec.Struct):
    type: str


_kind_decoder: Final = msgspec.json.Decoder(_Kind)


def event_kind(data: bytes) -> str:
    """An encoded event's tag ("step", "succeeded", ...), without decoding the rest of it."""
    return _kind_decoder.decode(data).type


def decode_request(data: bytes | str) -> BuildRequest:
    return _decode(_request_decoder, data, "build request")


def decode_event(data: bytes | str) -> BuildEvent:
    return _decode(_event_decoder, data, "build event")


def decode_result(data: bytes | str) -> BuildResult:
    return _decode(_result_decoder, data, "build result")


def decode_state(data: bytes | str) -> BuildState:
    return _decode(_state_decoder, data, "build state")


def request_from_builtins(obj: object) -> BuildRequest:
    """Validate a request given as plain Python data (parsed JSON, a CLI's arguments)."""
    try:
        return msgspec.convert(obj, BuildRequest)
    except msgspec.ValidationError as exc:
        raise ContractError(f"invalid build request: {exc}") from exc

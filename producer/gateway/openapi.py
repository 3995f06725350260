"""The OpenAPI 3.1 document served at /openapi.json: every route the gateway has, with the
statuses it answers. Request and state schemas come from the message contract itself."""

from __future__ import annotations

from typing import Any, Final

import msgspec

from producer import policy
from producer.contract import BUILD_ID_PATTERN, BuildEvent, BuildRequest, BuildState
from producer.gateway.settings import GatewaySettings
from producer.gateway.webhooks import DELIVERY_ID_PATTERN, REPOSITORY_PATTERN
from producer.settings import QueueSettings
from producer.views import BuildSummary, FleetView

LIST_DEFAULT: Final = 50
LIST_MAX: Final = 200
"""GET /v1/builds: how many builds it lists unless asked, and at most."""

STREAM_ID_PATTERN: Final = r"^\d{1,19}-\d{1,19}$"
"""A Redis stream id (19 digits each side always fit the 64-bit parts Redis accepts)."""
_REF: Final = "#/components/schemas/{name}"
_RELATIVE_PATH: Final = r"^(?!/)(?!(.*/)?\.\.(/|$))"
_STR: Final = {"type": "string"}
_NULLABLE_STR: Final = {"type": ["string", "null"]}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF.format(name=name)}


def _answer(description: str, schema: str = "Error") -> dict[str, Any]:
    return {"description": description, "content": _json(_ref(schema))}


_RETRY_AFTER: Final = {
    "Retry-After": {"description": "seconds", "schema": {"type": "integer", "minimum": 1}}
}
_WEBHOOK_ERRORS: Final = {
    "400": _answer("Malformed JSON, a malformed payload or a missing delivery id"),
    "401": _answer("Missing or invalid signature (or GitLab token): nothing was enqueued"),
    "409": _answer(
        "The pushed commit was already built for the ref, or the ref has moved past it: "
        "nothing was enqueued"
    ),
    "413": _answer("Body larger than the configured limit"),
    "429": {
        **_answer("Too many deliveries for the repository, or the queue or tenant is full"),
        "headers": _RETRY_AFTER,
    },
    "503": _answer("The build queue (Redis) is unreachable: nothing was enqueued"),
}
_API_ERRORS: Final = {
    "401": _answer("Missing or invalid bearer token"),
    "429": {**_answer("Too many requests for this token"), "headers": _RETRY_AFTER},
    "503": _answer("The build queue (Redis) is unreachable"),
}


def _header(
    name: str, description: str, required: bool = False, pattern: str | None = None
) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if required:
        schema["minLength"] = 1
    if pattern:
        schema["pattern"] = pattern
    return {
        "name": name,
        "in": "header",
        "required": required,
        "description": description,
        "schema": schema,
    }


def _object(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


_COMMIT: Final = {"anyOf": [_object([], id=_STR), {"type": "null"}]}
_SHA: Final = {"type": ["string", "null"]}
_REPO: Final = _object(["full_name"], full_name={"type": "string", "pattern": REPOSITORY_PATTERN})
_PAYLOADS: Final = {
    # What the gateway reads of each forge's payload (everything else is ignored). A signed
    # event without a repository (project) is acknowledged and ignored.
    "github": _object(
        [],
        repository=_REPO,
        organization=_object([], login=_STR),
        installation=_object([], id={"type": ["integer", "null"]}),
        ref={"type": ["string", "null"]},
        before=_SHA,
        after=_SHA,
        deleted={"type": "boolean"},
        head_commit=_COMMIT,
    ),
    "gitlab": _object(
        [],
        project=_object(
            ["path_with_namespace"],
            path_with_namespace={"type": "string", "pattern": REPOSITORY_PATTERN},
        ),
        ref={"type": ["string", "null"]},
        before=_SHA,
        after=_SHA,
        checkout_sha=_SHA,
    ),
    "gitea": _object(
        [],
        repository=_REPO,
        ref={"type": ["string", "null"]},
        ref_type={"type": ["string", "null"]},
        before=_SHA,
        after=_SHA,
        head_commit=_COMMIT,
    ),
}


def _webhook(forge: str, headers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "post": {
            "operationId": f"{forge}Webhook",
            "summary": f"A signed {forge} push webhook",
            "tags": ["webhooks"],
            "parameters": headers,
            "requestBody": {
                "required": True,
                "content": _json(
                    {**_PAYLOADS[forge], "description": f"{forge}'s push payload, as it sends it"}
                ),
            },
            "responses": {
                "200": _answer("A ping, or a repeated delivery: the builds it made", "HookReply"),
                "202": _answer(
                    "Accepted: the builds made (none for a deleted ref, an ignored event, an "
                    "event naming no repository or a ref no rule matches; the message says so)",
                    "HookReply",
                ),
                **_WEBHOOK_ERRORS,
            },
        }
    }


def _view_paths() -> dict[str, Any]:
    """The fleet's state for the web view, and the web view's page."""
    return {
        "/v1/fleet": {
            "get": {
                "operationId": "getFleet",
                "summary": "Builds waiting and running, the workers, the daemons' load",
                "description": "Fleet-wide, without build ids (they may be another tenant's).",
                "tags": ["fleet"],
                "security": [{"bearer": []}],
                "responses": {"200": _answer("The fleet", "FleetView"), **_API_ERRORS},
            }
        },
        "/ui": {
            "get": {
                "operationId": "webView",
                "summary": "The web view: a static page that asks for a token",
                "tags": ["operations"],
                "responses": {
                    "200": {
                        "description": "HTML, under a strict Content-Security-Policy",
                        "content": {"text/html": {"schema": _STR}},
                    }
                },
            }
        },
    }


def _build_id_parameter() -> dict[str, Any]:
    return {
        "name": "build_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": BUILD_ID_PATTERN},
    }


def openapi_document(settings: GatewaySettings, queue: QueueSettings) -> dict[str, Any]:
    (_req, _state, _event, _summary, _fleet), components = msgspec.json.schema_components(
        [BuildRequest, BuildState, BuildEvent, BuildSummary, FleetView], ref_template=_REF
    )
    components["BuildEvent"] = _event
    components["BuildView"] = {
        "allOf": [
            _ref("BuildState"),
            _object([], trace_id=_NULLABLE_STR, trace_url=_NULLABLE_STR),
        ]
    }
    components["BuildList"] = _object(
        ["builds"], builds={"type": "array", "items": _ref("BuildSummary")}
    )
    request = components["BuildRequest"]
    properties = request["properties"]
    for field in ("dockerfile", "context"):
        properties[field]["pattern"] = _RELATIVE_PATH
    # What the policy (producer.policy) checks that the contract does not say.
    properties["timeout_s"]["anyOf"][0]["maximum"] = queue.max_timeout_s
    properties["platforms"]["items"]["pattern"] = policy.PLATFORM_PATTERN
    properties["target"]["anyOf"][0]["pattern"] = policy.TARGET_PATTERN
    trace = components["TraceContext"]["properties"]
    trace["traceparent"]["anyOf"][0]["pattern"] = policy.TRACEPARENT_PATTERN
    trace["tracestate"]["anyOf"][0]["maxLength"] = policy.TRACESTATE_MAX
    # What msgspec cannot say by itself: pushing needs an image name; a secret is named once;
    # a recipe (it builds no Dockerfile) leaves the Dockerfile's fields at their defaults.
    properties["secrets"]["uniqueItems"] = True
    request["allOf"] = [
        {
            "if": {"properties": {"push": {"const": True}}},
            "then": {"required": ["images"], "properties": {"images": {"minItems": 1}}},
        },
        {
            "if": {"required": ["recipe"], "properties": {"recipe": {"type": "object"}}},
            "then": {
                "properties": {
                    "dockerfile": {"const": "Dockerfile"},
                    "target": {"type": "null"},
                    "build_args": {"maxProperties": 0},
                }
            },
        },
    ]
    components["Error"] = {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
    }
    components["HookReply"] = {
        "type": "object",
        "properties": {
            "message": {"type": "string"},
            "repo": {"type": "string"},
            "ref": {"type": "string"},
            "sha": {"type": "string"},
            "duplicate": {"type": "boolean"},
            "builds": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id"],
                    "properties": {
                        "id": {"type": "string"},
                        "images": {"type": "array", "items": {"type": "string"}},
                        "rule": {"type": "integer"},
                        "superseded": {"type": "string"},
                    },
                },
            },
            "skipped": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"rule": {"type": "integer"}, "reason": {"type": "string"}},
                },
            },
        },
    }
    components["Submitted"] = {
        "type": "object",
        "required": ["id", "created"],
        "properties": {
            "id": {"type": "string"},
            "created": {"type": "boolean"},
            "superseded": {"type": "string"},
        },
    }
    components["CancelReply"] = {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "outcome": {"type": "string", "enum": ["cancelled", "signalled", "ended"]},
            "error": {"type": "string"},
        },
    }
    components["Status"] = {"type": "object", "properties": {"status": {"type": "string"}}}
    build_id = _build_id_parameter()
    paths: dict[str, Any] = {
        "/hooks/github": _webhook(
            "github",
            [
                _header("X-Hub-Signature-256", "sha256=<HMAC-SHA256 of the body, hex>", True),
                _header("X-GitHub-Event", "push builds, ping answers, others are ignored", True),
                _header("X-GitHub-Delivery", "delivery id", True, DELIVERY_ID_PATTERN),
            ],
        ),
        "/hooks/gitlab": _webhook(
            "gitlab",
            [
                _header("X-Gitlab-Token", "the webhook's secret token", True),
                _header("X-Gitlab-Event", "Push Hook or Tag Push Hook; others are ignored", True),
                _header("X-Gitlab-Event-UUID", "delivery id", True, DELIVERY_ID_PATTERN),
            ],
        ),
        "/hooks/gitea": _webhook(
            "gitea",
            [
                _header(
                    "X-Gitea-Signature",
                    "HMAC-SHA256 of the body, hex (or X-Forgejo-Signature)",
                    True,
                ),
                _header(
                    "X-Gitea-Event",
                    "push builds, delete is acknowledged (or X-Forgejo-Event)",
                    True,
                ),
                _header("X-Gitea-Delivery", "delivery id", True, DELIVERY_ID_PATTERN),
            ],
        ),
        **_view_paths(),
        "/v1/builds": {
            "get": {
                "operationId": "listBuilds",
                "summary": "This token's tenant's newest builds, newest first",
                "tags": ["builds"],
                "security": [{"bearer": []}],
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "description": f"how many (default {LIST_DEFAULT})",
                        "schema": {"type": "integer", "minimum": 1, "maximum": LIST_MAX},
                    }
                ],
                "responses": {
                    "200": _answer("The builds", "BuildList"),
                    "400": _answer(f"limit is not a whole number from 1 to {LIST_MAX}"),
                    **_API_ERRORS,
                },
            },
            "post": {
                "operationId": "submitBuild",
                "summary": "Enqueue one build",
                "tags": ["builds"],
                "security": [{"bearer": []}],
                "requestBody": {"required": True, "content": _json(_ref("BuildRequest"))},
                "responses": {
                    "200": _answer("A build with this id existed already", "Submitted"),
                    "202": _answer("Enqueued", "Submitted"),
                    "400": _answer("Not a valid BuildRequest (the reason names the field)"),
                    "403": _answer(
                        "Not allowed for this token: a source, image, cache reference, "
                        "priority or tenant outside its scope (the reason names the field)"
                    ),
                    "409": _answer("The id is another tenant's build"),
                    "413": _answer("Body larger than the configured limit"),
                    **_API_ERRORS,
                    "429": {
                        **_answer(
                            f"Refused for now: too many requests for this token, or the queue "
                            f"holds at least {settings.max_queue_depth} builds (batch) or "
                            f"{settings.max_queue_depth_interactive} (interactive), or the "
                            "token's or tenant's queued builds are at their cap"
                        ),
                        "headers": _RETRY_AFTER,
                    },
                },
            },
        },
        "/v1/builds/{build_id}": {
            "parameters": [build_id],
            "get": {
                "operationId": "getBuild",
                "summary": "Where a build stands, and its result once it has ended",
                "tags": ["builds"],
                "security": [{"bearer": []}],
                "responses": {
                    "200": _answer(
                        "The build's state, its trace id and its trace's link", "BuildView"
                    ),
                    "404": _answer("No such build (unknown, expired, or another tenant's)"),
                    **_API_ERRORS,
                },
            },
            "delete": {
                "operationId": "cancelBuild",
                "summary": "Cancel a build",
                "tags": ["builds"],
                "security": [{"bearer": []}],
                "responses": {
                    "200": _answer("It was queued and is now cancelled", "CancelReply"),
                    "202": _answer("It is running; its worker stops it", "CancelReply"),
                    "404": _answer("No such build"),
                    "409": _answer("It had already ended", "CancelReply"),
                    **_API_ERRORS,
                },
            },
        },
        "/v1/builds/{build_id}/events": {
            "parameters": [build_id],
            "get": {
                "operationId": "buildEvents",
                "summary": "Server-Sent Events of one build, live until it ends",
                "description": (
                    "Each event carries `id:` (its stream id), `event:` (its type) and `data:` "
                    "(the BuildEvent as JSON). Reconnect with `Last-Event-ID` to resume."
                ),
                "tags": ["builds"],
                "security": [{"bearer": []}],
                "parameters": [
                    _header(
                        "Last-Event-ID",
                        "resume after this stream id (empty: from the start)",
                        pattern=r"^(\d{1,19}-\d{1,19})?$",
                    ),
                    {
                        "name": "after",
                        "in": "query",
                        "required": False,
                        "description": "resume after this stream id (as Last-Event-ID)",
                        "schema": {"type": "string", "pattern": STREAM_ID_PATTERN},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "The event stream: one SSE event per BuildEvent",
                        "content": {
                            "text/event-stream": {
                                "schema": _object(
                                    ["data"],
                                    id={"type": "string", "pattern": STREAM_ID_PATTERN},
                                    event=_STR,
                                    data={
                                        "type": "string",
                                        "contentMediaType": "application/json",
                                        "contentSchema": _ref("BuildEvent"),
                                    },
                                )
                            }
                        },
                    },
                    "400": _answer("Last-Event-ID is not a stream id"),
                    "404": _answer("No such build"),
                    **_API_ERRORS,
                    "429": {
                        **_answer(
                            "Too many requests, or too many event streams open (this token's "
                            "or the gateway's)"
                        ),
                        "headers": _RETRY_AFTER,
                    },
                },
            },
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "The process is alive",
                "tags": ["operations"],
                "responses": {"200": _answer("alive", "Status")},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Redis is reachable",
                "tags": ["operations"],
                "responses": {
                    "200": _answer("ready", "Status"),
                    "503": _answer("Redis unreachable"),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "tags": ["operations"],
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "tags": ["operations"],
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": _json({"type": "object"}),
                    }
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "buildfleet gateway",
            "version": "1",
            "description": "Signed git-push webhooks and a REST API that enqueue container builds.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }

"""The OpenAPI 3.1 document served at /openapi.json: every route the gateway has, with the
statuses it answers. Request and state schemas come from the message contract itself."""

from __future__ import annotations

from typing import Any, Final

import msgspec

from producer.contract import BUILD_ID_PATTERN, BuildEvent, BuildRequest, BuildState
from producer.gateway.settings import GatewaySettings
from producer.gateway.webhooks import DELIVERY_ID_PATTERN

STREAM_ID_PATTERN: Final = r"^\d{1,19}-\d{1,19}$"
"""A Redis stream id (19 digits each side always fit the 64-bit parts Redis accepts)."""
_REF: Final = "#/components/schemas/{name}"
_RELATIVE_PATH: Final = r"^(?!/)(?!(.*/)?\.\.(/|$))"
_STR: Final = {"type": "string"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF.format(name=name)}


def _answer(description: str, schema: str = "Error") -> dict[str, Any]:
    return {"description": description, "content": _json(_ref(schema))}


_WEBHOOK_ERRORS: Final = {
    "400": _answer("Malformed JSON or a payload without a repository (the reason says which)"),
    "401": _answer("Missing or invalid signature (or GitLab token): nothing was enqueued"),
    "413": _answer("Body larger than the configured limit"),
    "503": _answer("The build queue (Redis) is unreachable: nothing was enqueued"),
}
_API_ERRORS: Final = {
    "401": _answer("Missing or invalid bearer token"),
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
_HUB_REPO: Final = _object(["full_name"], full_name=_STR, clone_url=_STR)
_PAYLOADS: Final = {
    # What the gateway reads of each forge's payload (everything else is ignored).
    "github": _object(
        ["repository"],
        repository=_HUB_REPO,
        organization=_object([], login=_STR),
        ref={"type": ["string", "null"]},
        after=_STR,
        deleted={"type": "boolean"},
        head_commit=_COMMIT,
    ),
    "gitlab": _object(
        ["project"],
        object_kind=_STR,
        project=_object(["path_with_namespace"], path_with_namespace=_STR, git_http_url=_STR),
        ref={"type": ["string", "null"]},
        after=_STR,
        checkout_sha={"type": ["string", "null"]},
    ),
    "gitea": _object(
        ["repository"],
        repository=_HUB_REPO,
        ref={"type": ["string", "null"]},
        ref_type={"type": ["string", "null"]},
        after=_STR,
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
                    "Accepted: the builds made (none for a deleted ref, an ignored event or a "
                    "ref no rule matches, and the message says so)",
                    "HookReply",
                ),
                **_WEBHOOK_ERRORS,
            },
        }
    }


def _build_id_parameter() -> dict[str, Any]:
    return {
        "name": "build_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": BUILD_ID_PATTERN},
    }


def openapi_document(settings: GatewaySettings) -> dict[str, Any]:
    (_req, _state, _event), components = msgspec.json.schema_components(
        [BuildRequest, BuildState, BuildEvent], ref_template=_REF
    )
    components["BuildEvent"] = _event
    request = components["BuildRequest"]
    for field in ("dockerfile", "context"):
        request["properties"][field]["pattern"] = _RELATIVE_PATH
    # What msgspec cannot say by itself: pushing needs an image name.
    request["if"] = {"properties": {"push": {"const": True}}}
    request["then"] = {"required": ["images"], "properties": {"images": {"minItems": 1}}}
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
                _header("X-GitHub-Delivery", "de-duplication id", pattern=DELIVERY_ID_PATTERN),
            ],
        ),
        "/hooks/gitlab": _webhook(
            "gitlab",
            [
                _header("X-Gitlab-Token", "the webhook's secret token", True),
                _header("X-Gitlab-Event", "Push Hook or Tag Push Hook; others are ignored", True),
                _header("X-Gitlab-Event-UUID", "de-duplication id", pattern=DELIVERY_ID_PATTERN),
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
                _header("X-Gitea-Delivery", "de-duplication id", pattern=DELIVERY_ID_PATTERN),
            ],
        ),
        "/v1/builds": {
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
                    "413": _answer("Body larger than the configured limit"),
                    "429": {
                        **_answer(
                            f"Batch priority refused: the queue holds at least "
                            f"{settings.max_queue_depth} builds"
                        ),
                        "headers": {
                            "Retry-After": {
                                "description": "seconds",
                                "schema": {"type": "integer"},
                            }
                        },
                    },
                    **_API_ERRORS,
                },
            }
        },
        "/v1/builds/{build_id}": {
            "parameters": [build_id],
            "get": {
                "operationId": "getBuild",
                "summary": "Where a build stands, and its result once it has ended",
                "tags": ["builds"],
                "security": [{"bearer": []}],
                "responses": {
                    "200": _answer("The build's state", "BuildState"),
                    "404": _answer("No such build (unknown or expired)"),
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

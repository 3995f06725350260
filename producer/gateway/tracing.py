"""The gateway's span: the root of every build's trace that starts with a webhook or an API
call.

Every request that changes something (any method but GET, HEAD and OPTIONS: webhooks,
submits, cancels) gets one SERVER span, a child of the caller's W3C trace context when one
came. The handlers copy the request's `traceparent` header into each BuildRequest they
enqueue; this middleware runs first and hands them a clone of the request whose
`traceparent` is the gateway span's own, so the worker's spans nest under it. Without an SDK
tracer provider no span is made (not even a no-op one: a push pays for every step) and the
request goes through untouched; the gateway's app leaves the middleware out altogether when
none is installed as it is made (`tracing_middlewares`), as `buildfleet gateway` installs
one, from the OTEL_* variables, before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Middleware
from multidict import CIMultiDict
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_UNTRACED_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
_propagator: Final = TraceContextTextMapPropagator()
_NO_SDK: Final = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route(request: web.Request) -> str | None:
    resource = request.match_info.route.resource
    return None if resource is None else resource.canonical


def _has_sdk(provider: trace.TracerProvider) -> bool:
    return not isinstance(provider, _NO_SDK)


def tracing_middlewares() -> list[Middleware]:
    """The middleware for the global tracer provider, or none when it has no SDK now."""
    return [tracing_middleware()] if _has_sdk(trace.get_tracer_provider()) else []


def tracing_middleware(tracer_provider: trace.TracerProvider | None = None) -> Middleware:
    tracer = trace.get_tracer("buildfleet.gateway", tracer_provider=tracer_provider)

    def untraced(request: web.Request) -> bool:
        provider = tracer_provider or trace.get_tracer_provider()  # an SDK may come later
        return request.method in _UNTRACED_METHODS or not _has_sdk(provider)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if untraced(request):
            return await handler(request)
        route = _route(request)
        attributes = {"http.request.method": request.method, "url.path": request.path}
        if route is not None:
            attributes["http.route"] = route
        with tracer.start_as_current_span(
            f"{request.method} {route or ''}".rstrip(),
            context=_propagator.extract(request.headers),
            kind=SpanKind.SERVER,
            attributes=attributes,
        ) as span:
            outgoing: dict[str, str] = {}
            _propagator.inject(outgoing)
            if "traceparent" in outgoing:
                headers = CIMultiDict(request.headers)
                headers.popall("tracestate", None)
                headers.update(outgoing)
                request = request.clone(headers=headers)
            response = await handler(request)
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            return response

    return middleware

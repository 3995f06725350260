"""The one door to the Kubernetes API: typed verbs over kubernetes_asyncio's authenticated
client. The only module that imports kubernetes_asyncio (an import-linter contract).

- Every verb takes a `Resource` and answers with its typed view (`worker.kube.objects`),
  decoded by msgspec straight from the response bytes: kubernetes_asyncio's models and its
  JSON round trips are never used, only its configuration loading, authentication (client
  certificates, tokens and their refresh) and connection pool.
- Every failure leaves as a `worker.kube.errors.KubeError`: a non-2xx status through
  `check_response`, a transport failure (also one in the middle of a stream) as
  `KubeUnreachable`, from `_mapped`, the one place that catches foreign errors.
- `watch` is one watch request as an async generator of typed events; `worker.kube.watch`
  makes a list+watch that lasts from it. `log_lines` follows a container's log.
- `calls` counts the requests sent (a watch or a log stream counts once).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from typing import Any, Final, Literal

import aiohttp
import msgspec
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config

from worker.kube.errors import (
    KubeConfigError,
    KubeError,
    KubeUnreachable,
    error_for_status,
    status_code,
    status_message,
)
from worker.kube.objects import (
    Applied,
    Bookmark,
    Deleted,
    K,
    ListMeta,
    Manifest,
    Resource,
)

Query = list[tuple[str, str]]
Propagation = Literal["Background", "Foreground", "Orphan"]

_REQUEST_TIMEOUT: Final = aiohttp.ClientTimeout(total=60, sock_connect=30)
_STREAM_TIMEOUT: Final = aiohttp.ClientTimeout(total=None, sock_connect=30)
_TRANSPORT_ERRORS: Final = (aiohttp.ClientError, TimeoutError, OSError)


class _Listing(msgspec.Struct, frozen=True):
    metadata: ListMeta = ListMeta()
    items: tuple[msgspec.Raw, ...] = ()


class _Kind(msgspec.Struct, frozen=True):
    kind: str = ""


class _WatchLine(msgspec.Struct, frozen=True):
    type: str
    object: msgspec.Raw


_listing_decoder: Final = msgspec.json.Decoder(_Listing)
_kind_decoder: Final = msgspec.json.Decoder(_Kind)
_watch_line_decoder: Final = msgspec.json.Decoder(_WatchLine)
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def _decode(view: type[K], raw: bytes | msgspec.Raw) -> K:
    decoder = _decoders.get(view)
    if decoder is None:
        decoder = _decoders[view] = msgspec.json.Decoder(view)
    obj: K = decoder.decode(raw)
    return obj


@contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Transport failures (refused, reset, timed out, cut mid-stream) as KubeUnreachable."""
    try:
        yield
    except _TRANSPORT_ERRORS as exc:
        raise KubeUnreachable(what, f"unreachable: {type(exc).__name__}: {exc}") from exc


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    try:
        return float(resp.headers.get("Retry-After", ""))
    except ValueError:
        return None


async def check_response(resp: aiohttp.ClientResponse, what: str) -> aiohttp.ClientResponse:
    """`resp` when its status is 2xx; else (having read and released it) its KubeError."""
    if 200 <= resp.status <= 299:
        return resp
    try:
        body = await resp.read()
    finally:
        resp.release()
    message = status_message(body, resp.reason or "")
    raise error_for_status(resp.status, what, message, retry_after=_retry_after(resp))


async def _lines(resp: aiohttp.ClientResponse) -> AsyncGenerator[bytes, None]:
    """The response body line by line, however long a line is."""
    buffer = bytearray()
    async for chunk in resp.content.iter_any():
        buffer.extend(chunk)
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            yield bytes(buffer[start:end])
            start = end + 1
        del buffer[:start]
    if buffer:
        yield bytes(buffer)


class KubeApi:
    """A connection to one API server (see the module docstring)."""

    def __init__(self, client: Any) -> None:
        """`client` is a kubernetes_asyncio ApiClient, owned from now on (see `aclose`)."""
        self._client = client
        self.calls = 0

    @classmethod
    async def connect(
        cls,
        *,
        kubeconfig: str | None = None,
        context: str | None = None,
        max_connections: int = 512,
    ) -> KubeApi:
        """From `kubeconfig` (and `context`), else in-cluster when running in a pod, else
        the default kubeconfig ($KUBECONFIG, ~/.kube/config)."""
        configuration = k8s.Configuration()
        configuration.connection_pool_maxsize = max_connections
        try:
            if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
                load_incluster: Any = k8s_config.load_incluster_config  # untyped
                load_incluster(client_configuration=configuration)
            else:
                await k8s_config.load_kube_config(
                    config_file=kubeconfig, context=context, client_configuration=configuration
                )
        except (k8s_config.ConfigException, OSError) as exc:
            raise KubeConfigError("load config", str(exc)) from exc
        return cls(k8s.ApiClient(configuration=configuration))

    async def aclose(self) -> None:
        await self._client.close()

    async def _send(
        self,
        what: str,
        method: str,
        path: str,
        *,
        query: Query | None = None,
        body: Manifest | None = None,
        content_type: str = "application/json",
        client_timeout: aiohttp.ClientTimeout = _REQUEST_TIMEOUT,
    ) -> aiohttp.ClientResponse:
        """One request; the open response when its status is 2xx (the caller releases it)."""
        self.calls += 1
        with _mapped(what):
            resp = await self._client.call_api(
                path,
                method,
                query_params=query or [],
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=client_timeout,
            )
            return await check_response(resp, what)

    async def _read(self, what: str, method: str, path: str, **kwargs: Any) -> bytes:
        resp = await self._send(what, method, path, **kwargs)
        try:
            with _mapped(what):
                return await resp.read()
        finally:
            resp.release()

    # -- verbs --

    async def create(self, resource: Resource[K], namespace: str, body: Manifest) -> K:
        what = f"create {resource} in {namespace}"
        return _decode(
            resource.view, await self._read(what, "POST", resource.path(namespace), body=body)
        )

    async def get(self, resource: Resource[K], namespace: str, name: str) -> K:
        """The object; `KubeNotFound` when there is none."""
        what = f"get {resource} {namespace}/{name}"
        return _decode(resource.view, await self._read(what, "GET", resource.path(namespace, name)))

    async def list(
        self,
        resource: Resource[K],
        namespace: str,
        *,
        label_selector: str = "",
        field_selector: str = "",
    ) -> tuple[tuple[K, ...], str]:
        """The matching objects and the list's resourceVersion (where a watch starts)."""
        what = f"list {resource} in {namespace}"
        query = _selectors(label_selector, field_selector)
        body = await self._read(what, "GET", resource.path(namespace), query=query)
        listing = _listing_decoder.decode(body)
        items = tuple(_decode(resource.view, raw) for raw in listing.items)
        return items, listing.metadata.resource_version

    async def delete(
        self,
        resource: Resource[K],
        namespace: str,
        name: str,
        *,
        propagation: Propagation = "Background",
    ) -> K | None:
        """Delete the object (its dependents per `propagation`): its state while it is
        being deleted (finalizers, foreground), None when it is gone already. `KubeNotFound`
        when there was none."""
        what = f"delete {resource} {namespace}/{name}"
        body: Manifest = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "propagationPolicy": propagation,
        }
        answer = await self._read(what, "DELETE", resource.path(namespace, name), body=body)
        if _kind_decoder.decode(answer).kind == "Status":
            return None
        return _decode(resource.view, answer)

    async def patch(
        self,
        resource: Resource[K],
        namespace: str,
        name: str,
        patch: Manifest,
        *,
        subresource: str | None = None,
    ) -> K:
        """A JSON merge patch (RFC 7386) of the object, or of its `subresource` ("status")."""
        what = f"patch {resource} {namespace}/{name}" + (f"/{subresource}" if subresource else "")
        path = resource.path(namespace, name, subresource)
        body = await self._read(
            what, "PATCH", path, body=patch, content_type="application/merge-patch+json"
        )
        return _decode(resource.view, body)

    async def watch(
        self,
        resource: Resource[K],
        namespace: str,
        *,
        resource_version: str,
        label_selector: str = "",
        field_selector: str = "",
        timeout_s: int = 120,
    ) -> AsyncGenerator[Applied[K] | Deleted[K] | Bookmark, None]:
        """One watch request from `resource_version` ("0": the current objects first, as
        ADDED events, from the server's cache), until the server ends it after `timeout_s`.
        An ERROR event raises its KubeError (`KubeGone` when the version is too old)."""
        what = f"watch {resource} in {namespace}"
        query = [
            ("watch", "true"),
            ("resourceVersion", resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(timeout_s)),
            *_selectors(label_selector, field_selector),
        ]
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout_s + 30)
        resp = await self._send(
            what, "GET", resource.path(namespace), query=query, client_timeout=timeout
        )
        try:
            with _mapped(what):
                async for raw in _lines(resp):
                    if not raw.strip():
                        continue
                    yield _watch_event(resource, raw, what)
        finally:
            resp.release()

    async def log_lines(
        self, namespace: str, pod: str, container: str, *, timestamps: bool = True
    ) -> AsyncGenerator[str, None]:
        """Follow a container's log, line by line (each "RFC3339NANO text" with
        `timestamps`), until the container ends or the stream is cut (`KubeUnreachable`)."""
        what = f"log of {namespace}/{pod}/{container}"
        query = [
            ("container", container),
            ("follow", "true"),
            ("timestamps", "true" if timestamps else "false"),
        ]
        path = f"/api/v1/namespaces/{namespace}/pods/{pod}/log"
        resp = await self._send(what, "GET", path, query=query, client_timeout=_STREAM_TIMEOUT)
        try:
            with _mapped(what):
                async for raw in _lines(resp):
                    yield raw.decode("utf-8", "replace").rstrip("\r")
        finally:
            resp.release()


class LazyKubeApi:
    """A `KubeApi` connected on first use, once (a backend is made before its event loop
    runs), or the one given."""

    def __init__(
        self,
        *,
        kubeconfig: str | None,
        context: str | None,
        max_connections: int,
        api: KubeApi | None = None,
    ) -> None:
        self._options = (kubeconfig, context, max_connections)
        self._api = api
        self._lock = asyncio.Lock()

    @property
    def calls(self) -> int:
        """Requests sent so far (a watch or log stream counts once)."""
        return self._api.calls if self._api is not None else 0

    async def get(self) -> KubeApi:
        if self._api is not None:
            return self._api
        async with self._lock:
            if self._api is None:
                kubeconfig, context, max_connections = self._options
                self._api = await KubeApi.connect(
                    kubeconfig=kubeconfig, context=context, max_connections=max_connections
                )
            return self._api

    async def aclose(self) -> None:
        if self._api is not None:
            await self._api.aclose()
        self._api = None


def _selectors(label_selector: str, field_selector: str) -> Query:
    query: Query = []
    if label_selector:
        query.append(("labelSelector", label_selector))
    if field_selector:
        query.append(("fieldSelector", field_selector))
    return query


def _watch_event(
    resource: Resource[K], raw: bytes, what: str
) -> Applied[K] | Deleted[K] | Bookmark:
    try:
        line = _watch_line_decoder.decode(raw)
        match line.type:
            case "ADDED" | "MODIFIED":
                return Applied(_decode(resource.view, line.object))
            case "DELETED":
                return Deleted(_decode(resource.view, line.object))
            case "BOOKMARK":
                return Bookmark(_decode(resource.view, line.object).metadata.resource_version)
            case "ERROR":
                body = bytes(line.object)
                raise error_for_status(status_code(body), what, status_message(body, "error"))
            case other:
                raise KubeUnreachable(what, f"unknown watch event type {other!r}")
    except msgspec.DecodeError as exc:
        raise KubeUnreachable(what, f"undecodable watch event: {exc}") from exc


__all__ = ["KubeApi", "KubeError", "LazyKubeApi", "check_response"]

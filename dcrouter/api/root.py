"""The management API's one twisted.web resource: Host check, CORS, bearer tokens, dispatch, JSON errors.

Order of checks, so that an answer never says more than the caller may know:

1. ``Host`` must be in ``apiConfig.allowedHosts`` (else 403 ``host_not_allowed``): a browser page whose
   name an attacker points at 127.0.0.1 (DNS rebinding) sends its own name, and is refused.
2. CORS: only when ``apiConfig.cors`` lists the request's ``Origin`` are CORS headers sent (preflight
   ``OPTIONS`` answered 204); otherwise none at all, so browsers keep other origins out.
3. ``/health`` and public mounts answer without a token; everything else needs ``Authorization: Bearer``
   (401 ``unauthorized``, with ``WWW-Authenticate: Bearer``).
4. The path and method: 404 ``not_found``, 405 ``method_not_allowed`` (with ``Allow``).
5. Scope: an endpoint that changes something needs an ``admin`` token (403 ``forbidden``).
6. The request: 413 over 1 MiB, 415 for a body that is not JSON, 400 for bad JSON, unknown fields or query
   parameters (named), bad ids (validated before any lookup).

Mount points: :meth:`ApiRoot.mount` puts another twisted.web resource (``/metrics``, ``/api/v1/events``) at a
path, behind the same Host and token checks (``scope="public"``: without a token); the resource's own
``render`` answers. Mounted paths are listed in the OpenAPI document only if described there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from dcrouter.api.http import (
    JSON_TYPE,
    ApiError,
    ApiRequest,
    Call,
    Endpoint,
    Stream,
    json_bytes,
    parse_body,
    parse_query,
)
from dcrouter.api.tokens import TokenVerifier
from dcrouter.config.api import ApiToken
from dcrouter.interfaces import QueueUnavailable
from dcrouter.log import logger

log = logger(__name__)

_SCOPES = {"public": 0, "read": 1, "admin": 2}


class ApiRoot(Resource):
    """Every path of the API. ``endpoints`` is the table (:mod:`dcrouter.api.endpoints`)."""

    isLeaf = True

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        verifier: TokenVerifier,
        *,
        allowed_hosts: Sequence[str],
        cors: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.endpoints = list(endpoints)
        self._verifier = verifier
        self._any_host = "*" in allowed_hosts
        self._hosts = {h.lower().strip("[]") for h in allowed_hosts}
        self._cors = set(cors)
        self._mounts: list[tuple[str, Resource, str]] = []

    def mount(self, path: str, resource: Resource, *, scope: str = "read") -> None:
        """Serve ``resource`` (its ``render``) at ``path`` and below (``/``: only ``/`` itself), after the
        Host and token checks."""
        if scope not in _SCOPES:
            raise ValueError(f"scope must be one of {', '.join(_SCOPES)}: {scope!r}")
        self._mounts.append((path.rstrip("/"), resource, scope))

    # -- twisted.web -----------------------------------------------------------------------------------

    def render(self, request: Request) -> Any:
        d = Deferred.fromCoroutine(self._answer(request))
        d.addErrback(self._crashed, request)
        return NOT_DONE_YET

    async def _answer(self, request: Request) -> None:
        try:
            self._check_host(request)
            cors = self._cors_headers(request)
            for name, value in cors.items():
                request.setHeader(name, value)
            method = request.method.decode("ascii", "replace")
            if method == "OPTIONS" and cors:
                request.setResponseCode(204)
                request.finish()
                return
            path = request.path.decode("utf-8", "replace")
            mounted = self._mounted(path)
            if mounted is not None:
                resource, scope = mounted
                if scope != "public":
                    await self._authenticate(request, scope)
                body = resource.render(request)
                if body is not NOT_DONE_YET:
                    request.write(body)
                    request.finish()
                return
            try:
                endpoint, params = self._route(method, path)
            except ApiError:
                # What exists is told only to callers with a token.
                await self._authenticate(request, "read")
                raise
            token = None if endpoint.scope == "public" else await self._authenticate(request, endpoint.scope)
            if isinstance(request, ApiRequest) and request.too_large:
                raise ApiError(413, "too_large", "the request body is over 1 MiB")
            query = parse_query(request, endpoint)
            raw = b""
            if request.content is not None:
                request.content.seek(0)  # a form body was read already by twisted.web
                raw = request.content.read()
            body = parse_body(request, endpoint, raw)
            result = await endpoint.handler(Call(request, params, query, body, token))
        except ApiError as error:
            self._send_error(request, error)
            return
        except QueueUnavailable as error:
            self._send_error(request, ApiError(503, "queue_unavailable", str(error)))
            return
        if isinstance(result, Stream):
            self._stream(request, result)
            return
        status, data = result if isinstance(result, tuple) else (200, result)
        self._send_json(request, status, data)

    # -- checks ----------------------------------------------------------------------------------------

    def _check_host(self, request: Request) -> None:
        if self._any_host:
            return
        host = (request.getHeader("host") or "").strip().lower()
        if host.startswith("["):
            name = host[1 : host.find("]")] if "]" in host else host
        else:
            name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        if name not in self._hosts:
            raise ApiError(403, "host_not_allowed", f"Host {host!r} is not in apiConfig.allowedHosts")

    def _cors_headers(self, request: Request) -> dict[str, str]:
        origin = request.getHeader("origin")
        if not self._cors or origin is None or not ("*" in self._cors or origin in self._cors):
            return {}
        return {
            "Access-Control-Allow-Origin": origin,
            "Vary": "Origin",
            "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type",
            "Access-Control-Max-Age": "600",
        }

    async def _authenticate(self, request: Request, scope: str) -> ApiToken:
        header = request.getHeader("authorization") or ""
        kind, _, presented = header.partition(" ")
        if kind.lower() != "bearer" or not presented.strip():
            raise ApiError(
                401, "unauthorized", "send Authorization: Bearer <token>", {"WWW-Authenticate": "Bearer"}
            )
        token = self._verifier.cached(presented.strip()) or await self._verifier.verify(presented.strip())
        if token is None:
            raise ApiError(401, "unauthorized", "unknown token", {"WWW-Authenticate": "Bearer"})
        if _SCOPES[token.scope] < _SCOPES[scope]:
            raise ApiError(
                403, "forbidden", f"this needs a token of scope {scope}; {token.name!r} is {token.scope}"
            )
        return token

    def _mounted(self, path: str) -> tuple[Resource, str] | None:
        for prefix, resource, scope in self._mounts:
            if not prefix:  # "/" itself, not everything under it
                if path == "/":
                    return resource, scope
            elif path == prefix or path.startswith(prefix + "/"):
                return resource, scope
        return None

    def _route(self, method: str, path: str) -> tuple[Endpoint, dict[str, str]]:
        allowed = []
        for endpoint in self.endpoints:
            params = endpoint.match(path)
            if params is None:
                continue
            if endpoint.method == method or (method == "HEAD" and endpoint.method == "GET"):
                return endpoint, params
            allowed.append(endpoint.method)
        if allowed:
            raise ApiError(
                405,
                "method_not_allowed",
                f"{method} is not allowed on {path}; allowed: {', '.join(allowed)}",
                {"Allow": ", ".join(allowed)},
            )
        raise ApiError(404, "not_found", f"no such endpoint: {path}")

    # -- answers ---------------------------------------------------------------------------------------

    def _send_json(self, request: Request, status: int, data: Any) -> None:
        if request.finished or request._disconnected:
            return
        request.setResponseCode(status)
        request.setHeader("Content-Type", f"{JSON_TYPE}; charset=utf-8")
        request.setHeader("Cache-Control", "no-store")
        request.setHeader("X-Content-Type-Options", "nosniff")
        request.write(json_bytes(data))
        request.finish()

    def _send_error(self, request: Request, error: ApiError) -> None:
        for name, value in error.headers.items():
            request.setHeader(name, value)
        self._send_json(request, error.status, error.body())

    def _stream(self, request: Request, stream: Stream) -> None:
        request.setResponseCode(200)
        request.setHeader("Content-Type", stream.content_type)
        request.setHeader("Cache-Control", "no-store")
        request.setHeader("X-Content-Type-Options", "nosniff")
        if request.method == b"HEAD":
            stream.file.close()
            request.finish()
            return
        d = FileSender().beginFileTransfer(stream.file, request)

        def done(result: object) -> None:
            stream.file.close()
            if not request._disconnected and not request.finished:
                request.finish()

        d.addBoth(done)

    def _crashed(self, failure: Failure, request: Request) -> None:
        log.failure(
            "management API: {method} {path} failed",
            failure,
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("utf-8", "replace"),
        )
        if not request.finished and not request._disconnected and not request.startedWriting:
            self._send_error(request, ApiError(500, "internal_error", "the request failed; see the log"))

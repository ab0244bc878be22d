"""ApiService: the management API's listeners (TCP, and optionally a Unix socket) as a Twisted service.

Like SMTP and the proxy, it binds in ``privilegedStartService`` (paused, :mod:`dcrouter.net.listen`) and
accepts from ``startService`` on; ``stopService`` stops listening. :attr:`root` is the resource tree
(:class:`~dcrouter.api.root.ApiRoot`), where more resources can be mounted (``/metrics``,
``/api/v1/events``) before the service starts.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.web.server import Site

from dcrouter.api.dashboard import dashboard_files
from dcrouter.api.endpoints import Endpoints
from dcrouter.api.http import ApiRequest, Call, Endpoint
from dcrouter.api.openapi import document
from dcrouter.api.root import ApiRoot
from dcrouter.api.tokens import DeferToThread, TokenVerifier
from dcrouter.api.view import RouterView
from dcrouter.config.api import ApiConfig
from dcrouter.log import logger
from dcrouter.net.listen import ListenError, listen_paused, listen_unix_paused, pause, resume
from dcrouter.net.reactor import IRouterReactor

log = logger(__name__)


def build_root(config: ApiConfig, view: RouterView, *, defer_to_thread: DeferToThread) -> ApiRoot:
    """The API's resource: every endpoint, and ``/api/v1/openapi.json`` describing them."""
    endpoints = Endpoints(view).table()

    async def openapi(call: Call) -> Any:
        return document(root.endpoints, view.version)

    endpoints.append(
        Endpoint("GET", "/api/v1/openapi.json", openapi, "read", "This API's OpenAPI 3.1 document.")
    )
    verifier = TokenVerifier(config.tokens, defer_to_thread=defer_to_thread)
    root = ApiRoot(endpoints, verifier, allowed_hosts=config.allowed_hosts, cors=config.cors)
    # The dashboard's files carry no data: served without a token (the page asks for one).
    for path, resource in dashboard_files().items():
        root.mount(path, resource, scope="public")
    return root


def build_site(root: ApiRoot) -> Site:
    site = Site(root, requestFactory=ApiRequest)
    site.displayTracebacks = False
    return site


class ApiService(Service):
    """Serves ``root`` on ``config``'s address and port (and Unix socket). ``port`` is the bound TCP port."""

    name = "api"  # type: ignore[assignment]

    def __init__(self, config: ApiConfig, root: ApiRoot, *, reactor: IRouterReactor) -> None:
        self.config = config
        self.root = root
        self.site = build_site(root)
        self._reactor = reactor
        self._ports: list[IListeningPort] = []
        self.port: int | None = None

    def bind(self) -> None:
        """Bind (paused); ListenError naming the address when it cannot. Idempotent."""
        if self._ports:
            return
        config = self.config
        self._ports = listen_paused(
            self._reactor,
            [(config.port, self.site)],
            interface=config.bind_address,
            what="the management API",
        )
        self.port = self._ports[0].getHost().port  # type: ignore[attr-defined]
        if config.socket is not None:
            try:
                self._ports.append(
                    listen_unix_paused(self._reactor, config.socket, self.site, what="the management API")
                )
            except ListenError:
                for port in self._ports:
                    port.stopListening()
                self._ports = []
                raise

    def unbind(self) -> None:
        """Close ports bound but never started (another listener of the router could not be bound)."""
        ports, self._ports = self._ports, []
        for port in ports:
            port.stopListening()

    def privilegedStartService(self) -> None:
        self.bind()
        super().privilegedStartService()

    def startService(self) -> None:
        self.bind()
        super().startService()
        for port in self._ports:
            resume(port)
        where = f"{self.config.bind_address}:{self.port}"
        if self.config.socket:
            where += f" and {self.config.socket}"
        log.info("management API listening on {where}", where=where)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        ports, self._ports = self._ports, []
        for port in ports:
            pause(port)
        # A Unix port removes its socket file as it closes.
        return gatherResults([maybeDeferred(port.stopListening) for port in ports])

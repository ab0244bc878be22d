"""Socket handlers: the ``socket-handler`` action hands a client's connection to a protocol in this process.

A handler is a callable ``handler(context: RouteContext) -> IProtocol``. The proxy calls it once the route
is chosen (after its IP rules and connection cap), connects the protocol it returns to the client's
connection and feeds it every byte: those read while peeking first, then the rest. The protocol writes to
its ``transport`` as to any TCP connection (``startTLS`` included); the proxy's own limits still apply
(``maxConnectionLifetime``, the route's ``maxConnections`` and the per-IP cap while it is open).

Handlers are found by name in a :class:`SocketHandlers` registry: names registered by the router (``smtp``,
dcrouter's own ESMTP server; the proxy imports no mail code, so the router puts it there), then entry points
in the group ``dcrouter.socket_handlers``, then a dotted path (``package.module:handler`` or
``package.module.handler``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from twisted.internet.interfaces import IAddress, IProtocol

GROUP = "dcrouter.socket_handlers"


@dataclass(frozen=True)
class RouteContext:
    """What a socket handler learns of the connection it is given. ``port``: the configured listening port
    (the one the routes match); ``client_ip`` and ``client_address``: the client (from a trusted proxy's
    PROXY header when there was one); ``server_name``: the SNI name or Host read while peeking, if any;
    ``route_name``: the route that chose the handler."""

    route_name: str
    port: int
    client_ip: str
    client_address: IAddress | None
    local_address: IAddress | None
    server_name: str | None


SocketHandler = Callable[[RouteContext], IProtocol]


class SocketHandlerError(Exception):
    """A handler name that names nothing usable; the message says which and why."""


def resolve(name: str) -> SocketHandler:
    """The handler an entry point of :data:`GROUP` or a dotted path names."""
    found = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    try:
        if found:
            target: Any = found[0].load()
        else:
            module_name, sep, attr = name.partition(":")
            if not sep:
                module_name, _, attr = name.rpartition(".")
            if not module_name or not attr:
                raise SocketHandlerError(
                    f"unknown socket handler {name!r}: not registered, no entry point in group {GROUP!r}, "
                    "and not a dotted path (package.module:handler)"
                )
            target = importlib.import_module(module_name)
            for part in attr.split("."):
                target = getattr(target, part)
    except SocketHandlerError:
        raise
    except (ImportError, AttributeError) as error:
        raise SocketHandlerError(f"socket handler {name!r} cannot be loaded: {error}") from error
    if not callable(target):
        raise SocketHandlerError(f"socket handler {name!r} is not callable")
    return target  # type: ignore[no-any-return]


class SocketHandlers:
    """Handlers by name: registered ones, else resolved (:func:`resolve`) once and kept."""

    def __init__(self) -> None:
        self._handlers: dict[str, SocketHandler] = {}

    def register(self, name: str, handler: SocketHandler) -> None:
        self._handlers[name] = handler

    def get(self, name: str) -> SocketHandler:
        """The handler called ``name``; SocketHandlerError when none can be found."""
        handler = self._handlers.get(name)
        if handler is None:
            handler = self._handlers[name] = resolve(name)
        return handler

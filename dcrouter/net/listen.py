"""Binding listening TCP ports paused: the one way SMTP ingress and the proxy listen.

Both bind in ``privilegedStartService`` (twistd drops privileges right after it, so ports below 1024 must be
bound then) yet may accept nothing before ``startService`` has loaded the queue. A port is bound through an
endpoint string (``tcp:port=25:interface=...:backlog=1024``, :func:`tcp_endpoint`), as twistd's strports and
Twisted's own taps bind, and paused at once: the kernel may complete handshakes into the backlog, but no
connection is accepted and no protocol built until :func:`resume`.

What a caller may rely on:

- :func:`listen_paused` binds every ``(port, factory)`` in order and returns their listening ports, none
  accepting. When one cannot be bound it closes those it bound and raises :class:`ListenError`, whose text
  names what was listening, the address and the port.
- Binding is done when :func:`listen_paused` returns: a TCP endpoint's ``listen`` binds before its Deferred is
  returned (Twisted's ``defer.execute``); an endpoint that would bind later is refused with ListenError rather
  than bound after privileges are dropped (docs/decisions.md, "Listening").
- A worker process (``workers`` > 1) does not bind: its supervisor opened the sockets and passed them down
  (:func:`inherit`); :func:`listen_paused` then adopts the inherited socket of ``(interface, port)`` with
  ``adoptStreamPort`` instead (docs/decisions.md, "Workers"). A worker never binds an SMTP or proxy port of
  its own (a reload that adds one): the others could not bind it too, so it is refused with ListenError
  ("restart to add it"), in every worker alike.
- ``spread=True`` (SMTP): an adopted (shared) port accepts one connection each time the reactor finds it
  readable, not Twisted's burst of up to 100 and more: every worker is woken for a new connection on the
  socket they share, and the one that gets to ``accept`` first takes it, so the worker that is less busy
  takes more. With a burst per wake-up, whichever worker woke first took every connection waiting — 20 SMTP
  senders connecting at once could land mostly on one worker, for their whole sessions (less likely now, not
  impossible: docs/decisions.md, "Workers"). The proxy keeps the
  burst: its connections are mostly short (a burst taken by one worker is over soon), and one wake-up per
  connection cost it a third more CPU per connection (bench/proxy, 50 clients, two workers).
- Not accepting is not reading: only a real reactor's port is a read descriptor; an in-memory reactor's
  (unit tests) accepts nothing anyway, so pausing and resuming it do nothing.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence

from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorTCP, IReadDescriptor
from twisted.python.failure import Failure

#: Pending connections the kernel queues per port. Twisted's default, 50, drops SYNs under bursts of
#: connections long before maxConnections is reached; the kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024


#: (interface, configured port) → file descriptor of a listening socket this process inherited from its
#: supervisor (:func:`inherit`); empty in a process that binds its own.
_inherited: dict[tuple[str, int], int] = {}


#: The listeners every worker shares (their ports come from the supervisor); others (the API) bind their own.
_SHARED = frozenset({"SMTP", "the proxy"})


def inherit(sockets: Mapping[tuple[str, int], int]) -> None:
    """Adopt these inherited listening sockets (``(interface, configured port)`` → fd) where this process
    would bind ``port`` on ``interface``."""
    _inherited.clear()
    _inherited.update(sockets)


def inherited(interface: str, port: int) -> int | None:
    """The fd inherited for ``(interface, port)``, or None."""
    return _inherited.get((interface, port))


class ListenError(Exception):
    """A port could not be bound. ``str()`` reads ``cannot listen for WHAT on ADDRESS:PORT: REASON``."""

    def __init__(self, what: str, interface: str, port: int, reason: object) -> None:
        super().__init__(f"cannot listen for {what} on {format_address(interface, port)}: {reason}")
        self.interface = interface
        self.port = port


def format_address(host: str, port: int) -> str:
    """``host:port``, or ``[host]:port`` for an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tcp_endpoint(port: int, interface: str, backlog: int = LISTEN_BACKLOG) -> str:
    """The endpoint string binding TCP ``port`` on ``interface`` (an IPv4 or IPv6 address, quoted)."""
    return f"tcp:port={port}:interface={quoteStringArgument(interface)}:backlog={backlog}"


def listen_paused(
    reactor: IReactorTCP,
    factories: Sequence[tuple[int, IProtocolFactory]],
    *,
    interface: str,
    what: str,
    backlog: int = LISTEN_BACKLOG,
    spread: bool = False,
) -> list[IListeningPort]:
    """Bind each ``(port, factory)`` on ``interface``, paused; see the module docstring. ``what`` names the
    listener in the error (``SMTP``, ``the proxy``); ``spread``: a port adopted from the supervisor accepts
    one connection per wake-up."""
    bound: list[IListeningPort] = []
    for port, factory in factories:
        fd = _inherited.get((interface, port))
        if fd is None and _inherited and what in _SHARED:
            close(bound)
            reason = "a worker serves only the ports its supervisor opened: restart to add it"
            raise ListenError(what, interface, port, reason)
        if fd is not None:
            family = socket.AF_INET6 if ":" in interface else socket.AF_INET
            # The reactor dups the descriptor; the inherited one stays open for the process's life.
            listening = reactor.adoptStreamPort(fd, family, factory)  # type: ignore[attr-defined]
            if spread:
                _one_accept_per_wakeup(listening)
            pause(listening)
            bound.append(listening)
            continue
        try:
            listening = _listen_now(reactor, tcp_endpoint(port, interface, backlog), factory)
        except CannotListenError as error:
            close(bound)
            raise ListenError(what, interface, port, error.socketError) from error
        except _NotAtOnce:
            close(bound)
            raise ListenError(what, interface, port, "the endpoint did not bind at once") from None
        pause(listening)
        bound.append(listening)
    return bound


def listen_unix_paused(
    reactor: IReactorTCP, path: str, factory: IProtocolFactory, *, what: str
) -> IListeningPort:
    """Bind the Unix socket ``path`` (mode 0600; a stale socket left by a dead process is replaced, one a
    live process holds is not), paused. ListenError naming the path when it cannot be bound."""
    description = f"unix:address={quoteStringArgument(path)}:mode=600:lockfile=1"
    try:
        listening = _listen_now(reactor, description, factory)
    except CannotListenError as error:
        raise ListenError(what, path, 0, error.socketError) from error
    except _NotAtOnce:
        raise ListenError(what, path, 0, "the endpoint did not bind at once") from None
    pause(listening)
    return listening


class _NotAtOnce(Exception):
    pass


def _listen_now(reactor: IReactorTCP, description: str, factory: IProtocolFactory) -> IListeningPort:
    """The port ``description``'s endpoint listens on, bound before this returns (or its error, raised)."""
    outcome: list[IListeningPort | Failure] = []
    waiting = serverFromString(reactor, description).listen(factory)
    waiting.addBoth(outcome.append)
    if not outcome:
        waiting.cancel()
        raise _NotAtOnce()
    (result,) = outcome
    if isinstance(result, Failure):
        result.raiseException()
    return result


def _one_accept_per_wakeup(listening: IListeningPort) -> None:
    """Make a reactor TCP port accept at most one connection per ``doRead`` (see the module docstring).
    Twisted's ``tcp.Port`` reads its per-wake-up count from ``numberAccepts`` and adapts it after every
    wake-up; it is set back to 1 before each. A port without that attribute is left as it is."""
    if not hasattr(listening, "numberAccepts"):
        return
    do_read = listening.doRead  # type: ignore[attr-defined]

    def doRead() -> object:
        listening.numberAccepts = 1  # type: ignore[attr-defined]
        return do_read()

    listening.doRead = doRead  # type: ignore[attr-defined]


def pause(listening: IListeningPort) -> None:
    """Stop accepting connections on ``listening`` (bound ports keep queueing handshakes)."""
    if IReadDescriptor.providedBy(listening):
        listening.stopReading()  # type: ignore[attr-defined]


def resume(listening: IListeningPort) -> None:
    """Accept connections on ``listening`` again."""
    if IReadDescriptor.providedBy(listening):
        listening.startReading()  # type: ignore[attr-defined]


def close(ports: Sequence[IListeningPort]) -> None:
    """Stop listening on every port now (a failed start-up: nothing was accepted on them)."""
    for listening in ports:
        listening.stopListening()

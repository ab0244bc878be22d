"""The type of the reactor dcrouter's services are given: one name for what they ask of it.

Twisted describes a reactor by many small interfaces, and Python's types have no intersection; a parameter
that needs timers *and* sockets *and* a thread pool was typed ``Any``. :class:`IRouterReactor` joins the
interfaces dcrouter uses, so such a parameter says what it takes and mypy checks each use (``callLater``,
``listenTCP``, ``getThreadPool``, an endpoint or ``twisted.names`` resolver built on it) against them.

It is for annotations only: nothing declares it and nothing checks it at run time. The reactor twistd runs
provides every part of it; a test passes ``MemoryReactorClock``, or the real reactor, for what it exercises.
A parameter that needs only time takes ``IReactorTime`` (by convention named ``clock``), and one that needs
only the thread hand-off takes ``IReactorFromThreads``: the narrow interface says more where it suffices.
"""

from __future__ import annotations

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    IReactorUDP,
    IReactorUNIX,
)


class IRouterReactor(
    IReactorCore,
    IReactorTime,
    IReactorThreads,
    IReactorTCP,
    IReactorUDP,
    IReactorUNIX,
    IReactorPluggableNameResolver,
):
    """Everything dcrouter asks of its reactor: the event loop's triggers (``addSystemEventTrigger``), timers,
    its thread pool and ``callFromThread``, TCP listeners and clients, UDP (DNS queries), UNIX sockets
    (scanner daemons, Redis) and name resolution (``HostnameEndpoint``)."""

"""What the Redis queue (:mod:`dcrouter.queue.redis`) and its start-up recovery
(:mod:`dcrouter.queue.redis_recovery`) share: the connection pool under the key prefix, running the Lua
scripts, and the thread pool for file work. Both import this module; neither imports the other's insides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from dcrouter.interfaces import QueueUnavailable
from dcrouter.net.reactor import IRouterReactor
from dcrouter.queue.redis_connection import RedisConnection


class RedisStore:
    """Keys under ``prefix`` in the Redis of :attr:`connection` (set once the queue connects), and blocking
    file work on ``reactor``'s thread pool."""

    def __init__(self, *, reactor: IRouterReactor, prefix: str) -> None:
        self.reactor = reactor
        self.prefix = prefix
        self.connection: RedisConnection | None = None

    def key(self, *parts: str) -> str:
        return self.prefix + "".join(parts)

    def call(self, method: str, *args: Any, refusal_expected: bool = False) -> Deferred:
        """A txredisapi call with the connection's deadline (see :meth:`RedisConnection.call`)."""
        assert self.connection is not None
        return self.connection.call(method, *args, refusal_expected=refusal_expected)

    def script(self, script: str, *args: Any) -> Deferred:
        """Run one of :mod:`dcrouter.queue.redis_scripts`; the prefix is its first argument."""
        return self.call("eval", script, [], [self.prefix, *args])

    def script_replicated(self, script: str, *args: Any) -> Deferred:
        """:meth:`script`, acknowledged only once the replicas the URL asks for (``wait``) have it too."""
        assert self.connection is not None
        return self.connection.call_replicated("eval", script, [], [self.prefix, *args])

    def in_thread(self, f: Callable[..., Any], *args: Any) -> Deferred:
        """Run blocking file work in the reactor's thread pool; OSError becomes QueueUnavailable."""
        d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

        def unavailable(failure: Failure) -> Failure:
            if failure.check(OSError):
                error = QueueUnavailable(f"Redis queue body directory: {failure.getErrorMessage()}")
                error.__cause__ = failure.value
                return Failure(error)
            return failure

        d.addErrback(unavailable)
        return d

"""One pool of txredisapi connections, with the rules of docs/decisions.md: bytes in and out
(``charset=None``), no number guessing (``convertNumbers=False``), and a deadline on every call.

What a caller may rely on:

- :meth:`RedisConnection.call` returns a Deferred that fires within ``timeout`` seconds (measured on
  ``reactor``), whatever Redis does: with the reply, or with :class:`QueueUnavailable` when Redis is
  unreachable, slow, or refuses the command. It never waits forever: txredisapi's lazy connections wait for
  a connection without end while Redis is down (its issue #112), hence ``Deferred.addTimeout``.
- The pool reconnects by itself, with backoff capped at :data:`MAX_RECONNECT_DELAY` seconds, so service
  resumes without a restart once Redis is back.
- A connection whose reply does not come within ``timeout`` is aborted and replaced (txredisapi's
  ``replyTimeout``, set a little shorter than the call deadline so it fires first): a Redis that hangs or a
  network that drops packets silently does not leave a dead connection in the pool.
- Outages are logged once when they begin and once when they end, not once per failed call.
- With Sentinel (``redis+sentinel://``), every connection attempt first asks the sentinels for the current
  master (txredisapi's ``Sentinel.master_for``), and a connection to a server that is no longer a master is
  dropped: after a failover the pool reconnects to the new master by itself. Meanwhile calls fail with
  QueueUnavailable (ingress answers ``451``). :meth:`call_replicated` runs a write and then ``WAIT`` on the
  same connection, for the URL's ``wait`` replicas.

A call that timed out may still be executed by Redis later (the command was sent). The queue's writes are
written so that this is harmless: see :mod:`dcrouter.queue.redis`.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.python.failure import Failure

from dcrouter.interfaces import QueueError, QueueUnavailable
from dcrouter.log import logger
from dcrouter.net.reactor import IRouterReactor
from dcrouter.net.redis_url import RedisAddress

log = logger(__name__)

#: Longest pause between reconnection attempts while Redis is down (txredisapi's default is 10 s).
MAX_RECONNECT_DELAY = 2.0
#: Error replies that mean "not now" rather than a bug: a replica not (yet) promoted, a master without the
#: replicas ``min-replicas-to-write`` asks for, a server loading its data. Outages, logged as such.
UNAVAILABLE_REPLIES = ("READONLY", "NOREPLICAS", "LOADING", "MASTERDOWN", "TRYAGAIN")


class _MasterProtocol(txredisapi.SentinelRedisProtocol):  # type: ignore[misc]
    """txredisapi's check that a server Sentinel named is (still) a master, for bytes replies: its own
    compares ``ROLE``'s first element with a str, which with ``charset=None`` never matches, so every
    connection would be dropped."""

    def connectionMade(self) -> Any:
        def check_role(role: list[Any]) -> Any:
            kind = role[0].decode() if isinstance(role[0], bytes) else role[0]
            if self.factory.is_master and kind != "master":
                self.transport.loseConnection()
                return None
            return txredisapi.RedisProtocol.connectionMade(self)

        if self.password is not None:
            self.auth(self.password, self.username)
        return self.role().addCallback(check_role)


class _MasterConnectionFactory(txredisapi.SentinelConnectionFactory):  # type: ignore[misc]
    protocol = _MasterProtocol


def _select(db: int) -> int | None:
    """The database txredisapi SELECTs on each new connection: None for 0, which every connection starts in.
    A connection lost during that SELECT makes txredisapi stop reconnecting that pool member and leaves an
    unhandled error behind (seen when a test's Redis went away mid-handshake); with the default database there
    is no SELECT to lose."""
    return db or None


class RedisConnection:
    """A lazily connected pool of ``pool_size`` connections to ``address``."""

    def __init__(
        self, address: RedisAddress, *, reactor: IRouterReactor, timeout: float, pool_size: int = 4
    ) -> None:
        self.address = address
        self._reactor = reactor
        self._timeout = timeout
        self._healthy = True
        self._sentinel: Any = None
        options: dict[str, Any] = {
            "isLazy": True,
            "charset": None,
            "password": address.password,
            "replyTimeout": max(0.05, timeout * 0.8),
            "convertNumbers": False,
            "username": address.username,
        }
        if address.sentinels:
            # The sentinels' own connections keep txredisapi's defaults: it parses their replies as text.
            self._sentinel = txredisapi.Sentinel(list(address.sentinels), replyTimeout=timeout)
            self._sentinel.discovery_timeout = timeout
            self._handler = self._sentinel.master_for(
                address.master_name,
                factory_class=_MasterConnectionFactory,
                dbid=_select(address.db),
                poolsize=pool_size,
                **options,
            )
            self._factory = self._handler._factory
            self._factory.maxDelay = MAX_RECONNECT_DELAY
        else:
            handler = txredisapi.UnixConnectionHandler if address.unix_path else txredisapi.ConnectionHandler
            factory = txredisapi.RedisFactory(
                address.display, _select(address.db), pool_size, handler=handler, **options
            )
            factory.maxDelay = MAX_RECONNECT_DELAY
            factory.initialDelay = min(factory.initialDelay, MAX_RECONNECT_DELAY / 4)
            self._factory = factory
            endpoint: Any
            if address.unix_path:
                endpoint = UNIXClientEndpoint(reactor, address.unix_path, timeout=timeout)
            else:
                endpoint = HostnameEndpoint(reactor, address.host or "", address.port, timeout=timeout)
            factory.startConnecting(endpoint)
            self._handler = factory.handler
        self._closed = False

    def call(self, method: str, *args: Any, refusal_expected: bool = False) -> Deferred:
        """Run txredisapi's ``method`` (``"eval"``, ``"hmget"``, ``"execute_command"``, ...) with a deadline.
        Fails with QueueUnavailable for any Redis or connection problem; with ``refusal_expected`` a refused
        command (an error reply) fails with txredisapi's ResponseError instead, and is not logged."""
        if self._closed:
            return fail(QueueUnavailable(f"the Redis queue at {self.address.display} is closed"))
        try:
            d = getattr(self._handler, method)(*args)
        except Exception as e:  # noqa: BLE001 (a failure for the caller)
            return fail(self._failed(Failure(e)))
        d.addTimeout(self._timeout, self._reactor)
        d.addCallbacks(self._succeeded, self._failed, errbackArgs=(refusal_expected,))
        return d

    def call_replicated(self, method: str, *args: Any) -> Deferred:
        """:meth:`call`, and then, when the address asks for replicas (``wait``), Redis's ``WAIT`` on the same
        connection: fires with the reply only once that many replicas have the write (and every write before
        it). Fewer within half the deadline: QueueUnavailable (the write is on the master and may still be
        applied: a ``451`` then means a possible duplicate, never a loss)."""
        replicas = self.address.wait_replicas
        if not replicas:
            return self.call(method, *args)
        if self._closed:
            return fail(QueueUnavailable(f"the Redis queue at {self.address.display} is closed"))
        d = Deferred.fromCoroutine(self._replicated(method, args, replicas))
        d.addTimeout(self._timeout, self._reactor)
        d.addCallbacks(self._succeeded, self._failed)
        return d

    async def _replicated(self, method: str, args: tuple[Any, ...], replicas: int) -> Any:
        # Taken out of the pool, so the WAIT follows this write on its connection (WAIT counts the
        # replication offset of its own client's last write).
        connection = await self._factory.getConnection(peek=False)
        try:
            reply = await getattr(connection, method)(*args)
            acknowledged = await connection.execute_command("WAIT", replicas, int(self._timeout * 500))
        finally:
            self._factory.connectionQueue.put(connection)
        if int(acknowledged) < replicas:
            raise QueueUnavailable(
                f"Redis at {self.address.display}: only {int(acknowledged)} of {replicas} replicas confirmed "
                "a write in time"
            )
        return reply

    def disconnect(self) -> Deferred:
        """Close every connection and stop reconnecting. Fires once closed (or after the deadline)."""
        self._closed = True
        if self._sentinel is not None:
            self._sentinel.disconnect().addErrback(lambda f: None)
        d = self._factory.disconnect()
        d.addTimeout(self._timeout, self._reactor)
        d.addErrback(lambda f: log.failure("Redis connections did not close cleanly", f))
        return d

    def _succeeded(self, result: Any) -> Any:
        if not self._healthy:
            self._healthy = True
            log.info("Redis at {address} answers again", address=self.address.display)
        return result

    def _failed(self, failure: Failure, refusal_expected: bool = False) -> Failure:
        if failure.check(QueueError) or (refusal_expected and failure.check(txredisapi.ResponseError)):
            return failure
        if failure.check(defer.TimeoutError, defer.CancelledError, txredisapi.TimeoutError):
            reason = f"Redis at {self.address.display} did not answer within {self._timeout:g} s"
        elif failure.check(txredisapi.ConnectionError):
            reason = f"no connection to Redis at {self.address.display}: {failure.getErrorMessage()}"
        elif failure.check(txredisapi.ResponseError) and failure.getErrorMessage().startswith(
            UNAVAILABLE_REPLIES
        ):
            reason = f"Redis at {self.address.display} cannot take writes now: {failure.getErrorMessage()}"
        elif failure.check(txredisapi.ResponseError):
            reason = f"Redis at {self.address.display} refused a command: {failure.getErrorMessage()}"
            # Not an outage: a script error or a refused command is worth the whole traceback.
            log.failure("Redis queue: command refused", failure)
        else:
            reason = f"Redis queue: {failure.getErrorMessage()}"
            log.failure("Redis queue: unexpected error", failure)
        if self._healthy:
            self._healthy = False
            log.error("Redis queue unavailable: {reason}", reason=reason)
        unavailable = QueueUnavailable(reason)
        unavailable.__cause__ = failure.value
        return Failure(unavailable)

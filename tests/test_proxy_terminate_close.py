"""How a terminated (TLS-ending) connection ends, without sockets: a whole ProxySession on a terminating
route, a real TLS client in memory (Python's ``ssl`` over MemoryBIO), backends answered by the test on
MemoryReactorClock.

The wire between client and session honours the session's flow control as a socket does: while the
session's transport is paused, nothing the client sent — bytes or its FIN — is delivered. Every ending
kind must reach ``connectionLost`` (the file handle and the per-IP slot released): after a ``400``, after
``Connection: close``, after the client's close_notify or FIN, when the backend closes or cannot be
reached, on the idle timeout; and a client that never answers our close is aborted after CLOSE_TIMEOUT.
"""

from __future__ import annotations

import datetime
import ssl
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dcrouter.net.certfiles import generate_self_signed
from dcrouter.net.certstore import CertificateStore, CertifiedKey
from dcrouter.proxy.http import HttpForwarder
from dcrouter.proxy.routes import PortRange, ProxyRoute, ProxyTarget, RouteTable
from dcrouter.proxy.session import ProxyContext, ProxySession, ProxySettings
from dcrouter.proxy.terminate import CLOSE_TIMEOUT, TerminatedTls
from tests.test_proxy_forward import BufferingTransport

CERT, KEY = generate_self_signed("a.test")

GET = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
GET_CLOSE = b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
TWO_LENGTHS = b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def terminating_route(timeout_ms: int | None = None) -> ProxyRoute:
    return ProxyRoute(
        name="a",
        priority=0,
        ports=(PortRange(443, 443),),
        domains=("a.test",),
        client_ips=None,
        allow=None,
        block=None,
        target=ProxyTarget(("10.0.0.1",), 8080),
        tls_mode="terminate",
        max_connections=None,
        connection_timeout_ms=timeout_ms,
        source="a",
    )


class Wire:
    """A client socket to a ProxySession: Python's TLS client over memory, the session's transport as the
    server side of the socket. Bytes and EOF from the client reach the session only while its transport
    is producing (a paused socket is not read)."""

    def __init__(self, session: ProxySession, transport: BufferingTransport) -> None:
        self.session = session
        self.transport = transport
        context = ssl.create_default_context(cadata=CERT.decode())
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="a.test")
        self.unread = b""  # sent by the client, not yet read by the session
        self.fin_sent = False
        self.fin_read = False
        self.received = b""  # plaintext the client read
        self.close_notify_received = False

    def reading(self) -> bool:
        return self.transport.producerState == "producing" and not self.transport.disconnecting

    def pump(self) -> None:
        """Move what can move both ways until nothing does."""
        while True:
            moved = False
            self.unread += self.outgoing.read()
            if self.unread and self.reading():
                data, self.unread = self.unread, b""
                self.session.dataReceived(data)
                moved = True
            if self.fin_sent and not self.fin_read and not self.unread and self.reading():
                self.fin_read = True
                self.session.readConnectionLost()
                moved = True
            to_client = self.transport.value()
            if to_client:
                self.transport.clear()
                self.incoming.write(to_client)
                moved = True
            self._client_reads()
            if not moved and not self.outgoing.pending:
                return

    def _client_reads(self) -> None:
        try:
            self.tls.do_handshake()
            while True:
                chunk = self.tls.read(65536)
                if not chunk:  # an SSLObject reads b"" once the peer's close_notify came
                    self.close_notify_received = True
                    break
                self.received += chunk
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self.close_notify_received = True

    def handshake(self) -> None:
        self.pump()
        self.tls.do_handshake()

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self.pump()

    def close_notify(self) -> None:
        """The client's TLS close (it does not wait for ours)."""
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        self.pump()

    def fin(self) -> None:
        self.fin_sent = True
        self.pump()


class TerminatedEndingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        wall = Clock()
        wall.advance(datetime.datetime.now(datetime.UTC).timestamp())
        store = CertificateStore(clock=wall)
        store.put("a.test", CertifiedKey.from_pem(CERT, KEY))
        self.store = store

    def open(self, timeout_ms: int | None = None) -> Wire:
        routes = RouteTable([terminating_route(timeout_ms)])
        self.ctx = ProxyContext(routes, ProxySettings(), self.reactor, certificates=self.store)
        transport = BufferingTransport(limit=10**9)
        transport.peerAddr = IPv4Address("TCP", "192.0.2.1", 40000)
        transport.hostAddr = IPv4Address("TCP", "127.0.0.1", 443)
        session = ProxySession(self.ctx, 443)
        session.makeConnection(transport)
        wire = Wire(session, transport)
        wire.handshake()
        self.assertIsInstance(session.front, HttpForwarder)
        return wire

    def backend(self, index: int = -1) -> tuple[Any, BufferingTransport]:
        factory = self.reactor.tcpClients[index][2]
        protocol = factory.buildProtocol(None)
        transport = BufferingTransport(limit=10**9)
        protocol.makeConnection(transport)
        return protocol, transport

    def assertEnds(self, wire: Wire) -> None:
        """The session closed the socket; once the loss is reported, nothing is left held."""
        self.assertTrue(wire.transport.disconnecting, "the socket was never closed")
        wire.session.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.ctx.per_ip, {})
        self.assertEqual(self.ctx.counters["a"].active, 0)
        self.assertEqual(self.ctx.sessions, set())
        # A backend connection left in step outlives the client's, idle in the route-wide pool until its
        # time there runs out: the pool's one timer is all that may be left.
        pool = self.ctx.backend_pool
        left = [call for call in self.reactor.getDelayedCalls() if call.func != pool._expire]
        self.assertEqual(left, [])
        self.reactor.advance(pool.idle_timeout + 1)
        self.assertEqual(pool.count, 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    # -- the proxy ends the connection ----------------------------------------------------------------

    def test_connection_close_then_the_clients_fin(self) -> None:
        wire = self.open()
        wire.send(GET_CLOSE)
        backend, _ = self.backend()
        backend.dataReceived(OK)
        wire.pump()
        self.assertTrue(wire.received.endswith(b"\r\n\r\nok"))
        self.assertTrue(wire.close_notify_received)
        # Reading resumes once the proxy closes: the client's FIN must be heard.
        self.assertEqual(wire.transport.producerState, "producing")
        self.assertFalse(wire.transport.disconnecting)
        wire.fin()
        self.assertEnds(wire)

    def test_bad_request_then_the_clients_fin(self) -> None:
        wire = self.open()
        wire.send(TWO_LENGTHS)
        self.assertTrue(wire.received.startswith(b"HTTP/1.1 400 Bad Request\r\n"))
        self.assertTrue(wire.close_notify_received)
        wire.fin()
        self.assertEnds(wire)

    def test_bad_request_then_the_clients_close_notify(self) -> None:
        wire = self.open()
        wire.send(TWO_LENGTHS)
        wire.close_notify()
        self.assertEnds(wire)

    def test_a_client_that_never_answers_our_close_is_aborted(self) -> None:
        wire = self.open()
        wire.send(TWO_LENGTHS)
        self.reactor.advance(CLOSE_TIMEOUT - 0.1)
        self.assertFalse(wire.transport.aborted)
        self.reactor.advance(0.1)
        self.assertTrue(wire.transport.aborted)
        self.assertEnds(wire)

    def test_backend_unreachable(self) -> None:
        wire = self.open()
        wire.send(GET)
        factory = self.reactor.tcpClients[-1][2]
        factory.clientConnectionFailed(self.reactor.connectors[-1], Failure(ConnectionRefusedError()))
        wire.pump()
        self.assertTrue(wire.received.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), wire.received)
        self.assertEqual(wire.transport.producerState, "producing")
        wire.fin()
        self.assertEnds(wire)

    def test_backend_closes_a_response_delimited_by_close(self) -> None:
        wire = self.open()
        wire.send(GET)
        backend, _ = self.backend()
        backend.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nuntil close")
        backend.connectionLost(Failure(ConnectionDone()))
        wire.pump()
        self.assertTrue(wire.received.endswith(b"until close"))
        self.assertTrue(wire.close_notify_received)
        wire.fin()
        self.assertEnds(wire)

    def test_backend_closes_before_answering(self) -> None:
        wire = self.open()
        wire.send(GET)
        backend, _ = self.backend()
        backend.connectionLost(Failure(ConnectionDone()))
        wire.pump()
        self.assertTrue(wire.received.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), wire.received)
        wire.fin()
        self.assertEnds(wire)

    def test_idle_timeout_while_waiting_for_the_backend(self) -> None:
        wire = self.open(timeout_ms=5000)
        wire.send(GET)
        self.backend()  # connected, never answers; the client is read (nothing pipelined to hold back)
        self.assertEqual(wire.transport.producerState, "producing")
        self.reactor.advance(5)
        self.assertTrue(wire.transport.aborted)
        self.assertEnds(wire)

    # -- the client ends the connection ---------------------------------------------------------------

    def test_client_gone_while_the_backend_is_connected(self) -> None:
        wire = self.open()
        wire.send(GET)
        wire.transport.clear()
        wire.session.connectionLost(Failure(ConnectionDone()))  # cancels the connection attempt
        wire.incoming.write(wire.transport.value())
        with self.assertRaises(ssl.SSLError):  # the TLS layer's alert for a connection cut short
            wire._client_reads()
        self.assertEqual(wire.received, b"", "no 502 into a connection that is gone")
        self.assertEqual(self.ctx.per_ip, {})
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_client_fin_between_requests(self) -> None:
        wire = self.open()
        wire.send(GET)
        backend, _ = self.backend()
        backend.dataReceived(OK)
        wire.pump()
        self.assertTrue(wire.received.endswith(b"ok"))
        wire.fin()
        self.assertEnds(wire)

    def test_client_fin_right_after_its_request(self) -> None:
        # The FIN waits in the socket while the client is paused for the response, then ends it.
        wire = self.open()
        wire.tls.write(GET)
        wire.fin()
        backend, _ = self.backend()
        backend.dataReceived(OK)
        wire.pump()
        self.assertTrue(wire.received.endswith(b"ok"))
        self.assertEnds(wire)

    def test_client_close_notify_between_requests(self) -> None:
        wire = self.open()
        wire.send(GET)
        backend, backend_transport = self.backend()
        backend.dataReceived(OK)
        wire.close_notify()
        self.assertEnds(wire)
        self.assertTrue(backend_transport.disconnecting, "the backend connection is closed too")

    def test_client_close_notify_first_then_connection_close(self) -> None:
        # The client's close_notify arrives while it is paused for the response; the proxy's own close
        # after the response must still read it.
        wire = self.open()
        wire.send(GET_CLOSE)
        wire.close_notify()
        backend, _ = self.backend()
        backend.dataReceived(OK)
        wire.pump()
        self.assertEnds(wire)

    def test_a_client_close_notify_whose_answer_is_never_taken_is_aborted(self) -> None:
        # The TLS layer answers and closes the socket itself; that close waits for a client that may
        # never read our last bytes.
        wire = self.open()
        wire.send(GET)
        backend, _ = self.backend()
        backend.dataReceived(OK)
        wire.close_notify()
        self.assertTrue(wire.transport.disconnecting)
        self.reactor.advance(CLOSE_TIMEOUT)
        self.assertTrue(wire.transport.aborted)
        self.assertEnds(wire)

    def test_client_fin_during_the_handshake(self) -> None:
        self.ctx = ProxyContext(
            RouteTable([terminating_route()]), ProxySettings(), self.reactor, certificates=self.store
        )
        transport = BufferingTransport(limit=10**9)
        transport.peerAddr = IPv4Address("TCP", "192.0.2.1", 40000)
        transport.hostAddr = IPv4Address("TCP", "127.0.0.1", 443)
        session = ProxySession(self.ctx, 443)
        session.makeConnection(transport)
        wire = Wire(session, transport)
        try:
            wire.tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        wire.fin()
        self.assertIsInstance(session._receiver, TerminatedTls)
        self.reactor.advance(0)
        self.assertEnds(wire)


class PooledBackendTests(SynchronousTestCase):
    """Backend connections kept in step are shared by later client connections (the process's pool), only
    with requests balancing sends to their target; any that are out of step are closed, idle ones after a
    bound."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        wall = Clock()
        wall.advance(datetime.datetime.now(datetime.UTC).timestamp())
        self.store = CertificateStore(clock=wall)
        self.store.put("a.test", CertifiedKey.from_pem(CERT, KEY))
        route = terminating_route()
        route = ProxyRoute(**{**route.__dict__, "target": ProxyTarget(("10.0.0.1", "10.0.0.2"), 8080)})
        self.ctx = ProxyContext(RouteTable([route]), ProxySettings(), self.reactor, certificates=self.store)
        self.backends: list[tuple[Any, BufferingTransport]] = []

    def open(self) -> Wire:
        transport = BufferingTransport(limit=10**9)
        transport.peerAddr = IPv4Address("TCP", "192.0.2.1", 40000)
        transport.hostAddr = IPv4Address("TCP", "127.0.0.1", 443)
        session = ProxySession(self.ctx, 443)
        session.makeConnection(transport)
        wire = Wire(session, transport)
        wire.handshake()
        return wire

    def connect_new(self) -> tuple[Any, BufferingTransport]:
        """Let the newest connection attempt succeed."""
        self.assertEqual(len(self.reactor.tcpClients), len(self.backends) + 1)
        factory = self.reactor.tcpClients[-1][2]
        protocol = factory.buildProtocol(None)
        transport = BufferingTransport(limit=10**9)
        protocol.makeConnection(transport)
        self.backends.append((protocol, transport))
        return protocol, transport

    def request(self, request: bytes = GET, response: bytes = OK) -> tuple[Wire, Any, BufferingTransport]:
        """One client connection, one request answered by a backend (a new one when none was at hand)."""
        wire = self.open()
        before = len(self.reactor.tcpClients)
        wire.send(request)
        if len(self.reactor.tcpClients) > before:
            backend, transport = self.connect_new()
        else:
            backend, transport = next(
                (b, t)
                for b, t in self.backends
                if getattr(b._wrappedProtocol.forwarder, "phase", None) == "wait"
            )
        backend.dataReceived(response)
        wire.pump()
        self.assertTrue(wire.received.endswith(response[-2:]))
        return wire, backend, transport

    def end(self, wire: Wire) -> None:
        wire.fin()
        wire.session.connectionLost(Failure(ConnectionDone()))

    def target_of(self, transport: BufferingTransport) -> str:
        index = next(i for i, (_, t) in enumerate(self.backends) if t is transport)
        return str(self.reactor.tcpClients[index][0])

    def test_a_later_client_connection_takes_the_idle_backend_connection(self) -> None:
        first, _, transport = self.request()
        self.end(first)
        self.assertEqual(self.ctx.backend_pool.count, 1)
        self.assertFalse(transport.disconnecting)
        # Round robin over two targets: the next request goes to the other one, which has none idle.
        second, _, other = self.request()
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertNotEqual(self.target_of(other), self.target_of(transport))
        self.end(second)
        # The third goes to the first target again: its idle connection carries it, no new one is opened.
        transport.clear()
        third, _, _ = self.request()
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertTrue(transport.value().startswith(b"GET / HTTP/1.1\r\n"))
        self.end(third)
        self.assertEqual(self.ctx.backend_pool.count, 2)

    def test_connection_close_from_the_backend_is_never_reused(self) -> None:
        wire, _, transport = self.request(
            response=b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
        )
        self.end(wire)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.ctx.backend_pool.count, 0)

    def test_a_response_not_read_whole_is_never_reused(self) -> None:
        wire = self.open()
        wire.send(GET)
        backend, transport = self.connect_new()
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok")
        wire.pump()
        self.end(wire)  # the client goes away with 8 bytes of the body still to come
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.ctx.backend_pool.count, 0)

    def test_an_answer_before_the_request_body_ended_is_never_reused(self) -> None:
        wire = self.open()
        wire.send(b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 10\r\n\r\nab")
        backend, transport = self.connect_new()
        backend.dataReceived(OK)
        wire.pump()
        self.assertTrue(wire.received.endswith(b"ok"))
        self.end(wire)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.ctx.backend_pool.count, 0)

    def test_idle_connections_are_closed_after_the_bound(self) -> None:
        wire, _, transport = self.request()
        self.end(wire)
        pool = self.ctx.backend_pool
        self.reactor.advance(pool.idle_timeout - 0.5)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(1.5)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(pool.count, 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_bytes_on_an_idle_connection_close_it(self) -> None:
        wire, backend, transport = self.request()
        self.end(wire)
        backend.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.ctx.backend_pool.count, 0)

    def test_a_reload_drops_idle_connections(self) -> None:
        wire, _, transport = self.request()
        self.end(wire)
        self.ctx.replace(self.ctx.table, self.ctx.settings)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.ctx.backend_pool.count, 0)

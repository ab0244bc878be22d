"""The splice between a client and its backend: ordering, flow control, half-close, timeouts, counters.

Transports are in-memory: :class:`BufferingTransport` behaves as a TCP transport does towards its producer
(pause it when more than ``limit`` bytes wait to be sent, resume it once they are sent), so a reader that
stops reading is a transport that is never drained.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from dcrouter.proxy.forward import BackendProtocol, RouteCounters, Splice


class BufferingTransport(StringTransport):
    """A StringTransport with a send buffer of ``limit`` bytes and a write half that can be shut."""

    def __init__(self, limit: int = 1000) -> None:
        super().__init__()
        self.limit = limit
        self.write_closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        assert not self.write_closed, "write after EOF"
        super().write(data)
        if len(self.io.getvalue()) > self.limit and self.producer is not None:
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        """The peer read everything: the buffer empties and the producer may go on."""
        data = self.value()
        self.clear()
        if self.producer is not None:
            self.producer.resumeProducing()
        return data

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class SpliceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.client = BufferingTransport()
        self.backend = BackendProtocol()
        self.backend_transport = BufferingTransport()
        self.backend.makeConnection(self.backend_transport)
        self.counters = RouteCounters()
        self.done: list[bool] = []

    def splice(self, first: bytes = b"", idle: float | None = None) -> Splice:
        self.client.pauseProducing()  # as the session leaves it while connecting
        splice = Splice(
            self.client,
            self.backend,
            counters=self.counters,
            clock=self.clock,
            idle_timeout=idle,
            on_done=lambda: self.done.append(True),
        )
        splice.start(first)
        return splice

    def test_replayed_bytes_go_first_then_both_ways(self) -> None:
        splice = self.splice(b"PROXY ...\r\n\x16\x03\x01hello")
        self.assertEqual(self.client.producerState, "producing")
        splice.client_data(b" more")
        self.backend.dataReceived(b"answer")
        self.assertEqual(self.backend_transport.value(), b"PROXY ...\r\n\x16\x03\x01hello more")
        self.assertEqual(self.client.value(), b"answer")
        self.assertEqual(
            (self.counters.bytes_in, self.counters.bytes_out),
            (len(b"PROXY ...\r\n\x16\x03\x01hello more"), 6),
        )

    def test_backend_bytes_before_start_are_kept(self) -> None:
        """A server that speaks first (an SMTP greeting) may answer before the splice is attached."""
        self.backend.dataReceived(b"220 hello\r\n")
        self.backend.readConnectionLost()
        self.splice()
        self.assertEqual(self.client.value(), b"220 hello\r\n")
        self.assertTrue(self.client.write_closed)

    def test_slow_client_pauses_reading_from_backend(self) -> None:
        self.splice()
        self.assertEqual(self.backend_transport.producerState, "producing")
        self.backend.dataReceived(b"x" * 600)
        self.assertEqual(self.backend_transport.producerState, "producing")
        self.backend.dataReceived(b"x" * 600)  # the client has read nothing: its buffer passes the limit
        self.assertEqual(self.backend_transport.producerState, "paused")
        self.assertEqual(self.client.producerState, "producing")  # the other direction is unaffected
        self.assertEqual(len(self.client.drain()), 1200)
        self.assertEqual(self.backend_transport.producerState, "producing")

    def test_slow_backend_pauses_reading_from_client(self) -> None:
        splice = self.splice()
        splice.client_data(b"y" * 1001)
        self.assertEqual(self.client.producerState, "paused")
        self.backend_transport.drain()
        self.assertEqual(self.client.producerState, "producing")

    def test_replay_that_fills_the_backend_leaves_the_client_paused(self) -> None:
        self.splice(b"z" * 2000)
        self.assertEqual(self.client.producerState, "paused")

    def test_client_eof_shuts_backend_write_side_only(self) -> None:
        splice = self.splice()
        splice.client_eof()
        self.assertTrue(self.backend_transport.write_closed)
        self.assertFalse(self.backend_transport.disconnecting)
        self.assertIsNone(self.backend_transport.producer)  # no paused producer may hold the EOF back
        self.backend.dataReceived(b"late answer")
        self.assertEqual(self.client.value(), b"late answer")
        self.assertFalse(self.client.disconnecting)
        self.backend.readConnectionLost()
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(self.backend_transport.disconnecting)

    def test_backend_eof_shuts_client_write_side_only(self) -> None:
        splice = self.splice()
        self.backend.readConnectionLost()
        self.assertTrue(self.client.write_closed)
        self.assertFalse(self.client.disconnecting)
        splice.client_data(b"still uploading")
        self.assertEqual(self.backend_transport.value(), b"still uploading")
        splice.client_eof()
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(self.backend_transport.disconnecting)

    def test_client_lost_closes_backend_and_finishes_once(self) -> None:
        splice = self.splice()
        splice.client_lost()
        self.assertTrue(self.backend_transport.disconnecting)
        self.assertIsNone(self.backend_transport.producer)
        self.assertEqual(self.done, [])
        self.backend.connectionLost()
        splice.client_lost()
        self.assertEqual(self.done, [True])

    def test_backend_lost_closes_client(self) -> None:
        splice = self.splice()
        self.backend.connectionLost()
        self.assertTrue(self.client.disconnecting)
        splice.client_lost()
        self.assertEqual(self.done, [True])

    def test_backend_lost_before_start(self) -> None:
        self.backend.connectionLost()
        self.splice()
        self.assertTrue(self.client.disconnecting)

    def test_idle_timeout_counts_traffic_both_ways(self) -> None:
        splice = self.splice(idle=30)
        self.clock.advance(20)
        splice.client_data(b"ping")
        self.clock.advance(20)
        self.backend.dataReceived(b"pong")
        self.clock.advance(29)
        self.assertFalse(self.client.aborted)
        self.clock.advance(1)
        self.assertTrue(self.client.aborted)
        self.assertTrue(self.backend_transport.aborted)
        self.assertEqual(splice.close_reason, "idle for 30s")

    def test_no_idle_timeout_when_not_configured(self) -> None:
        self.splice(idle=None)
        self.clock.advance(10**6)
        self.assertFalse(self.client.aborted)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timer_cancelled_when_both_gone(self) -> None:
        splice = self.splice(idle=30)
        splice.client_lost()
        self.backend.connectionLost()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_and_abort(self) -> None:
        splice = self.splice()
        splice.close("shutdown")
        self.assertTrue(self.client.disconnecting and self.backend_transport.disconnecting)
        self.assertEqual(splice.close_reason, "shutdown")
        other: Any = self
        other.setUp()
        splice = self.splice()
        splice.abort("stop")
        self.assertTrue(self.client.aborted and self.backend_transport.aborted)

"""set_no_delay turns Nagle off where there is a TCP socket and leaves anything else alone. (That
connect_quietly's connections log nothing about their factory takes a real connector: tests/integration/.)"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import TestCase

from dcrouter.net.quiet import eager_writes, set_no_delay


class NoDelayTests(TestCase):
    def test_tcp_transport_gets_nodelay(self) -> None:
        transport = StringTransportWithNoDelay()
        set_no_delay(transport)
        self.assertTrue(transport.no_delay)

    def test_transport_without_tcp_options_is_left_alone(self) -> None:
        """No setTcpNoDelay (a UNIX socket, an in-memory transport): it is asked for that and nothing else."""
        transport = TransportWithoutTcpOptions()
        self.assertIsNone(set_no_delay(transport))
        self.assertEqual(transport.asked, ["setTcpNoDelay"])

    def test_closed_socket_is_ignored(self) -> None:
        """The socket closed under us: the attempt was made, and its OSError goes no further."""
        calls: list[bool] = []

        class Closed:
            def setTcpNoDelay(self, enabled: bool) -> None:
                calls.append(enabled)
                raise OSError(9, "Bad file descriptor")

        self.assertIsNone(set_no_delay(Closed()))
        self.assertEqual(calls, [True])


class StringTransportWithNoDelay:
    no_delay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled


class TransportWithoutTcpOptions:
    """Records every attribute it is asked for; it has none."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.asked.append(name)
        raise AttributeError(name)


class FakeSocket:
    """What eager_writes uses of a socket: ``send``, taking at most ``room`` bytes (then EAGAIN)."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.sent = b""

    def send(self, data: bytes) -> int:
        if self.room <= 0:
            raise BlockingIOError(11, "would block")
        taken = bytes(data[: self.room])
        self.room -= len(taken)
        self.sent += taken
        return len(taken)

    def fileno(self) -> int:
        return 99


def fd_transport(room: int) -> tuple[Any, FakeSocket, Any]:
    """A Twisted FileDescriptor (the base of its TCP transports) on a fake socket and a MemoryReactor."""
    from twisted.internet.abstract import FileDescriptor
    from twisted.internet.testing import MemoryReactor

    reactor = MemoryReactor()
    sock = FakeSocket(room)

    class Transport(FileDescriptor):
        def writeSomeData(self, data: bytes) -> int:
            try:
                return sock.send(data)
            except BlockingIOError:
                return 0

    transport = Transport(reactor=reactor)
    transport.socket = sock
    transport.connected = True
    return transport, sock, reactor


class EagerWriteTests(TestCase):
    def test_a_write_to_an_empty_buffer_is_sent_at_once(self) -> None:
        transport, sock, reactor = fd_transport(room=100)
        eager_writes(transport)
        transport.write(b"hello")
        self.assertEqual(sock.sent, b"hello")
        self.assertEqual(reactor.getWriters(), [])  # never handed to the reactor

    def test_what_the_socket_does_not_take_is_buffered_in_order(self) -> None:
        transport, sock, reactor = fd_transport(room=3)
        eager_writes(transport)
        transport.write(b"hello")
        sock.room = 100  # the socket would take more now, but "lo" is still buffered:
        transport.write(b" world")  # this one waits behind it
        self.assertEqual(sock.sent, b"hel")
        self.assertEqual(reactor.getWriters(), [transport])
        transport.doWrite()
        self.assertEqual(sock.sent, b"hello world")

    def test_a_closing_transport_is_left_to_twisted(self) -> None:
        transport, sock, _ = fd_transport(room=100)
        eager_writes(transport)
        transport.disconnecting = True
        transport.write(b"late")
        self.assertEqual(sock.sent, b"")

    def test_a_transport_without_a_socket_is_left_alone(self) -> None:
        from twisted.internet.testing import StringTransport

        transport = StringTransport()
        eager_writes(transport)
        self.assertNotIn("write", vars(transport))

"""set_no_delay turns Nagle off where there is a TCP socket and leaves anything else alone. (That
connect_quietly's connections log nothing about their factory takes a real connector: tests/integration/.)"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import TestCase

from dcrouter.net.quiet import set_no_delay


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

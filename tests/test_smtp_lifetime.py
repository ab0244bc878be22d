"""How long an SMTP session may last and how it ends: the deadline of each command line, the minimum DATA
rate, the junk command limit, the pregreet check and a graceful stop. Byte-exact StringTransport transcripts
on a Clock."""

from __future__ import annotations

import os

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from dcrouter.smtp.policy import SessionPolicy
from tests.smtp_fixtures import (
    EHLO_PLAIN,
    GREETING,
    PEER_IP,
    ControlledQueue,
    Server,
    connect,
    make_config,
)

MAIL = b"MAIL FROM:<sender@example.net>\r\n"
RCPT = b"RCPT TO:<rcpt@example.org>\r\n"
MESSAGE = b"Subject: hi\r\n\r\nHello.\r\n.\r\n"
OK = b"250 2.0.0 Ok\r\n"
START_DATA = b"354 End data with <CR><LF>.<CR><LF>\r\n"
TIMEOUT = b"421 4.4.2 mx.example.test Error: timeout exceeded\r\n"
TOO_MANY_ERRORS = b"421 4.7.0 Too many errors\r\n"
PREGREET = b"521 5.5.1 Protocol error: client sent data before the greeting\r\n"
SHUTTING_DOWN = b"421 4.3.2 mx.example.test Service shutting down, try again later\r\n"


def queued(server: Server, index: int = -1) -> bytes:
    return b"250 2.0.0 Ok: queued as %s\r\n" % server.queue.items[index].id.encode()


def in_data(server: Server) -> None:
    """Take ``server`` through EHLO, MAIL, RCPT and DATA, up to the 354."""
    out = server.exchange(b"EHLO client.example\r\n" + MAIL + RCPT + b"DATA\r\n")
    assert out.endswith(START_DATA), out


def another_session(server: Server, peer: str = "192.0.2.11") -> Server:
    """A second session accepted by ``server``'s factory (so by its listeners and its registry)."""
    factory = server.factory
    protocol = factory.buildProtocol(IPv4Address("TCP", peer, 40001))
    transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40001))
    protocol.makeConnection(transport)
    return Server(protocol, transport, server.clock, server.queue, factory)


class CommandDeadlineTests(unittest.TestCase):
    """commandTimeout: a command line must be complete within it, counted from its first byte."""

    def config(self, **changes):
        return make_config(command_timeout=60_000, **changes)

    def test_dripped_line_is_cut_at_the_deadline(self) -> None:
        """One byte every 10 s never leaves the client idle for socketTimeout (30 s), yet the line ends 60 s
        after its first byte."""
        server = connect(self.config())
        out = server.exchange(b"N")
        for byte in b"OOP 1":
            server.clock.advance(10)
            out += server.exchange(bytes([byte]))
        self.assertEqual(out, b"")
        server.clock.advance(10)
        self.assertEqual(server.take(), TIMEOUT)
        self.assertTrue(server.transport.disconnecting)
        self.assertEqual(server.exchange(b"\r\n"), b"")

    def test_each_line_has_its_own_deadline(self) -> None:
        """Counted from the line's own first byte: not from the previous reply, nor from an earlier line."""
        server = connect(self.config())
        out = b""
        for _ in range(3):
            server.clock.advance(20)  # idle before the line: socketTimeout's business, not the deadline's
            for byte in b"NOOP\r\n":
                out += server.exchange(bytes([byte]))
                server.clock.advance(9)
        self.assertEqual(out, OK * 3)
        self.assertFalse(server.transport.disconnecting)

    def test_line_and_next_line_in_one_chunk(self) -> None:
        """A line that ends in the chunk that begins the next one hands that one a fresh deadline."""
        server = connect(self.config())
        server.exchange(b"NO")
        server.clock.advance(29)
        server.exchange(b"OP")
        server.clock.advance(29)
        self.assertEqual(server.exchange(b"\r\nNO"), OK)
        server.clock.advance(29)
        server.exchange(b"O")
        server.clock.advance(29)
        self.assertEqual(server.exchange(b"P\r\n"), OK)
        server.clock.advance(2)
        self.assertEqual(server.take(), b"")

    def test_over_long_line_being_discarded_is_still_bounded(self) -> None:
        server = connect(self.config())
        self.assertEqual(server.exchange(b"x" * 600), b"500 5.5.2 Line too long\r\n")
        for _ in range(5):
            server.clock.advance(10)
            self.assertEqual(server.exchange(b"x"), b"")
        server.clock.advance(10)
        self.assertEqual(server.take(), TIMEOUT)

    def test_the_servers_own_wait_is_not_counted(self) -> None:
        """A line begun while a command waits on the queue gets its whole deadline once the reply is out."""
        queue = ControlledQueue(auto=False)
        server = connect(self.config(socket_timeout=120_000), queue=queue)
        in_data(server)
        self.assertEqual(server.exchange(MESSAGE + b"NO"), b"")
        server.clock.advance(100)
        queue.pending[0].callback(queue.items[0])
        self.assertEqual(server.take(), queued(server))
        server.clock.advance(59)
        self.assertEqual(server.exchange(b"OP\r\nNO"), OK)
        server.clock.advance(60)
        self.assertEqual(server.take(), TIMEOUT)

    def test_sasl_response_line_has_a_deadline(self) -> None:
        from dcrouter.config.auth import AuthConfig

        server = connect(self.config(auth=AuthConfig(allow_insecure=True, failure_delay=0)))
        server.exchange(b"EHLO c\r\n")
        self.assertEqual(server.exchange(b"AUTH LOGIN\r\n"), b"334 VXNlcm5hbWU6\r\n")
        for part in (b"YW", b"xp", b"Y2"):
            self.assertEqual(server.exchange(part), b"")
            server.clock.advance(20)
        self.assertEqual(server.take(), TIMEOUT)


class DataRateTests(unittest.TestCase):
    """minDataRate: a DATA transfer starts with commandTimeout to go; each octet adds 1/minDataRate s, never
    to more than commandTimeout ahead."""

    def config(self, **changes):
        values = {"command_timeout": 60_000, "min_data_rate": 100, "data_timeout": 600_000}
        values.update(changes)
        return make_config(**values)

    def drip(self, server: Server, seconds: int, every: int = 10) -> bytes:
        out = b""
        for _ in range(seconds // every):
            server.clock.advance(every)
            out += server.exchange(b"x")
        return out

    def test_dripping_data_is_cut(self) -> None:
        """1 octet every 10 s is never idle for socketTimeout and far under dataTimeout (600 s): cut after
        60 s and the octets' own 0.01 s each."""
        server = connect(self.config())
        in_data(server)
        self.assertEqual(self.drip(server, 50), b"")
        server.clock.advance(10)
        self.assertEqual(server.take(), b"")  # 5 octets bought 0.05 s more
        server.clock.advance(0.1)
        self.assertEqual(server.take(), TIMEOUT)
        self.assertTrue(server.transport.disconnecting)
        self.assertEqual(server.exchange(b"\r\n.\r\n"), b"")
        self.assertEqual(server.queue.items, [])

    def test_steady_slow_sender_is_not_cut(self) -> None:
        """200 octets a second for two minutes (twice commandTimeout) keeps up with 100/s."""
        server = connect(self.config(max_message_size=100_000))
        in_data(server)
        line = b"y" * 198 + b"\r\n"
        for _ in range(120):
            server.clock.advance(1)
            self.assertEqual(server.exchange(line), b"")
        self.assertEqual(server.exchange(b".\r\n"), queued(server))

    def test_credit_is_capped_at_the_allowance(self) -> None:
        """A burst does not buy idle time beyond commandTimeout: 5,000 octets at once (50 s at 100/s) and
        then a drip is still cut 60 s after the burst."""
        server = connect(self.config())
        in_data(server)
        self.assertEqual(server.exchange((b"z" * 98 + b"\r\n") * 50), b"")
        self.assertEqual(self.drip(server, 60), b"")
        server.clock.advance(1)
        self.assertEqual(server.take(), TIMEOUT)

    def test_zero_rate_leaves_only_data_timeout(self) -> None:
        server = connect(self.config(min_data_rate=0, data_timeout=100_000))
        in_data(server)
        self.assertEqual(self.drip(server, 90), b"")
        server.clock.advance(10)
        self.assertEqual(server.take(), TIMEOUT)

    def test_rate_ends_with_the_data(self) -> None:
        server = connect(self.config())
        in_data(server)
        self.assertEqual(server.exchange(MESSAGE), queued(server))
        server.clock.advance(29)
        self.assertEqual(server.exchange(b"NOOP\r\n"), OK)
        server.clock.advance(29)
        self.assertEqual(server.exchange(b"QUIT\r\n"), b"221 2.0.0 Bye\r\n")


class JunkCommandTests(unittest.TestCase):
    """maxJunkCommands: beyond it, each junk command also counts toward maxBadCommands (Postfix)."""

    def test_noop_flood_is_bounded_by_default(self) -> None:
        """10,000 NOOPs in a row: 100 free (the default), then 5 errors (maxBadCommands here) end it."""
        server = connect()
        self.assertEqual(server.exchange(b"NOOP\r\n" * 10_000), OK * 105 + TOO_MANY_ERRORS)
        self.assertTrue(server.transport.disconnecting)

    def test_what_counts_as_junk(self) -> None:
        server = connect(make_config(max_junk_commands=4, max_bad_commands=3))
        self.assertEqual(
            server.exchange(b"EHLO c\r\nRSET\r\nVRFY x\r\nHELP\r\nNOOP\r\n"),
            EHLO_PLAIN
            + OK
            + b"252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n"
            + b"214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS AUTH\r\n"
            + OK,
        )
        # The fifth (a repeated greeting) and later ones are errors; the third error ends the session.
        self.assertEqual(
            server.exchange(b"EHLO c\r\n" + MAIL + b"NOOP\r\nHELO c\r\nNOOP\r\n"),
            EHLO_PLAIN + b"250 2.1.0 Ok\r\n" + OK + b"250 mx.example.test\r\n" + TOO_MANY_ERRORS,
        )

    def test_junk_and_real_errors_add_up(self) -> None:
        server = connect(make_config(max_junk_commands=2, max_bad_commands=3))
        self.assertEqual(
            server.exchange(b"NOOP\r\nNOOP\r\nFOO\r\nNOOP\r\nNOOP\r\n"),
            OK * 2 + b"500 5.5.1 Error: command not recognized\r\n" + OK * 2 + TOO_MANY_ERRORS,
        )

    def test_count_restarts_after_an_accepted_message(self) -> None:
        server = connect(make_config(max_junk_commands=3, max_bad_commands=1))
        out = server.exchange(b"EHLO c\r\n" + b"NOOP\r\n" * 3 + MAIL + RCPT + b"DATA\r\n" + MESSAGE)
        self.assertTrue(
            out.endswith(OK * 3 + b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n" + START_DATA + queued(server))
        )
        self.assertEqual(server.exchange(b"NOOP\r\n" * 3), OK * 3)
        self.assertEqual(server.exchange(b"NOOP\r\n"), OK + TOO_MANY_ERRORS)

    def test_trusted_clients_may_repeat_the_greeting(self) -> None:
        """A client in relayNetworks (or authenticated) may greet again and again; NOOP still counts."""
        server = connect(make_config(max_junk_commands=1, max_bad_commands=1, relay_networks=[PEER_IP]))
        self.assertEqual(server.exchange(b"EHLO c\r\n" * 5), EHLO_PLAIN * 5)
        self.assertEqual(server.exchange(b"NOOP\r\nNOOP\r\n"), OK * 2 + TOO_MANY_ERRORS)
        untrusted = connect(make_config(max_junk_commands=1, max_bad_commands=1))
        self.assertEqual(untrusted.exchange(b"EHLO c\r\n" * 3), EHLO_PLAIN * 3 + TOO_MANY_ERRORS)


class PregreetTests(unittest.TestCase):
    """pregreetDelay: the 220 waits; a client that talks first is refused (postscreen's pregreet test)."""

    def test_talking_first_is_refused(self) -> None:
        config = make_config(pregreet_delay=3_000)
        policy = SessionPolicy(config)
        server = connect(config, greet=False, policy=policy)
        server.clock.advance(1)
        self.assertEqual(server.take(), b"")
        self.assertEqual(server.exchange(b"EHLO bot.example\r\n"), PREGREET)
        self.assertTrue(server.transport.disconnecting)
        server.clock.advance(10)
        self.assertEqual(server.exchange(b"MAIL FROM:<a@b.example>\r\n"), b"")
        self.assertEqual(server.clock.getDelayedCalls(), [])
        server.protocol.connectionLost()
        self.assertEqual(policy.connections, 0)

    def test_patient_client_is_greeted(self) -> None:
        server = connect(make_config(pregreet_delay=3_000), greet=False)
        server.clock.advance(2.9)
        self.assertEqual(server.take(), b"")
        server.clock.advance(0.1)
        self.assertEqual(server.take(), GREETING)
        self.assertEqual(server.exchange(b"EHLO c\r\n"), EHLO_PLAIN)

    def test_idle_time_counts_from_the_greeting(self) -> None:
        server = connect(make_config(pregreet_delay=20_000), greet=False)
        server.clock.advance(20)
        self.assertEqual(server.take(), GREETING)
        server.clock.advance(29)
        self.assertEqual(server.take(), b"")
        server.clock.advance(1)
        self.assertEqual(server.take(), TIMEOUT)

    def test_off_by_default(self) -> None:
        self.assertEqual(connect(greet=False).take(), GREETING)


class GracefulStopTests(unittest.TestCase):
    """A session's part of a stop (OpenSessions.shut_down): 421 4.3.2 at once when idle, after the
    transaction in flight otherwise; close_for_shutdown when the grace period is over."""

    def stop(self, server: Server) -> None:
        server.factory.sessions.shut_down()

    def test_idle_session_is_told_at_once(self) -> None:
        server = connect()
        server.exchange(b"EHLO c\r\n")
        self.stop(server)
        self.assertEqual(server.take(), SHUTTING_DOWN)
        self.assertTrue(server.transport.disconnecting)

    def test_partial_command_line_is_idle(self) -> None:
        server = connect()
        server.exchange(b"EHLO c\r\nNOO")
        self.stop(server)
        self.assertEqual(server.take(), SHUTTING_DOWN)

    def test_session_with_a_transaction_is_told_at_its_next_command(self) -> None:
        server = connect()
        server.exchange(b"EHLO c\r\n" + MAIL)
        self.stop(server)
        self.assertEqual(server.take(), b"")
        self.assertEqual(server.exchange(RCPT + b"DATA\r\n"), SHUTTING_DOWN)
        self.assertTrue(server.transport.disconnecting)
        self.assertEqual(server.queue.items, [])

    def test_session_in_data_gets_its_250_first(self) -> None:
        server = connect()
        in_data(server)
        server.exchange(b"Subject: in flight\r\n\r\n")
        self.stop(server)
        self.assertEqual(server.take(), b"")
        self.assertEqual(server.exchange(b"body\r\n.\r\nQUIT\r\n"), queued(server) + SHUTTING_DOWN)
        self.assertTrue(server.transport.disconnecting)
        self.assertEqual(len(server.queue.items), 1)
        self.assertTrue(server.queue.bodies[0].endswith(b"Subject: in flight\r\n\r\nbody\r\n"))

    def test_session_waiting_for_the_queue_gets_its_250_first(self) -> None:
        queue = ControlledQueue(auto=False)
        server = connect(queue=queue)
        in_data(server)
        server.exchange(MESSAGE + b"NOOP\r\n")
        self.stop(server)
        self.assertEqual(server.take(), b"")
        queue.pending[0].callback(queue.items[0])
        self.assertEqual(server.take(), queued(server) + SHUTTING_DOWN)

    def test_refused_message_ends_the_transaction_too(self) -> None:
        server = connect()
        in_data(server)
        self.stop(server)
        out = server.exchange(b"bare\nLF\r\n.\r\n")
        self.assertTrue(out.startswith(b"550 5.6.0 Message refused: bare CR or LF"), out)
        self.assertTrue(out.endswith(b"\r\n" + SHUTTING_DOWN), out)
        self.assertEqual(out.count(b"\r\n"), 2)

    def test_new_connection_while_stopping_is_refused(self) -> None:
        server = connect()
        self.stop(server)
        late = another_session(server)
        self.assertEqual(late.take(), SHUTTING_DOWN)
        self.assertTrue(late.transport.disconnecting)

    def test_session_before_its_greeting_is_told_at_once(self) -> None:
        server = connect(make_config(pregreet_delay=5_000), greet=False)
        self.stop(server)
        self.assertEqual(server.take(), SHUTTING_DOWN)
        self.assertEqual(server.clock.getDelayedCalls(), [])

    def test_grace_over_closes_a_session_in_data(self) -> None:
        server = connect()
        in_data(server)
        server.exchange(b"Subject: late\r\n")
        spooled = set(os.listdir(server.factory.spool_directory))
        self.stop(server)
        server.protocol.close_for_shutdown()
        self.assertEqual(server.take(), SHUTTING_DOWN)
        self.assertTrue(server.transport.disconnecting)
        self.assertEqual(server.exchange(b".\r\n"), b"")
        self.assertEqual(server.queue.items, [])
        self.assertLessEqual(set(os.listdir(server.factory.spool_directory)), spooled)

    def test_registry_counts_open_sessions(self) -> None:
        server = connect()
        second = another_session(server)
        sessions = server.factory.sessions
        self.assertEqual(len(sessions), 2)
        second.exchange(b"QUIT\r\n")
        second.protocol.connectionLost()
        self.assertEqual(len(sessions), 1)
        server.protocol.connectionLost()
        self.assertEqual(len(sessions), 0)


#: The smallest valid smtpConfig: one plain port.
PLAIN_SMTP = {"hostname": "mx.example.test", "ports": [2525], "implicitTlsPorts": [], "submissionPorts": []}


class LifetimeConfigTests(unittest.TestCase):
    """The smtpConfig keys of this module: Postfix-like defaults, and bad values named by their key path."""

    def test_defaults(self) -> None:
        from dcrouter.config import load_options

        smtp = load_options({"smtpConfig": PLAIN_SMTP}).options.smtp_config
        assert smtp is not None
        self.assertEqual(
            (
                smtp.command_timeout,
                smtp.min_data_rate,
                smtp.max_junk_commands,
                smtp.pregreet_delay,
                smtp.shutdown_grace_period,
            ),
            (300_000, 500, 100, 0, 30_000),
        )

    def test_bad_values(self) -> None:
        from dcrouter.config import ConfigError, load_options

        bad = {
            **PLAIN_SMTP,
            "commandTimeout": 0,
            "minDataRate": -1,
            "maxJunkCommands": 0,
            "pregreetDelay": -5,
            "shutdownGracePeriod": -1,
        }
        with self.assertRaises(ConfigError) as raised:
            load_options({"smtpConfig": bad})
        self.assertEqual(
            list(raised.exception.errors),
            [
                "smtpConfig.maxJunkCommands: must be at least 1: 0",
                "smtpConfig.commandTimeout: must be a positive number of milliseconds: 0",
                "smtpConfig.minDataRate: must be at least 0: -1",
                "smtpConfig.pregreetDelay: must be at least 0: -5",
                "smtpConfig.shutdownGracePeriod: must be at least 0: -1",
            ],
        )
        load_options({"smtpConfig": {**PLAIN_SMTP, "minDataRate": 0, "shutdownGracePeriod": 0}})

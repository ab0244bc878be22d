"""ESMTPTransport end to end against scripted downstream servers in memory (127.0.0.1, and 127.0.0.2 for a
second target; iosim with real TLS), with the real client, pool, MX resolver (over an in-memory zone) and
target health; timers on a Clock."""

from __future__ import annotations

import io
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.names import dns, error
from twisted.names.common import ResolverBase
from zope.interface.verify import verifyObject

from dcrouter.delivery.mx import MxResolver
from dcrouter.delivery.outcome import DeliveryReport, Outcome
from dcrouter.delivery.route import Route
from dcrouter.delivery.transport import ESMTPTransport
from dcrouter.interfaces import ClaimLost, IDeliveryTransport
from dcrouter.mail.envelope import Envelope
from dcrouter.net.targets import Target, TargetHealth
from dcrouter.queue.item import QueueItem
from tests.downstream import Downstream, Script, _ScriptedSMTP
from tests.test_delivery_pool import PoolTestCase, TlsMaterial

#: Lines that need dot-stuffing and 8-bit text: they must arrive byte-identical.
BODY = (
    b"From: Alice <alice@sender.test>\r\n"
    b"Subject: transport\r\n"
    b"\r\n"
    b".\r\n"
    b"..x\r\n"
    b"caf\xc3\xa9 \xe2\x82\xac\r\n"
    b"end\r\n"
)
SENDER = "alice@sender.test"


class Zone(ResolverBase):
    """DNS data for the MX resolver: ``{(name, type): [payload, ...]}``; unknown names are NXDOMAIN, and
    names in ``failing`` answer SERVFAIL."""

    def __init__(self, records: dict[tuple[str, int], list[Any]], failing: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.records = records
        self.failing = failing

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[Any]:
        text = name.decode().lower()
        if text in self.failing:
            return fail(error.DNSServerError(text))
        if not any(key[0] == text for key in self.records):
            return fail(error.DNSNameError(text))
        answers = [
            dns.RRHeader(name=text, type=type, payload=payload, ttl=60)
            for payload in self.records.get((text, type), [])
        ]
        return succeed((answers, [], []))


class TrackedBody(io.BytesIO):
    """The message file ``open_body`` hands out; the test checks each one was closed."""


class TransportTestCase(PoolTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.bodies: list[TrackedBody] = []
        self.zone = Zone({})
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def transport(self, trust_root: Any = None, **config: Any) -> ESMTPTransport:
        self.health = TargetHealth(self.clock, down_time=300)
        self.connection_pool = self.pool(trust_root=trust_root, **config)
        return ESMTPTransport(
            resolver=MxResolver(self.zone), health=self.health, pool=self.connection_pool, clock=self.clock
        )

    def summary_line(self) -> str:
        """The transport's one line about the last delivery (its final ``delivery of ... via ...`` event)."""
        lines = [
            formatEvent(e)
            for e in self.events
            if e.get("log_namespace") == "dcrouter.delivery.transport"
            and "{queue_id} via {route}" in e["log_format"]
        ]
        self.assertTrue(lines, "no delivery line was logged")
        return lines[-1]

    def open_body(self) -> Deferred[Any]:
        body = TrackedBody(BODY)
        self.bodies.append(body)
        return succeed(body)

    def deliver(
        self, transport: ESMTPTransport, route: Route, recipients: list[str]
    ) -> Deferred[DeliveryReport]:
        item = QueueItem(
            id="Q1",
            envelope=Envelope(mail_from=SENDER, recipients=recipients, mail_params={"BODY": "8BITMIME"}),
            size=len(BODY),
        )
        return transport.deliver(item, route, recipients, self.open_body)

    def outcomes(self, report: DeliveryReport) -> list[tuple[str, Outcome, int, str]]:
        return [(r.recipient, r.outcome, r.code, r.enhanced) for r in report.results]

    def assertBodiesClosed(self) -> None:
        self.assertTrue(self.bodies, "open_body was never called")
        self.assertTrue(all(body.closed for body in self.bodies))

    def second_server(self, first: Downstream, script: Script | None = None) -> Downstream:
        """A server on 127.0.0.2 at ``first``'s port (two targets of one route share the port)."""
        return self.network.downstream(script, address="127.0.0.2", port=first.port)


def two_targets(port: int) -> Route:
    return Route(name="domain:example.test", targets=("127.0.0.2", "127.0.0.1"), port=port)


def local_route(port: int, **changes: Any) -> Route:
    return Route(name="domain:example.test", targets=("127.0.0.1",), port=port, **changes)


class InterfaceTests(TransportTestCase):
    def test_provides(self) -> None:
        self.assertTrue(verifyObject(IDeliveryTransport, self.transport()))


class ReplyTests(TransportTestCase):
    def test_delivered(self) -> None:
        """250 everywhere: every recipient DELIVERED, the message byte-identical, the envelope as given."""
        downstream = self.downstream()
        transport = self.transport()

        async def check() -> None:
            recipients = ["bob@example.test", "carol@example.test"]
            report = await self.deliver(transport, local_route(downstream.port), recipients)
            where = f"127.0.0.1:{downstream.port}"
            self.assertEqual(
                self.outcomes(report), [(r, Outcome.DELIVERED, 250, "2.0.0") for r in recipients]
            )
            self.assertEqual({r.target for r in report.results}, {where})
            self.assertEqual(report.tried, [f"{where} answered"])
            self.assertEqual(report.route_name, "domain:example.test")
            self.assertEqual(
                self.summary_line(),
                f"delivery of Q1 via domain:example.test to {where}: recipients: 2 delivered",
            )
            [message] = downstream.messages
            self.assertEqual((message.mail_from, message.recipients), (SENDER, recipients))
            self.assertEqual(message.data, BODY)
            self.assertIn(b"...x\r\n", message.raw)
            self.assertIn("BODY=8BITMIME", downstream.commands()[1])
            self.assertBodiesClosed()

        self.drive(check())

    def test_451_then_250(self) -> None:
        """451 after the data: every recipient TEMPORARY with that reply; the next attempt is delivered."""
        downstream = self.downstream(Script(data=["451 4.3.0 Try again later", "250 2.0.0 Ok"]))
        transport = self.transport()

        async def check() -> None:
            route = local_route(downstream.port)
            first = await self.deliver(transport, route, ["bob@example.test"])
            self.assertEqual(self.outcomes(first), [("bob@example.test", Outcome.TEMPORARY, 451, "4.3.0")])
            self.assertEqual(first.results[0].text, "Try again later")
            self.assertEqual(first.results[0].target, f"127.0.0.1:{downstream.port}")
            second = await self.deliver(transport, route, ["bob@example.test"])
            self.assertEqual(self.outcomes(second), [("bob@example.test", Outcome.DELIVERED, 250, "2.0.0")])
            self.assertEqual(len(downstream.messages), 2)
            self.assertBodiesClosed()

        self.drive(check())

    def test_one_recipient_refused(self) -> None:
        """550 for one of three recipients: it is PERMANENT, the other two DELIVERED, in the given order."""
        downstream = self.downstream(Script(rcpt={"nobody@example.test": "550 5.1.1 No such user"}))
        transport = self.transport()

        async def check() -> None:
            recipients = ["bob@example.test", "nobody@example.test", "carol@example.test"]
            report = await self.deliver(transport, local_route(downstream.port), recipients)
            self.assertEqual(
                self.outcomes(report),
                [
                    ("bob@example.test", Outcome.DELIVERED, 250, "2.0.0"),
                    ("nobody@example.test", Outcome.PERMANENT, 550, "5.1.1"),
                    ("carol@example.test", Outcome.DELIVERED, 250, "2.0.0"),
                ],
            )
            self.assertEqual(downstream.messages[0].recipients, ["bob@example.test", "carol@example.test"])

        self.drive(check())

    def test_rcpt_4xx(self) -> None:
        """A 452 for one recipient defers only that one."""
        downstream = self.downstream(Script(rcpt={"full@example.test": "452 4.2.2 Mailbox full"}))
        transport = self.transport()

        async def check() -> None:
            report = await self.deliver(
                transport, local_route(downstream.port), ["full@example.test", "bob@example.test"]
            )
            self.assertEqual(
                self.outcomes(report),
                [
                    ("full@example.test", Outcome.TEMPORARY, 452, "4.2.2"),
                    ("bob@example.test", Outcome.DELIVERED, 250, "2.0.0"),
                ],
            )

        self.drive(check())

    def test_mail_5xx(self) -> None:
        """550 to MAIL FROM: every recipient PERMANENT with that reply."""
        downstream = self.downstream(Script(mail="550 5.7.1 Sender rejected"))
        transport = self.transport()

        async def check() -> None:
            report = await self.deliver(
                transport, local_route(downstream.port), ["a@example.test", "b@example.test"]
            )
            self.assertEqual(
                self.outcomes(report),
                [
                    ("a@example.test", Outcome.PERMANENT, 550, "5.7.1"),
                    ("b@example.test", Outcome.PERMANENT, 550, "5.7.1"),
                ],
            )
            self.assertEqual(downstream.messages, [])

        self.drive(check())

    def test_mail_4xx_is_the_answer(self) -> None:
        """451 to MAIL FROM from the first target tried: every recipient TEMPORARY, and the other target is
        not asked (a reachable server's 4xx is its answer)."""
        accepting = self.downstream()
        greylisting = self.second_server(accepting, Script(mail="451 4.7.1 Greylisted"))
        transport = self.transport()

        async def check() -> None:
            report = await self.deliver(transport, two_targets(accepting.port), ["bob@example.test"])
            self.assertEqual(self.outcomes(report), [("bob@example.test", Outcome.TEMPORARY, 451, "4.7.1")])
            # The first call of the round robin starts with 127.0.0.2, the greylisting one.
            self.assertEqual(report.tried, [f"127.0.0.2:{accepting.port} answered"])
            self.assertEqual(len(greylisting.connections), 1)
            self.assertEqual(accepting.connections, [])
            self.assertEqual(greylisting.messages + accepting.messages, [])

        self.drive(check())


class FailoverTests(TransportTestCase):
    def test_refused_then_delivered(self) -> None:
        """127.0.0.2 refuses, 127.0.0.1 accepts: delivered there, and 127.0.0.2 is marked down."""
        downstream = self.downstream()
        transport = self.transport()

        async def check() -> None:
            report = await self.deliver(transport, two_targets(downstream.port), ["bob@example.test"])
            self.assertEqual(self.outcomes(report), [("bob@example.test", Outcome.DELIVERED, 250, "2.0.0")])
            self.assertEqual(report.results[0].target, f"127.0.0.1:{downstream.port}")
            self.assertEqual(
                report.tried,
                [f"127.0.0.2:{downstream.port} refused", f"127.0.0.1:{downstream.port} answered"],
            )
            self.assertTrue(self.health.is_down(Target("127.0.0.2", "127.0.0.2", downstream.port)))
            self.assertFalse(self.health.is_down(Target("127.0.0.1", "127.0.0.1", downstream.port)))
            self.assertEqual(len(downstream.messages), 1)

        self.drive(check())

    def test_all_refused(self) -> None:
        """No target reachable: every recipient TEMPORARY with the last failure, answered by nobody."""
        transport = self.transport()

        async def check() -> None:
            port = self.network.closed_port()
            report = await self.deliver(transport, two_targets(port), ["a@example.test", "b@example.test"])
            self.assertEqual(
                self.outcomes(report),
                [
                    ("a@example.test", Outcome.TEMPORARY, 451, "4.4.1"),
                    ("b@example.test", Outcome.TEMPORARY, 451, "4.4.1"),
                ],
            )
            self.assertEqual({r.target for r in report.results}, {""})
            self.assertEqual(report.tried, [f"127.0.0.2:{port} refused", f"127.0.0.1:{port} refused"])
            self.assertIn(f"127.0.0.1:{port}", report.results[0].text)
            self.assertEqual(
                self.summary_line(),
                f"delivery of Q1 via domain:example.test: no target reachable (2 tried; last: 451 4.4.1"
                f" Connection refused by 127.0.0.1:{port}); recipients: 2 deferred",
            )

        self.drive(check())

    def test_timeout_mid_transaction(self) -> None:
        """A server that stops answering after MAIL: after socketTimeout (on the clock) the target fails, the
        body is closed, the recipient is TEMPORARY and the target marked down."""
        downstream = self.downstream(Script(hang="MAIL"))
        transport = self.transport(socket_timeout=20_000)

        async def check() -> None:
            delivering = self.deliver(transport, local_route(downstream.port), ["bob@example.test"])
            await self.network.until(
                lambda: any(c.startswith("MAIL") for c in downstream.commands()), "MAIL sent"
            )
            self.assertNoResult(delivering)
            self.clock.advance(20)
            report = await delivering
            self.assertEqual(report.results[0].outcome, Outcome.TEMPORARY)
            self.assertEqual(report.results[0].code, 421)
            self.assertEqual(report.results[0].target, "")
            self.assertTrue(self.health.is_down(Target("127.0.0.1", "127.0.0.1", downstream.port)))
            self.assertEqual(downstream.messages, [])
            self.assertBodiesClosed()

        self.drive(check())


class TlsPolicyTests(TransportTestCase):
    def test_required_tls_not_offered(self) -> None:
        """useTls with a server offering no STARTTLS: TEMPORARY 451 4.7.5, not a byte of the message sent."""
        downstream = self.downstream(Script(tls=None))
        transport = self.transport()

        async def check() -> None:
            route = local_route(downstream.port, require_tls=True)
            report = await self.deliver(transport, route, ["bob@example.test"])
            self.assertEqual(self.outcomes(report), [("bob@example.test", Outcome.TEMPORARY, 451, "4.7.5")])
            self.assertIn("STARTTLS required but not offered", report.results[0].text)
            self.assertEqual(downstream.messages, [])
            commands = downstream.commands()
            self.assertFalse([c for c in commands if c.split(":")[0] in ("MAIL FROM", "RCPT TO", "DATA")])
            self.assertEqual(self.bodies, [])

        self.drive(check())

    def test_required_tls_offered(self) -> None:
        """useTls with STARTTLS offered: the message goes inside TLS."""
        tls = TlsMaterial()
        downstream = self.downstream(Script(tls=tls.server_options))
        transport = self.transport()

        async def check() -> None:
            route = local_route(downstream.port, require_tls=True)
            report = await self.deliver(transport, route, ["bob@example.test"])
            self.assertEqual(report.results[0].outcome, Outcome.DELIVERED)
            self.assertTrue(downstream.messages[0].tls)
            self.assertEqual(downstream.messages[0].data, BODY)

        self.drive(check())

    def test_verified(self) -> None:
        """verifyCertificates with the server's certificate in the trust root (it names 127.0.0.1)."""
        tls = TlsMaterial()
        downstream = self.downstream(Script(tls=tls.server_options))
        transport = self.transport(trust_root=tls.trust_root, verify_certificates=True)

        async def check() -> None:
            report = await self.deliver(transport, local_route(downstream.port), ["bob@example.test"])
            self.assertEqual(report.results[0].outcome, Outcome.DELIVERED)
            self.assertTrue(downstream.messages[0].tls)

        self.drive(check())

    def test_verification_fails(self) -> None:
        """verifyCertificates with an untrusted certificate: TEMPORARY 4.7.5, nothing sent."""
        tls = TlsMaterial()
        downstream = self.downstream(Script(tls=tls.server_options))
        transport = self.transport(trust_root=TlsMaterial().trust_root, verify_certificates=True)

        async def check() -> None:
            report = await self.deliver(transport, local_route(downstream.port), ["bob@example.test"])
            self.assertEqual(self.outcomes(report), [("bob@example.test", Outcome.TEMPORARY, 451, "4.7.5")])
            self.assertEqual(downstream.messages, [])
            self.assertNotIn("MAIL", " ".join(downstream.commands()))

        self.drive(check())


class DnsTests(TransportTestCase):
    def test_null_mx(self) -> None:
        self.zone = Zone({("nomail.test", dns.MX): [dns.Record_MX(0, b"")]})
        transport = self.transport()

        async def check() -> None:
            route = Route(name="mx:nomail.test", mx_domain="nomail.test")
            report = await self.deliver(transport, route, ["a@nomail.test"])
            self.assertEqual(self.outcomes(report), [("a@nomail.test", Outcome.PERMANENT, 556, "5.1.10")])
            self.assertEqual(self.bodies, [])

        self.drive(check())

    def test_no_such_domain(self) -> None:
        transport = self.transport()

        async def check() -> None:
            route = Route(name="mx:missing.test", mx_domain="missing.test")
            report = await self.deliver(transport, route, ["a@missing.test"])
            self.assertEqual(self.outcomes(report), [("a@missing.test", Outcome.PERMANENT, 550, "5.1.2")])

        self.drive(check())

    def test_dns_temporary(self) -> None:
        self.zone = Zone({}, failing=("broken.test",))
        transport = self.transport()

        async def check() -> None:
            route = Route(name="mx:broken.test", mx_domain="broken.test")
            report = await self.deliver(transport, route, ["a@broken.test"])
            self.assertEqual(self.outcomes(report), [("a@broken.test", Outcome.TEMPORARY, 451, "4.4.3")])
            self.assertEqual(
                self.summary_line(),
                "delivery of Q1 via mx:broken.test: no target to try (451 4.4.3 broken.test: MX lookup:"
                " DNS server failure (SERVFAIL)); recipients: 1 deferred",
            )

        self.drive(check())

    def test_mx_delivery(self) -> None:
        """An MX route: the result names the MX host; the history shows its address too."""
        downstream = self.downstream()
        self.zone = Zone(
            {
                ("dest.test", dns.MX): [dns.Record_MX(10, b"mx.dest.test")],
                ("mx.dest.test", dns.A): [dns.Record_A("127.0.0.1")],
            }
        )
        transport = self.transport()

        async def check() -> None:
            route = Route(name="mx:dest.test", mx_domain="dest.test", port=downstream.port)
            report = await self.deliver(transport, route, ["a@dest.test"])
            self.assertEqual(report.results[0].outcome, Outcome.DELIVERED)
            self.assertEqual(report.results[0].target, f"mx.dest.test:{downstream.port}")
            self.assertEqual(report.tried, [f"mx.dest.test[127.0.0.1]:{downstream.port} answered"])

        self.drive(check())


class PoolingTests(TransportTestCase):
    def test_two_messages_one_connection(self) -> None:
        """Two deliveries to one route share a connection, with RSET between them."""
        downstream = self.downstream()
        transport = self.transport()

        async def check() -> None:
            route = local_route(downstream.port)
            for recipient in ("one@example.test", "two@example.test"):
                report = await self.deliver(transport, route, [recipient])
                self.assertEqual(report.results[0].outcome, Outcome.DELIVERED)
            self.assertEqual(len(downstream.connections), 1)
            self.assertEqual(
                [m.recipients for m in downstream.messages], [["one@example.test"], ["two@example.test"]]
            )
            self.assertIn("RSET", downstream.commands())
            self.assertBodiesClosed()

        self.drive(check())

    def test_reset_is_pipelined_with_the_next_transaction(self) -> None:
        """A reused connection's RSET goes in front of the next transaction's commands, in the same group."""
        downstream = self.downstream()
        transport = self.transport()

        async def check() -> None:
            route = local_route(downstream.port)
            for recipient in ("one@example.test", "two@example.test"):
                report = await self.deliver(transport, route, [recipient])
                self.assertEqual(report.results[0].outcome, Outcome.DELIVERED)
            commands = [c.split(":")[0] for c in downstream.commands()]
            after_first = commands[commands.index("DATA") + 1 :]
            self.assertEqual(after_first[:4], ["RSET", "MAIL FROM", "RCPT TO", "DATA"])

        self.drive(check())

    def test_connection_dropped_while_idle_is_replaced_without_failing_the_target(self) -> None:
        """The server dropped the idle connection before the pool noticed: its RSET fails, nothing of the
        transaction counts, and the message goes on a new connection; the target is not marked down."""
        downstream = self.downstream()
        transport = self.transport()

        async def check() -> None:
            route = local_route(downstream.port)
            await self.deliver(transport, route, ["one@example.test"])
            downstream.disconnect()
            report = await self.deliver(transport, route, ["two@example.test"])
            self.assertEqual(self.outcomes(report)[0][1], Outcome.DELIVERED)
            self.assertEqual(report.tried, [f"127.0.0.1:{downstream.port} answered"])
            self.assertEqual([m.connection for m in downstream.messages], [0, 1])
            self.assertBodiesClosed()

        self.drive(check())

    def test_reset_refused_is_a_stale_connection(self) -> None:
        """A 421 to the RSET in front of a transaction: a new connection carries the message."""
        downstream = self.downstream()
        transport = self.transport()

        def going_away(protocol: Any, argument: str) -> None:
            protocol.send("421 4.3.2 Going away")
            protocol.transport.loseConnection()

        async def check() -> None:
            route = local_route(downstream.port)
            await self.deliver(transport, route, ["one@example.test"])
            self.patch(_ScriptedSMTP, "smtp_RSET", going_away)
            report = await self.deliver(transport, route, ["two@example.test"])
            self.assertEqual(self.outcomes(report)[0][1], Outcome.DELIVERED)
            self.assertEqual(len(report.tried), 1)
            self.assertEqual([m.connection for m in downstream.messages], [0, 1])
            self.assertEqual([m.recipients for m in downstream.messages][1], ["two@example.test"])
            self.assertBodiesClosed()

        self.drive(check())

    def test_body_failure_is_an_errback(self) -> None:
        """open_body failing is a local error: the Deferred fails, and the connection stays usable."""
        downstream = self.downstream()
        transport = self.transport()

        async def check() -> None:
            route = local_route(downstream.port)
            item = QueueItem(
                id="Q2", envelope=Envelope(mail_from=SENDER, recipients=["b@example.test"]), size=1
            )
            with self.assertRaises(OSError):
                await transport.deliver(item, route, ["b@example.test"], lambda: fail(OSError("body gone")))
            self.assertEqual(
                self.connection_pool.idle_count(route, Target("127.0.0.1", "127.0.0.1", downstream.port)), 1
            )
            self.flushLoggedErrors(OSError)

        self.drive(check())

    def test_lost_claim_is_an_errback_logged_by_the_manager(self) -> None:
        """ClaimLost from open_body: nothing is sent, the Deferred fails with it, and the transport logs no
        traceback (a foreseen condition the manager reports)."""
        downstream = self.downstream()
        transport = self.transport()

        async def check() -> None:
            route = local_route(downstream.port)
            item = QueueItem(
                id="Q3", envelope=Envelope(mail_from=SENDER, recipients=["b@example.test"]), size=1
            )
            with self.assertRaises(ClaimLost):
                await transport.deliver(item, route, ["b@example.test"], lambda: fail(ClaimLost("lost")))
            self.assertEqual(downstream.messages, [])
            self.assertEqual(self.flushLoggedErrors(ClaimLost), [])

        self.drive(check())

    def test_closes_after_error(self) -> None:
        """A connection that timed out is not reused: the next delivery opens a new one."""
        downstream = self.downstream(Script(hang="end-of-data"))
        transport = self.transport(socket_timeout=5_000)

        async def check() -> None:
            route = local_route(downstream.port)
            delivering = self.deliver(transport, route, ["bob@example.test"])
            await self.network.until(lambda: downstream.messages, "the data sent")
            self.clock.advance(5)
            report = await delivering
            self.assertEqual(report.results[0].outcome, Outcome.TEMPORARY)
            downstream.script.hang = None
            self.health.mark_up(Target("127.0.0.1", "127.0.0.1", downstream.port))
            again = await self.deliver(transport, route, ["bob@example.test"])
            self.assertEqual(again.results[0].outcome, Outcome.DELIVERED)
            self.assertEqual(len(downstream.connections), 2)

        self.drive(check())

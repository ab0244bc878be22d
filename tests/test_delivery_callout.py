"""CalloutProber against scripted downstream servers in memory (127.0.0.1, and 127.0.0.2 for a second target;
iosim with real TLS), with the real client, pool, MX resolver (over an in-memory zone) and target health;
timers on a Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.names import dns

from dcrouter.delivery.callout import GAVE_UP, CalloutAnswer, CalloutProber, ProbeResult
from dcrouter.delivery.mx import MxResolver
from dcrouter.delivery.route import Route
from dcrouter.mail.reply import Reply
from dcrouter.net.targets import Target, TargetHealth
from tests.downstream import Script
from tests.test_delivery_pool import PoolTestCase, TlsMaterial
from tests.test_delivery_transport import Zone, local_route, two_targets

DEADLINE = 30.0


class ProberTestCase(PoolTestCase):
    def prober(self, trust_root: Any = None, zone: Zone | None = None, **config: Any) -> CalloutProber:
        self.health = TargetHealth(self.clock, down_time=300)
        return CalloutProber(
            resolver=MxResolver(zone or Zone({})),
            health=self.health,
            pool=self.pool(trust_root=trust_root, **config),
            clock=self.clock,
        )

    def probe(
        self, prober: CalloutProber, route: Route, recipient: str, sender: str = ""
    ) -> Deferred[ProbeResult]:
        return prober.probe(route, sender, recipient, deadline=self.clock.seconds() + DEADLINE)


class VerdictTests(ProberTestCase):
    def test_known_mailbox(self) -> None:
        """RCPT 250: accepted. The server saw MAIL FROM:<>, RCPT and RSET, never DATA."""
        downstream = self.downstream()
        prober = self.prober()

        async def check() -> None:
            result = await self.probe(prober, local_route(downstream.port), "alice@example.test")
            target = f"127.0.0.1:{downstream.port}"
            self.assertEqual(result, ProbeResult(CalloutAnswer.ACCEPTED, Reply(250, "2.1.5", "Ok"), target))
            self.assertEqual(
                downstream.commands()[1:], ["MAIL FROM:<>", "RCPT TO:<alice@example.test>", "RSET"]
            )
            self.assertEqual(downstream.messages, [])

        self.drive(check())

    def test_unknown_mailbox(self) -> None:
        downstream = self.downstream(Script(rcpt={"nobody@example.test": "550 5.1.1 No such user here"}))
        prober = self.prober()

        async def check() -> None:
            result = await self.probe(prober, local_route(downstream.port), "nobody@example.test")
            self.assertEqual(result.verdict, CalloutAnswer.REJECTED)
            self.assertEqual(result.reply, Reply(550, "5.1.1", "No such user here"))

        self.drive(check())

    def test_temporary_refusal_is_unverified(self) -> None:
        downstream = self.downstream(Script(rcpt_default="450 4.2.0 Greylisted"))
        prober = self.prober()

        async def check() -> None:
            result = await self.probe(prober, local_route(downstream.port), "alice@example.test")
            self.assertEqual((result.verdict, result.reply.code), (CalloutAnswer.UNVERIFIED, 450))

        self.drive(check())

    def test_refused_probe_sender_is_unverified_and_logged(self) -> None:
        """A server refusing MAIL FROM:<> decides nothing about the mailbox; the operator is told why."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        downstream = self.downstream(Script(mail="553 5.7.1 No bounces here"))
        prober = self.prober()

        async def check() -> None:
            result = await self.probe(prober, local_route(downstream.port), "alice@example.test")
            self.assertEqual((result.verdict, result.reply.code), (CalloutAnswer.UNVERIFIED, 553))
            warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
            self.assertTrue(any("refused MAIL FROM:<>: 553" in w for w in warnings), warnings)
            self.assertEqual(len(downstream.connections), 1)  # it answered: no second server asked

        self.drive(check())

    def test_probe_sender(self) -> None:
        downstream = self.downstream()
        prober = self.prober()

        async def check() -> None:
            await self.probe(prober, local_route(downstream.port), "a@example.test", sender="probe@mx.test")
            self.assertIn("MAIL FROM:<probe@mx.test>", downstream.commands())

        self.drive(check())


class TargetTests(ProberTestCase):
    def test_nothing_listening(self) -> None:
        """Connection refused: unverified (never accepted), the target marked down for delivery too."""
        prober = self.prober()

        async def check() -> None:
            port = self.network.closed_port()
            result = await self.probe(prober, local_route(port), "alice@example.test")
            self.assertEqual(
                (result.verdict, result.reply.code, result.target), (CalloutAnswer.UNVERIFIED, 451, "")
            )
            self.assertTrue(self.health.is_down(Target("127.0.0.1", "127.0.0.1", port)))

        self.drive(check())

    def test_failover_to_the_next_target(self) -> None:
        downstream = self.downstream(Script(rcpt_default="550 5.1.1 Unknown"))
        prober = self.prober()

        async def check() -> None:
            result = await self.probe(prober, two_targets(downstream.port), "alice@example.test")
            self.assertEqual(
                (result.verdict, result.target), (CalloutAnswer.REJECTED, f"127.0.0.1:{downstream.port}")
            )
            self.assertTrue(self.health.is_down(Target("127.0.0.2", "127.0.0.2", downstream.port)))

        self.drive(check())

    def test_required_tls_not_offered(self) -> None:
        """The route's TLS policy holds for probes: nothing, not even MAIL, goes out in plaintext."""
        downstream = self.downstream()
        prober = self.prober()

        async def check() -> None:
            route = local_route(downstream.port, require_tls=True)
            result = await self.probe(prober, route, "alice@example.test")
            self.assertEqual((result.verdict, result.reply.enhanced), (CalloutAnswer.UNVERIFIED, "4.7.5"))
            self.assertEqual([c.split()[0] for c in downstream.commands()], ["EHLO"])

        self.drive(check())

    def test_probe_inside_tls_when_offered(self) -> None:
        tls = TlsMaterial()
        downstream = self.downstream(Script(tls=tls.server_options))
        zone = Zone({("downstream.test", dns.A): [dns.Record_A("127.0.0.1")]})
        prober = self.prober(trust_root=tls.trust_root, zone=zone, verify_certificates=True)

        async def check() -> None:
            # Named by its host name, so the certificate is verified against it.
            route = Route(name="domain:example.test", targets=("downstream.test",), port=downstream.port)
            result = await self.probe(prober, route, "alice@example.test")
            self.assertEqual(result.verdict, CalloutAnswer.ACCEPTED)
            self.assertTrue(downstream.connections[0].tls)

        self.drive(check())

    def test_connection_reused_for_the_next_probe(self) -> None:
        downstream = self.downstream()
        prober = self.prober()

        async def check() -> None:
            for recipient in ("a@example.test", "b@example.test"):
                result = await self.probe(prober, local_route(downstream.port), recipient)
                self.assertEqual(result.verdict, CalloutAnswer.ACCEPTED)
            self.assertEqual(len(downstream.connections), 1)

        self.drive(check())

    def test_cancelled_at_the_deadline(self) -> None:
        """A server that stops answering at RCPT: cancelled past the deadline, the probe ends at once,
        unverified, and the target is not marked down (we gave up; it did not fail)."""
        downstream = self.downstream(Script(hang="RCPT"))
        prober = self.prober()

        async def check() -> None:
            probing = self.probe(prober, local_route(downstream.port), "alice@example.test")
            await self.network.until(
                lambda: any(c.startswith("RCPT") for c in downstream.commands()), "RCPT sent"
            )
            self.clock.advance(DEADLINE)
            probing.cancel()
            self.assertEqual(self.successResultOf(probing), ProbeResult(CalloutAnswer.UNVERIFIED, GAVE_UP))
            self.assertFalse(self.health.is_down(Target("127.0.0.1", "127.0.0.1", downstream.port)))
            await self.network.until(lambda: downstream.connections[0].closed, "the probe connection closed")

        self.drive(check())

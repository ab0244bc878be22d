"""ConnectionPool against scripted downstream servers in memory (iosim, with real TLS handshakes): opening
(greeting, EHLO, the TLS policy, AUTH), reuse with RSET, the limits, the idle timeout and closing. Timers run
on a Clock; nothing touches the network."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Coroutine
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.ssl import Certificate, CertificateOptions, TLSVersion
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from dcrouter.config.delivery import DeliveryConfig
from dcrouter.delivery.client import ESMTPClient
from dcrouter.delivery.pool import ConnectionPool, TargetFailure
from dcrouter.delivery.route import Route
from dcrouter.net.certfiles import generate_self_signed, server_tls_options
from dcrouter.net.targets import Target
from tests.downstream import Downstream, MemoryNetwork, Script
from tests.test_net_tls import rsa_self_signed

HELO = "relay.dcrouter.test"
CERT_HOST = "downstream.test"
MESSAGE = b"Subject: pooled\r\n\r\nhello\r\n"


def delivery_config(**changes: Any) -> DeliveryConfig:
    return dataclasses.replace(DeliveryConfig(), **changes)


def local_route(port: int, **changes: Any) -> Route:
    return Route(name="domain:example.test", targets=("127.0.0.1",), port=port, **changes)


def local_target(port: int, host: str = "127.0.0.1") -> Target:
    return Target(host=host, address="127.0.0.1", port=port)


class TlsMaterial:
    """A certificate for ``downstream.test`` (and 127.0.0.1), its server options, and a trust root."""

    def __init__(self, hostname: str = CERT_HOST, **server: Any) -> None:
        self.cert_pem, self.key_pem = generate_self_signed(hostname)
        self.server_options = server_tls_options(self.cert_pem, self.key_pem, **server)
        self.trust_root = Certificate.loadPEM(self.cert_pem)


class PoolTestCase(TestCase):
    """Downstream servers in a MemoryNetwork and a pool connecting through it, timers on a Clock. A test is a
    coroutine run by :meth:`drive`; the pool is closed in cleanup."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.network = MemoryNetwork(self.clock)

    def downstream(self, script: Script | None = None) -> Downstream:
        return self.network.downstream(script)

    def pool(self, trust_root: Any = None, **config: Any) -> ConnectionPool:
        pool = ConnectionPool(
            reactor=self.network.reactor,
            clock=self.clock,
            config=delivery_config(**config),
            helo_name=HELO,
            trust_root=trust_root,
        )
        self.addCleanup(self.close, pool)
        return pool

    def close(self, pool: ConnectionPool) -> None:
        closing = run(pool.close())
        self.network.flush()
        self.successResultOf(closing)

    def drive(self, conversation: Coroutine[Any, Any, None]) -> None:
        """Run ``conversation`` with the network flushed until nothing moves: by then it has finished."""
        done = run(conversation)
        self.network.flush()
        if not done.called:
            waiting = self.network.waiting()
            self.fail(
                "the conversation stopped before its end"
                + (f": {', '.join(waiting)} never happened" if waiting else "")
            )
        self.successResultOf(done)

    async def acquire(self, pool: ConnectionPool, route: Route, target: Target) -> ESMTPClient:
        return await pool.acquire(route, target)

    async def failure(self, pool: ConnectionPool, route: Route, target: Target) -> TargetFailure:
        try:
            client = await pool.acquire(route, target)
        except TargetFailure as failure:
            return failure
        pool.release(route, target, client, reusable=False)
        raise AssertionError("acquire succeeded")

    async def send(self, client: ESMTPClient, recipient: str = "bob@example.test") -> Any:
        return await client.send("alice@sender.test", [recipient], io.BytesIO(MESSAGE), len(MESSAGE))


def run(coroutine: Coroutine[Any, Any, Any]) -> Deferred[Any]:
    return Deferred.fromCoroutine(coroutine)


class OpeningTests(PoolTestCase):
    def test_ready_client(self) -> None:
        """A fresh client is greeted and EHLO'd with our name; the server saw EHLO and nothing else."""
        downstream = self.downstream()
        pool = self.pool()

        async def check() -> None:
            route, target = local_route(downstream.port), local_target(downstream.port)
            client = await pool.acquire(route, target)
            self.assertIsNotNone(client.capabilities)
            self.assertFalse(client.is_tls)
            self.assertEqual(downstream.commands(), [f"EHLO {HELO}"])
            pool.release(route, target, client, reusable=True)

        self.drive(check())

    def test_refused(self) -> None:
        """A closed port fails the target as 451 4.4.1 "refused"."""
        pool = self.pool()

        async def check() -> None:
            port = self.network.closed_port()
            failure = await self.failure(pool, local_route(port), local_target(port))
            self.assertEqual((failure.reply.code, failure.reply.enhanced), (451, "4.4.1"))
            self.assertEqual(failure.summary, "refused")

        self.drive(check())

    def test_greeting_5xx(self) -> None:
        """A 554 greeting fails the target with the server's reply (the caller moves on, never bounces)."""
        downstream = self.downstream(Script(greeting="554 5.7.1 Go away"))
        pool = self.pool()

        async def check() -> None:
            failure = await self.failure(pool, local_route(downstream.port), local_target(downstream.port))
            self.assertEqual((failure.reply.code, failure.reply.enhanced), (554, "5.7.1"))
            self.assertIn("greeting", failure.summary)

        self.drive(check())

    def test_greeting_timeout(self) -> None:
        """A server that never greets: after socketTimeout on the clock, the target fails as a timeout."""
        downstream = self.downstream(Script(hang="greeting"))
        pool = self.pool(socket_timeout=10_000, connect_timeout=3_600_000)

        async def check() -> None:
            acquiring = run(self.failure(pool, local_route(downstream.port), local_target(downstream.port)))
            await self.network.until(lambda: downstream.connections, "the connection")
            self.clock.advance(9.9)
            self.assertNoResult(acquiring)
            self.clock.advance(0.1)
            failure = await acquiring
            self.assertEqual(failure.reply.code, 421)
            self.assertIn("timeout", " ".join(failure.reply.lines()))
            self.assertIn("greeting", failure.summary)

        self.drive(check())


class TlsTests(PoolTestCase):
    def test_opportunistic_verify_off(self) -> None:
        """STARTTLS is used when offered; without verification any certificate is accepted."""
        tls = TlsMaterial()
        downstream = self.downstream(Script(tls=tls.server_options))
        pool = self.pool(verify_certificates=False)

        async def check() -> None:
            route, target = local_route(downstream.port), local_target(downstream.port, host="elsewhere.test")
            client = await pool.acquire(route, target)
            self.assertTrue(client.is_tls)
            self.assertEqual(downstream.commands(), [f"EHLO {HELO}", "STARTTLS", f"EHLO {HELO}"])
            result = await self.send(client)
            pool.release(route, target, client, reusable=True)
            self.assertEqual(result.data.code, 250)
            self.assertTrue(downstream.messages[0].tls)

        self.drive(check())

    def test_verify_on_trusted(self) -> None:
        """With verification, a certificate from the trust root naming the target host is accepted."""
        tls = TlsMaterial()
        downstream = self.downstream(Script(tls=tls.server_options))
        pool = self.pool(trust_root=tls.trust_root, verify_certificates=True)

        async def check() -> None:
            route, target = local_route(downstream.port), local_target(downstream.port, host=CERT_HOST)
            client = await pool.acquire(route, target)
            self.assertTrue(client.is_tls)
            pool.release(route, target, client, reusable=True)

        self.drive(check())

    def test_verify_on_wrong_name(self) -> None:
        """With verification, a certificate that does not name the target host fails the target (4.7.5), even
        for a route that does not require TLS: no plaintext after a failed handshake."""
        tls = TlsMaterial()
        downstream = self.downstream(Script(tls=tls.server_options))
        pool = self.pool(trust_root=tls.trust_root, verify_certificates=True)

        async def check() -> None:
            target = local_target(downstream.port, host="other.test")
            failure = await self.failure(pool, local_route(downstream.port), target)
            self.assertEqual((failure.reply.code, failure.reply.enhanced), (451, "4.7.5"))
            self.assertNotIn("MAIL", " ".join(downstream.commands()))

        self.drive(check())

    def test_verify_on_untrusted(self) -> None:
        """With verification, a certificate not from the trust root fails the target."""
        tls = TlsMaterial()
        other = TlsMaterial()
        downstream = self.downstream(Script(tls=tls.server_options))
        pool = self.pool(trust_root=other.trust_root, verify_certificates=True)

        async def check() -> None:
            target = local_target(downstream.port, host=CERT_HOST)
            failure = await self.failure(pool, local_route(downstream.port), target)
            self.assertEqual(failure.reply.enhanced, "4.7.5")

        self.drive(check())

    def old_server(self) -> Downstream:
        """A server stuck with TLS 1.2 and one CBC static-RSA suite, as some old MX hosts are."""
        cert_pem, key_pem = rsa_self_signed(CERT_HOST)
        options = server_tls_options(cert_pem, key_pem, ciphers="AES128-SHA")
        options.getContext().set_max_proto_version(SSL.TLS1_2_VERSION)
        return self.downstream(Script(tls=options))

    def test_opportunistic_takes_what_an_old_server_has(self) -> None:
        """Opportunistic STARTTLS accepts a weak suite: the alternative is plaintext (or, after a failed
        handshake, no delivery at all)."""
        downstream = self.old_server()
        pool = self.pool()

        async def check() -> None:
            route, target = local_route(downstream.port), local_target(downstream.port)
            client = await pool.acquire(route, target)
            self.assertTrue(client.is_tls)
            result = await self.send(client)
            pool.release(route, target, client, reusable=True)
            self.assertEqual(result.data.code, 250)
            self.assertTrue(downstream.messages[0].tls)

        self.drive(check())

    def test_required_tls_holds_to_the_policy(self) -> None:
        """Required TLS (useTls) is the router's intermediate policy: the same old server fails the target
        with 4.7.5, and nothing is sent."""
        downstream = self.old_server()
        pool = self.pool()

        async def check() -> None:
            route = local_route(downstream.port, require_tls=True)
            failure = await self.failure(pool, route, local_target(downstream.port))
            self.assertEqual((failure.reply.code, failure.reply.enhanced), (451, "4.7.5"))
            self.assertNotIn("MAIL", " ".join(downstream.commands()))

        self.drive(check())

    def test_required_not_offered(self) -> None:
        """require_tls with a server that offers no STARTTLS: 451 4.7.5 naming the server; QUIT follows."""
        downstream = self.downstream(Script(tls=None))
        pool = self.pool()

        async def check() -> None:
            route = local_route(downstream.port, require_tls=True)
            failure = await self.failure(pool, route, local_target(downstream.port))
            self.assertEqual((failure.reply.code, failure.reply.enhanced), (451, "4.7.5"))
            self.assertIn(
                f"STARTTLS required but not offered by 127.0.0.1:{downstream.port}", failure.reply.text
            )
            self.assertEqual(downstream.commands()[0], f"EHLO {HELO}")
            self.assertNotIn("MAIL", " ".join(downstream.commands()))

        self.drive(check())

    def test_min_version(self) -> None:
        """tlsMinVersion TLSv1.3 against a server capped at TLS 1.2: the handshake fails, and the target."""
        tls = TlsMaterial()
        capped = CertificateOptions(
            privateKey=tls.server_options.privateKey,
            certificate=tls.server_options.certificate,
            lowerMaximumSecurityTo=TLSVersion.TLSv1_2,
        )
        downstream = self.downstream(Script(tls=capped))
        pool = self.pool(tls_min_version="TLSv1.3")

        async def check() -> None:
            failure = await self.failure(pool, local_route(downstream.port), local_target(downstream.port))
            self.assertEqual(failure.reply.enhanced, "4.7.5")

        self.drive(check())

    def test_min_version_met(self) -> None:
        """The same server with tlsMinVersion TLSv1.2 works (so the test above can fail)."""
        tls = TlsMaterial()
        capped = CertificateOptions(
            privateKey=tls.server_options.privateKey,
            certificate=tls.server_options.certificate,
            lowerMaximumSecurityTo=TLSVersion.TLSv1_2,
        )
        downstream = self.downstream(Script(tls=capped))
        pool = self.pool(tls_min_version="TLSv1.2")

        async def check() -> None:
            route, target = local_route(downstream.port), local_target(downstream.port)
            client = await pool.acquire(route, target)
            self.assertTrue(client.is_tls)
            pool.release(route, target, client, reusable=True)

        self.drive(check())


class AuthTests(PoolTestCase):
    def test_auth_over_tls(self) -> None:
        """A route with credentials authenticates after STARTTLS; the server saw the user."""
        tls = TlsMaterial()
        downstream = self.downstream(Script(tls=tls.server_options, users={"relayuser": "pw 1"}))
        pool = self.pool()

        async def check() -> None:
            route = local_route(downstream.port, auth_user="relayuser", auth_password="pw 1")
            target = local_target(downstream.port)
            client = await pool.acquire(route, target)
            await self.send(client)
            pool.release(route, target, client, reusable=True)
            self.assertEqual(downstream.commands()[:4], [f"EHLO {HELO}", "STARTTLS", f"EHLO {HELO}", "AUTH"])
            self.assertEqual(downstream.messages[0].auth_user, "relayuser")

        self.drive(check())

    def test_auth_plaintext_loopback(self) -> None:
        """Without TLS, credentials go only to a loopback address (this one is)."""
        downstream = self.downstream(Script(users={"relayuser": "pw"}))
        pool = self.pool()

        async def check() -> None:
            route = local_route(downstream.port, auth_user="relayuser", auth_password="pw")
            target = local_target(downstream.port)
            client = await pool.acquire(route, target)
            pool.release(route, target, client, reusable=True)
            self.assertEqual(downstream.commands(), [f"EHLO {HELO}", "AUTH"])

        self.drive(check())

    def test_auth_rejected(self) -> None:
        """A rejected password fails the target with the server's reply (the transport defers)."""
        downstream = self.downstream(Script(users={"relayuser": "right"}))
        pool = self.pool()

        async def check() -> None:
            route = local_route(downstream.port, auth_user="relayuser", auth_password="wrong")
            failure = await self.failure(pool, route, local_target(downstream.port))
            self.assertEqual(failure.reply.code, 535)
            self.assertNotIn("wrong", str(failure))

        self.drive(check())


class ReuseTests(PoolTestCase):
    def test_two_messages_one_connection(self) -> None:
        """The second acquire reuses the idle connection after an RSET; both messages arrive on it."""
        downstream = self.downstream()
        pool = self.pool()

        async def check() -> None:
            route, target = local_route(downstream.port), local_target(downstream.port)
            first = await pool.acquire(route, target)
            await self.send(first, "one@example.test")
            pool.release(route, target, first, reusable=True)
            self.assertEqual(pool.idle_count(route, target), 1)
            second = await pool.acquire(route, target)
            self.assertIs(second, first)
            await self.send(second, "two@example.test")
            pool.release(route, target, second, reusable=True)
            self.assertEqual(len(downstream.connections), 1)
            self.assertEqual([m.connection for m in downstream.messages], [0, 0])
            commands = [c.split(":")[0] for c in downstream.commands()]
            self.assertEqual(commands[commands.index("DATA") + 1], "RSET")

        self.drive(check())

    def test_not_reusable(self) -> None:
        """A connection released as not reusable is closed and the next acquire opens a new one."""
        downstream = self.downstream()
        pool = self.pool()

        async def check() -> None:
            route, target = local_route(downstream.port), local_target(downstream.port)
            first = await pool.acquire(route, target)
            pool.release(route, target, first, reusable=False)
            self.assertEqual(pool.idle_count(route, target), 0)
            second = await pool.acquire(route, target)
            self.assertIsNot(second, first)
            pool.release(route, target, second, reusable=True)
            self.assertEqual(len(downstream.connections), 2)
            await self.network.until(lambda: downstream.connections[0].closed, "the first connection closed")

        self.drive(check())

    def test_dropped_while_idle(self) -> None:
        """A connection the server dropped while idle is not handed out: a new one is opened."""
        downstream = self.downstream()
        pool = self.pool()

        async def check() -> None:
            route, target = local_route(downstream.port), local_target(downstream.port)
            first = await pool.acquire(route, target)
            pool.release(route, target, first, reusable=True)
            downstream.disconnect()
            await self.network.until(lambda: downstream.connections[0].closed, "the server closed it")
            second = await pool.acquire(route, target)
            self.assertIsNot(second, first)
            result = await self.send(second)
            pool.release(route, target, second, reusable=True)
            self.assertEqual(result.data.code, 250)
            self.assertEqual(len(downstream.connections), 2)

        self.drive(check())

    def test_idle_timeout(self) -> None:
        """An idle connection gets QUIT after idleTimeout (on the clock), and is not reused."""
        downstream = self.downstream()
        pool = self.pool(idle_timeout=5_000)

        async def check() -> None:
            route, target = local_route(downstream.port), local_target(downstream.port)
            client = await pool.acquire(route, target)
            pool.release(route, target, client, reusable=True)
            self.clock.advance(4.9)
            self.assertEqual(pool.idle_count(route, target), 1)
            self.clock.advance(0.1)
            self.assertEqual(pool.idle_count(route, target), 0)
            await self.network.until(lambda: downstream.connections[0].closed, "the connection closed")
            self.assertEqual(downstream.commands()[-1], "QUIT")
            again = await pool.acquire(route, target)
            self.assertIsNot(again, client)
            pool.release(route, target, again, reusable=True)

        self.drive(check())

    def test_max_messages_per_connection(self) -> None:
        """After maxMessagesPerConnection messages, the connection is closed instead of kept."""
        downstream = self.downstream()
        pool = self.pool(max_messages_per_connection=2)

        async def check() -> None:
            route, target = local_route(downstream.port), local_target(downstream.port)
            clients = []
            for _ in range(3):
                client = await pool.acquire(route, target)
                clients.append(client)
                await self.send(client)
                pool.release(route, target, client, reusable=True)
            self.assertIs(clients[1], clients[0])
            self.assertIsNot(clients[2], clients[0])
            self.assertEqual([m.connection for m in downstream.messages], [0, 0, 1])
            await self.network.until(lambda: downstream.connections[0].closed, "the first connection closed")
            self.assertEqual(downstream.connections[0].commands[-1], "QUIT")

        self.drive(check())

    def test_pool_size(self) -> None:
        """At most connectionPoolSize idle connections per key: the extra one is closed on release."""
        downstream = self.downstream()
        pool = self.pool(connection_pool_size=1)

        async def check() -> None:
            route, target = local_route(downstream.port), local_target(downstream.port)
            first = await pool.acquire(route, target)
            second = await pool.acquire(route, target)
            self.assertIsNot(first, second)
            pool.release(route, target, first, reusable=True)
            pool.release(route, target, second, reusable=True)
            self.assertEqual(pool.idle_count(route, target), 1)
            await self.network.until(lambda: downstream.connections[1].closed, "the second connection closed")
            self.assertFalse(downstream.connections[0].closed)

        self.drive(check())

    def test_keys_are_separate(self) -> None:
        """A connection opened for one route is not handed out for another (policies, credentials differ)."""
        downstream = self.downstream()
        pool = self.pool()

        async def check() -> None:
            target = local_target(downstream.port)
            plain, other = (
                local_route(downstream.port),
                Route(name="rule:billing", targets=("127.0.0.1",), port=downstream.port),
            )
            first = await pool.acquire(plain, target)
            pool.release(plain, target, first, reusable=True)
            second = await pool.acquire(other, target)
            self.assertIsNot(second, first)
            pool.release(other, target, second, reusable=True)

        self.drive(check())


class CloseTests(PoolTestCase):
    def test_close(self) -> None:
        """close() QUITs idle connections, aborts busy ones, and refuses later acquires."""
        downstream = self.downstream()
        pool = self.pool()

        async def check() -> None:
            route, target = local_route(downstream.port), local_target(downstream.port)
            idle = await pool.acquire(route, target)
            busy = await pool.acquire(route, target)
            pool.release(route, target, idle, reusable=True)
            await pool.close()
            await self.network.until(
                lambda: all(c.closed for c in downstream.connections), "both connections closed"
            )
            self.assertEqual(downstream.connections[0].commands[-1], "QUIT")
            self.assertNotIn("QUIT", downstream.connections[1].commands)
            with self.assertRaises(TargetFailure):
                await pool.acquire(route, target)
            pool.release(route, target, busy, reusable=True)

        self.drive(check())

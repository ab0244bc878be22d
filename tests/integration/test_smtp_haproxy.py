"""DcRouter's SMTP port behind a real HAProxy (TCP mode, ``send-proxy-v2``): clients connect to HAProxy from
127.0.0.2, 127.0.0.3 and 127.0.0.4, and dcrouter's relay decision, Received field and SPF check show those
addresses, not the proxy's (127.0.0.1). Skipped when Debian's ``haproxy`` is not installed (``make
test-peers`` installs it)."""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import ssl
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from dcrouter import DcRouter
from dcrouter.net.certfiles import generate_self_signed
from dcrouter.net.proxyprotocol import encode_v2
from dcrouter.queue.files import message_reader
from tests.daemons import DaemonProcess
from tests.dns_zone import ZoneAuthority, ZoneServer, txt
from tests.integration import free_ports

HOSTNAME = "localhost"
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
MESSAGE = b"From: <alice@good.test>\r\nTo: <carol@elsewhere.test>\r\nSubject: via haproxy\r\n\r\nbody\r\n"


class HAProxy(DaemonProcess):
    """HAProxy in TCP mode on a free port, sending a PROXY v2 header to ``backend_port``."""

    name = "haproxy"
    start_timeout = 20.0

    def __init__(self, backend_port: int) -> None:
        super().__init__()
        self.config = os.path.join(self.directory, "haproxy.cfg")
        with open(self.config, "w") as f:
            f.write(
                "defaults\n"
                "    mode tcp\n"
                "    timeout connect 5s\n"
                "    timeout client 30s\n"
                "    timeout server 30s\n"
                "frontend smtp\n"
                f"    bind 127.0.0.1:{self.port}\n"
                "    default_backend dcrouter\n"
                "backend dcrouter\n"
                f"    server dcrouter 127.0.0.1:{backend_port} send-proxy-v2\n"
            )

    def command(self) -> list[str]:
        assert HAPROXY is not None
        return [HAPROXY, "-db", "-f", self.config]

    def ready(self) -> bool:
        # Only whether it listens: dcrouter runs on this very reactor, which is not turning now.
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False


def _source_available(address: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


class HAProxyTests(TestCase):
    timeout = 60

    def setUp(self) -> Deferred[None]:
        if HAPROXY is None:
            raise SkipTest("haproxy is not installed (Debian package haproxy; `make test-peers`)")
        if not _source_available("127.0.0.2"):
            raise SkipTest("cannot bind 127.0.0.2 as a client source address")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert_pem, key_pem = generate_self_signed(HOSTNAME)
        self.ca_path = os.path.join(directory, "cert.pem")
        key_path = os.path.join(directory, "key.pem")
        with open(self.ca_path, "wb") as f:
            f.write(cert_pem)
        with open(key_path, "wb") as f:
            f.write(key_pem)
        self.mx, self.implicit = free_ports(2)
        # SPF for good.test allows 127.0.0.4 only: HAProxy's own 127.0.0.1 would fail.
        zone = ZoneAuthority("test", [("good.test", txt("v=spf1 ip4:127.0.0.4 -all"))])
        self.zone = ZoneServer(reactor, zone)
        self.addCleanup(self.zone.stop)
        options = {
            "mtaConfig": {"dnsServers": [f"127.0.0.1:{self.zone.port}"]},
            "smtpConfig": {
                "ports": [self.mx, self.implicit],
                "implicitTlsPorts": [self.implicit],
                "bindAddress": "127.0.0.1",
                "hostname": HOSTNAME,
                "tls": {"certPath": self.ca_path, "keyPath": key_path},
                "queueStorage": "memory",
                "domainConfigs": [{"domains": ["example.test"], "targetIPs": ["127.0.0.1"], "port": 2626}],
                # 127.0.0.2 may relay; HAProxy's own address (127.0.0.1) may not.
                "relayNetworks": ["127.0.0.2/32"],
                "proxyProtocol": "v2",
                "trustedProxies": ["127.0.0.1/32"],
                "verification": {"enabled": True},
            },
        }
        self.router = DcRouter(options, reactor=reactor)
        assert self.router.delivery is not None
        self.router.delivery.pause_deliveries()
        self.router.privilegedStartService()
        self.router.startService()
        self.addCleanup(self.router.stopService)
        self.haproxy = HAProxy(self.mx)
        self.haproxy.start()
        self.addCleanup(shutil.rmtree, self.haproxy.directory, True)
        self.addCleanup(self.haproxy.stop)
        return self.router.when_ready()

    def send(self, source: str, starttls: bool = False, rcpt: str = "carol@elsewhere.test") -> dict[str, Any]:
        """One transaction through HAProxy from ``source``; the replies by step."""
        with smtplib.SMTP(
            "127.0.0.1", self.haproxy.port, "client.test", timeout=20, source_address=(source, 0)
        ) as smtp:
            smtp.ehlo()
            if starttls:
                smtp.starttls(context=ssl.create_default_context(cafile=self.ca_path))
                smtp.ehlo()
            smtp.mail("alice@good.test")
            replies: dict[str, Any] = {"rcpt": smtp.rcpt(rcpt)}
            if replies["rcpt"][0] == 250:
                replies["data"] = smtp.data(MESSAGE)
            return replies

    async def stored(self, reply: tuple[int, bytes]) -> tuple[Any, bytes]:
        code, text = reply
        self.assertEqual(code, 250, text)
        queue_id = text.split(b"queued as ")[1].decode()
        queue = self.router.queue
        assert queue is not None
        item = await queue.get(queue_id)
        body = await queue.open_body(queue_id)
        # As delivery composes it: the header block processing left, then the body.
        with message_reader(item.head, body, item.body_offset) as reader:
            return item, reader.read()

    def test_relay_network_client_through_haproxy(self) -> Deferred[None]:
        """127.0.0.2 is in relayNetworks: relaying is allowed, and Received names 127.0.0.2. STARTTLS
        runs below the PROXY wrapper and the session still learns of the handshake."""

        async def go() -> None:
            replies = await deferToThread(self.send, "127.0.0.2", True)
            self.assertEqual(replies["rcpt"][0], 250, replies)
            item, body = await self.stored(replies["data"])
            received = body.split(b"\r\n\t", 1)[0]
            self.assertIn(b"[127.0.0.2]", body[:300])
            self.assertNotIn(b"127.0.0.1", received)
            self.assertTrue(item.envelope.tls and item.envelope.tls.startswith("TLSv1."), item.envelope.tls)

        return Deferred.fromCoroutine(go())

    def test_other_client_through_haproxy_may_not_relay(self) -> Deferred[None]:
        """127.0.0.3 is not in relayNetworks (nor is the proxy's 127.0.0.1 that carries it): 554 5.7.1."""

        async def go() -> None:
            replies = await deferToThread(self.send, "127.0.0.3")
            code, text = replies["rcpt"]
            self.assertEqual(code, 554, text)
            self.assertTrue(text.startswith(b"5.7.1"), text)

        return Deferred.fromCoroutine(go())

    def test_spf_checks_the_client_behind_haproxy(self) -> Deferred[None]:
        """The client at 127.0.0.4 (outside relayNetworks, so its mail is verified) passes SPF for good.test,
        which allows 127.0.0.4 and not HAProxy's 127.0.0.1."""

        async def go() -> None:
            replies = await deferToThread(self.send, "127.0.0.4", False, "bob@example.test")
            _item, body = await self.stored(replies["data"])
            self.assertTrue(body.startswith(b"Authentication-Results: localhost; spf=pass"), body[:300])
            self.assertIn(b"smtp.mailfrom=good.test", body[:300])

        return Deferred.fromCoroutine(go())

    def test_header_before_implicit_tls(self) -> Deferred[None]:
        """On an implicit-TLS port the header comes first, then the TLS handshake: a trusted peer (127.0.0.1)
        sends a v2 header naming 127.0.0.5, and the session, inside TLS, knows its client as 127.0.0.5."""

        def client() -> tuple[int, bytes]:
            raw = socket.create_connection(("127.0.0.1", self.implicit), timeout=20)
            raw.sendall(
                encode_v2(IPv4Address("TCP", "127.0.0.5", 40000), IPv4Address("TCP", "127.0.0.1", 465))
            )
            context = ssl.create_default_context(cafile=self.ca_path)
            smtp = smtplib.SMTP(local_hostname="client.test", timeout=20)
            smtp._host = "127.0.0.1"  # type: ignore[attr-defined]
            smtp.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
            try:
                smtp.getreply()
                smtp.ehlo()
                smtp.mail("alice@good.test")
                smtp.rcpt("bob@example.test")
                return smtp.data(MESSAGE)
            finally:
                smtp.close()

        async def go() -> None:
            reply = await deferToThread(client)
            item, body = await self.stored(reply)
            self.assertIn(b"[127.0.0.5]", body[:400])
            self.assertEqual(item.envelope.peer_host, "127.0.0.5")
            self.assertTrue(item.envelope.tls, item.envelope)

        return Deferred.fromCoroutine(go())

    def test_trusted_address_without_header_is_not_greeted(self) -> Deferred[None]:
        """A direct connection from 127.0.0.1 (trustedProxies) that sends no header is closed unanswered."""

        def direct() -> bytes:
            with socket.create_connection(("127.0.0.1", self.mx), timeout=20) as s:
                s.sendall(b"EHLO client.test\r\n")
                received = b""
                while True:
                    data = s.recv(4096)
                    if not data:
                        return received
                    received += data

        async def go() -> None:
            self.assertEqual(await deferToThread(direct), b"")

        return Deferred.fromCoroutine(go())

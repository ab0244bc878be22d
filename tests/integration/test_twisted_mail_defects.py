"""twisted.mail's defects that need a real TLS connection to show (the others, and why they matter, are in
tests/test_twisted_mail_defects.py and docs/decisions.md): 127.0.0.1, port 0, a certificate made here."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ClientEndpoint, SSL4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.ssl import CertificateOptions
from twisted.mail import smtp
from twisted.protocols.basic import LineOnlyReceiver
from twisted.trial.unittest import TestCase

from tests.test_twisted_mail_defects import fixed, tls_context


class EhloOverTls(LineOnlyReceiver):
    """Waits for the greeting, sends EHLO, fires ``reply`` with the EHLO reply's lines and closes; ``closed``
    fires once the connection is gone."""

    def __init__(self) -> None:
        self.reply: Deferred[list[bytes]] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.lines: list[bytes] = []
        self.greeted = False

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(None)

    def lineReceived(self, line: bytes) -> None:
        if not self.greeted:
            self.greeted = True
            self.sendLine(b"EHLO client.example")
            return
        self.lines.append(line)
        if line[3:4] == b" ":
            self.transport.loseConnection()
            self.reply.callback(self.lines)


class ClosingESMTP(smtp.ESMTP):
    """twisted.mail's ESMTP, with a Deferred that fires when its connection is gone (its idle timer is then
    cancelled, so the reactor is left clean)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.closed: Deferred[None] = Deferred()

    def connectionLost(self, reason: object) -> None:
        super().connectionLost(reason)
        self.closed.callback(None)


class ImplicitTlsTests(TestCase):
    timeout = 30

    def test_starttls_offered_on_an_implicit_tls_port(self) -> Deferred[None]:
        """Served the usual Twisted way on an implicit-TLS port (an SSL endpoint, the ESMTP given the same
        certificate for STARTTLS), a session already inside TLS is offered STARTTLS."""

        async def go() -> None:
            context = tls_context()
            server_closed: list[Deferred[None]] = []

            def build() -> smtp.ESMTP:
                protocol = ClosingESMTP(None, context)
                server_closed.append(protocol.closed)
                return protocol

            factory = Factory.forProtocol(build)
            endpoint = SSL4ServerEndpoint(reactor, 0, context, interface="127.0.0.1")
            port = await endpoint.listen(factory)
            self.addCleanup(port.stopListening)
            client = SSL4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, CertificateOptions())
            protocol = await client.connect(Factory.forProtocol(EhloOverTls))
            lines = await protocol.reply
            await protocol.closed
            await server_closed[0]
            keywords = [line[4:] for line in lines[1:]]
            if b"STARTTLS" not in keywords:
                raise fixed("offers STARTTLS inside implicit TLS")
            self.assertEqual(keywords, [b"STARTTLS"])

        return Deferred.fromCoroutine(go())

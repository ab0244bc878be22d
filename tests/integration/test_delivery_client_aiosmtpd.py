"""The delivery client against aiosmtpd (STARTTLS required) in its own asyncio loop and thread, over real
sockets on 127.0.0.1: a big message through real TCP and TLS transports that push back on the producer."""

from __future__ import annotations

import asyncio
import io
import os
import ssl
import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from dcrouter.delivery.client import ESMTPClient
from dcrouter.delivery.dotstuff import CHUNK_SIZE
from tests.smtp_fixtures import HOSTNAME
from tests.test_delivery_client_tls import CERT, KEY, assert_same_bytes, client_tls, dotted_message, run


class AiosmtpdHandler:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 Ok: queued"


class AiosmtpdTests(unittest.TestCase):
    """aiosmtpd in its own asyncio loop and thread on 127.0.0.1, with STARTTLS required."""

    timeout = 30

    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        with open(cert_path, "wb") as handle:
            handle.write(CERT)
        with open(key_path, "wb") as handle:
            handle.write(KEY)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
        from aiosmtpd.smtp import SMTP

        self.handler = AiosmtpdHandler()
        self.loop = asyncio.new_event_loop()
        server = self.loop.run_until_complete(
            self.loop.create_server(
                lambda: SMTP(self.handler, tls_context=context, require_starttls=True, hostname=HOSTNAME),
                "127.0.0.1",
                0,
            )
        )
        self.port = server.sockets[0].getsockname()[1]
        thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        thread.start()

        def stop() -> None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            thread.join(5)
            server.close()
            self.loop.close()

        self.addCleanup(stop)

    async def deliver(self, message: bytes) -> None:
        client = ESMTPClient(clock=reactor, reply_timeout=10, send_timeout=20)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        await client.wait_greeting()
        self.assertTrue((await client.ehlo("client.example")).starttls)
        await client.starttls(client_tls(), "client.example")
        result = await client.send(
            "a@sender.test", ["x@example.org"], io.BytesIO(message), len(message), eight_bit=True
        )
        self.assertEqual(result.data.code if result.data else None, 250)
        await client.quit()

    def test_deliver_over_starttls(self) -> Deferred[None]:
        # Several chunks' worth, so the real TCP and TLS transports push back on the producer.
        message = dotted_message(40 * CHUNK_SIZE)
        done = run(self.deliver(message))

        def check(_: None) -> None:
            [(sender, recipients, content)] = self.handler.messages
            self.assertEqual((sender, recipients), ("a@sender.test", ["x@example.org"]))
            assert_same_bytes(self, content, message)

        return done.addCallback(check)

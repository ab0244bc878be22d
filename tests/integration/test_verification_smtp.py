"""Inbound verification end to end: DcRouter in-process on 127.0.0.1 with mtaConfig.dnsServers pointing at a
real twisted.names authoritative server started here, and smtplib as the client (in a thread). What the client
is told at the end of DATA: 250 for a pass, 550 5.7.1 for a DMARC p=reject failure, 451 4.7.0 when the DNS
server never answers."""

from __future__ import annotations

import os
import smtplib
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from dcrouter import DcRouter
from tests.dns_zone import SilentServer, ZoneAuthority, ZoneServer, txt
from tests.integration import free_ports

MESSAGE = b"From: <alice@good.test>\r\nTo: <bob@example.test>\r\nSubject: verified\r\n\r\nbody\r\n"


class VerificationOverSmtpTests(TestCase):
    timeout = 60

    def start(self, dns_port: int) -> Deferred[None]:
        directory = os.path.abspath(self.mktemp())
        (self.port,) = free_ports(1)
        options = {
            "mtaConfig": {"dnsServers": [f"127.0.0.1:{dns_port}"], "dnsTimeout": 300},
            "smtpConfig": {
                "ports": [self.port],
                "bindAddress": "127.0.0.1",
                "hostname": "mx.example.test",
                "queueStorage": "memory",
                "persistentPath": directory,
                "domainConfigs": [{"domains": ["example.test"], "targetIPs": ["127.0.0.1"], "port": 2626}],
                "verification": {"enabled": True, "onDmarcReject": "reject"},
            },
        }
        self.router = DcRouter(options, reactor=reactor)
        assert self.router.delivery is not None
        self.router.delivery.pause_deliveries()
        self.router.privilegedStartService()
        self.router.startService()
        self.addCleanup(self.router.stopService)
        return self.router.when_ready()

    def send(self) -> Any:
        with smtplib.SMTP("127.0.0.1", self.port, "client.test", timeout=20) as smtp:
            smtp.ehlo()
            smtp.mail("alice@good.test")
            smtp.rcpt("bob@example.test")
            try:
                return smtp.data(MESSAGE)
            except smtplib.SMTPDataError as e:
                return e.smtp_code, e.smtp_error

    def zone(self, spf: str) -> ZoneServer:
        records = [("good.test", txt(spf)), ("_dmarc.good.test", txt("v=DMARC1; p=reject"))]
        server = ZoneServer(reactor, ZoneAuthority("test", records))
        self.addCleanup(server.stop)
        return server

    def test_pass_is_queued(self) -> Deferred[None]:
        async def go() -> None:
            await self.start(self.zone("v=spf1 ip4:127.0.0.1 -all").port)
            code, text = await deferToThread(self.send)
            self.assertEqual(code, 250, text)

        return Deferred.fromCoroutine(go())

    def test_dmarc_reject_is_550(self) -> Deferred[None]:
        async def go() -> None:
            await self.start(self.zone("v=spf1 ip4:192.0.2.1 -all").port)
            code, text = await deferToThread(self.send)
            self.assertEqual(code, 550, text)
            self.assertTrue(text.startswith(b"5.7.1 "), text)

        return Deferred.fromCoroutine(go())

    def test_dns_timeout_is_451(self) -> Deferred[None]:
        async def go() -> None:
            silent = SilentServer(reactor)
            self.addCleanup(silent.stop)
            await self.start(silent.port)
            code, text = await deferToThread(self.send)
            self.assertEqual(code, 451, text)
            self.assertTrue(text.startswith(b"4.7.0 "), text)

        return Deferred.fromCoroutine(go())

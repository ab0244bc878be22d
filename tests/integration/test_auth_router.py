"""The providers as the router builds them, over real SMTP: DcRouter in-process on 127.0.0.1 with
``auth.ldapUrl`` pointing at a real slapd and ``auth.oauth2`` at a JWKS served here, driven by smtplib (in a
thread, so the reactor keeps serving). AUTH PLAIN against the directory (235, 535, and 454 once the directory
is killed) and XOAUTH2 with the error challenge before the 535."""

from __future__ import annotations

import base64
import json
import smtplib

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from dcrouter import DcRouter
from dcrouter.auth.ldap import LdapChecker
from dcrouter.events import CallableSink, Event
from tests.integration import free_ports
from tests.oauth_tokens import AUDIENCE, ISSUER, jwks, token
from tests.slapd_server import SERVICE_DN, SERVICE_PASSWORD, SKIP_REASON, USERS, start_slapd


class KeySet(Resource):
    isLeaf = True

    def render_GET(self, request: object) -> bytes:
        return json.dumps(jwks()).encode()


def plain(user: str, password: str) -> str:
    return "PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


class RouterAuthTests(TestCase):
    skip = SKIP_REASON
    timeout = 60

    def setUp(self) -> Deferred[None]:
        self.slapd = start_slapd(self)
        root = Resource()
        root.putChild(b"jwks.json", KeySet())
        site = Site(root)
        site.noisy = False
        web = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(web.stopListening)
        (self.port,) = free_ports(1)
        options = {
            "smtpConfig": {
                "ports": [self.port],
                "bindAddress": "127.0.0.1",
                "hostname": "localhost",
                "submissionPorts": [self.port],
                "queueStorage": "memory",
                "auth": {
                    "methods": ["PLAIN", "OAUTH2"],
                    "allowInsecure": True,  # the wiring is under test here; TLS is in test_auth_ldap
                    "failureDelay": 0,
                    "ldapUrl": self.slapd.url,
                    "ldap": {"bindDn": SERVICE_DN, "bindPassword": SERVICE_PASSWORD, "timeout": 5000},
                    "oauth2": {
                        "jwksUrl": f"http://127.0.0.1:{web.getHost().port}/jwks.json",
                        "issuer": ISSUER,
                        "audience": AUDIENCE,
                    },
                },
            }
        }
        self.router = DcRouter(options, reactor=reactor)
        self.router.privilegedStartService()
        self.router.startService()
        self.addCleanup(self.router.stopService)
        return self.router.when_ready()

    def session(self, *commands: str) -> list[tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test", timeout=20) as smtp:
            features = smtp.ehlo()
            replies = [features]
            replies += [
                smtp.docmd(*command.split(" ", 1)) if command else smtp.docmd("") for command in commands
            ]
            return replies

    async def test_ldap_password(self) -> None:
        events: list[Event] = []
        self.router.events.subscribe(CallableSink(events.append), ["connection.authenticated", "security.*"])
        ehlo, good = await deferToThread(self.session, "AUTH " + plain("alice", USERS["alice"]))
        self.assertIn(b"AUTH PLAIN XOAUTH2 OAUTHBEARER", ehlo[1])
        self.assertEqual(good, (235, b"2.7.0 Authentication successful"))
        _, bad = await deferToThread(self.session, "AUTH " + plain("alice", "wrong"))
        self.assertEqual(bad, (535, b"5.7.8 Authentication credentials invalid"))
        self.slapd.kill()
        _, down = await deferToThread(self.session, "AUTH " + plain("alice", USERS["alice"]))
        self.assertEqual(down, (454, b"4.7.0 Temporary authentication failure"))
        seen = [(e.type, e.fields.get("mechanism"), e.fields.get("code")) for e in events]
        self.assertEqual(
            seen,
            [
                ("connection.authenticated", "PLAIN", None),
                ("security.auth_failure", "PLAIN", 535),
                ("security.auth_failure", "PLAIN", 454),
            ],
        )

    async def test_directory_connection_closed_at_stop(self) -> None:
        _, good = await deferToThread(self.session, "AUTH " + plain("bob", USERS["bob"]))
        self.assertEqual(good[0], 235, good)
        assert self.router.authenticator is not None
        (checker,) = [p for p in self.router.authenticator._providers if isinstance(p, LdapChecker)]
        self.assertTrue(checker.service_connected)
        await self.router.stopService()
        self.assertFalse(checker.service_connected)

    async def test_xoauth2(self) -> None:
        now = reactor.seconds()

        def xoauth2(bearer: str) -> str:
            raw = f"user=alice@example.test\x01auth=Bearer {bearer}\x01\x01".encode()
            return "AUTH XOAUTH2 " + base64.b64encode(raw).decode()

        _, good = await deferToThread(self.session, xoauth2(token(now)))
        self.assertEqual(good[0], 235, good)
        _, challenge, refused = await deferToThread(self.session, xoauth2(token(now, aud="other")), "")
        self.assertEqual(challenge, (334, base64.b64encode(b'{"status":"401","schemes":"bearer"}')))
        self.assertEqual(refused, (535, b"5.7.8 Authentication credentials invalid"))

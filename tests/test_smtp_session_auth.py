"""AUTH inside the ESMTP session: PLAIN and LOGIN exchanges, sequencing, pipelining while a check is
pending, and what the logs say (never the password). ``allowInsecure`` lets these run on a StringTransport;
the TLS rule is
covered in test_smtp_starttls."""

from __future__ import annotations

import base64

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from dcrouter.config.auth import AuthConfig
from dcrouter.smtp.auth import Authenticator, MailUserRealm
from tests.smtp_fixtures import PASSWORD, connect, make_config

INSECURE = AuthConfig(allow_insecure=True, failure_delay=0)
PLAIN = base64.b64encode(b"\0alice\0" + PASSWORD.encode())
WRONG = base64.b64encode(b"\0alice\0wrong")
OK_AUTH = b"235 2.7.0 Authentication successful\r\n"
BAD_AUTH = b"535 5.7.8 Authentication credentials invalid\r\n"


def b64(text: bytes) -> bytes:
    return base64.b64encode(text)


class AuthTests(unittest.TestCase):
    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.server = connect(make_config(auth=INSECURE))
        self.server.exchange(b"EHLO client.example\r\n")

    def test_plain_with_initial_response(self) -> None:
        self.assertEqual(self.server.exchange(b"AUTH PLAIN " + PLAIN + b"\r\n"), OK_AUTH)
        self.assertEqual(self.server.protocol.session.auth_user, "alice")

    def test_plain_with_challenge(self) -> None:
        self.assertEqual(self.server.exchange(b"AUTH PLAIN\r\n"), b"334 \r\n")
        self.assertEqual(self.server.exchange(PLAIN + b"\r\n"), OK_AUTH)

    def test_login(self) -> None:
        self.assertEqual(self.server.exchange(b"AUTH LOGIN\r\n"), b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(self.server.exchange(b64(b"alice") + b"\r\n"), b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(self.server.exchange(b64(PASSWORD.encode()) + b"\r\n"), OK_AUTH)

    def test_login_with_initial_response(self) -> None:
        self.assertEqual(
            self.server.exchange(b"auth login " + b64(b"alice") + b"\r\n"),
            b"334 UGFzc3dvcmQ6\r\n",
        )
        self.assertEqual(self.server.exchange(b64(PASSWORD.encode()) + b"\r\n"), OK_AUTH)

    def test_cancel(self) -> None:
        self.server.exchange(b"AUTH LOGIN\r\n")
        self.assertEqual(
            self.server.exchange(b"*\r\nNOOP\r\n"), b"501 5.7.0 Authentication cancelled\r\n250 2.0.0 Ok\r\n"
        )
        self.assertIsNone(self.server.protocol.session.auth_user)

    def test_bad_line_ends_the_exchange(self) -> None:
        self.assertEqual(
            self.server.exchange(b"AUTH LOGIN\r\n\xff\r\nNOOP\r\n"),
            b"334 VXNlcm5hbWU6\r\n500 5.5.2 Syntax error: bad characters in command line\r\n250 2.0.0 Ok\r\n",
        )

    def test_bad_base64(self) -> None:
        self.assertEqual(
            self.server.exchange(b"AUTH PLAIN\r\n!!!\r\n"),
            b"334 \r\n501 5.5.2 Cannot decode Base64 response\r\n",
        )

    def test_wrong_password(self) -> None:
        self.assertEqual(self.server.exchange(b"AUTH PLAIN " + WRONG + b"\r\n"), BAD_AUTH)
        self.assertIsNone(self.server.protocol.session.auth_user)
        self.assertEqual(self.server.exchange(b"AUTH PLAIN " + PLAIN + b"\r\n"), OK_AUTH)

    def test_unknown_mechanism(self) -> None:
        self.assertEqual(
            self.server.exchange(b"AUTH CRAM-MD5\r\n"),
            b"504 5.5.4 Unrecognized authentication type\r\n",
        )

    def test_sequence_errors(self) -> None:
        server = connect(make_config(auth=INSECURE))
        self.assertEqual(
            server.exchange(b"AUTH PLAIN " + PLAIN + b"\r\n"),
            b"503 5.5.1 Error: send EHLO first\r\n",
        )
        server.exchange(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n")
        self.assertEqual(
            server.exchange(b"AUTH PLAIN " + PLAIN + b"\r\n"),
            b"503 5.5.1 Error: AUTH not allowed during a mail transaction\r\n",
        )
        server.exchange(b"RSET\r\n")
        self.assertEqual(server.exchange(b"AUTH PLAIN " + PLAIN + b"\r\n"), OK_AUTH)
        self.assertEqual(
            server.exchange(b"AUTH PLAIN " + PLAIN + b"\r\n"), b"503 5.5.1 Error: already authenticated\r\n"
        )
        self.assertEqual(server.exchange(b"AUTH\r\n"), b"503 5.5.1 Error: already authenticated\r\n")

    def test_syntax(self) -> None:
        self.assertEqual(
            self.server.exchange(b"AUTH\r\n"),
            b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n",
        )

    def test_authenticated_sender_may_relay_and_is_recorded(self) -> None:
        server = connect(make_config(auth=INSECURE), port=587)
        server.exchange(b"EHLO c\r\n")
        self.assertEqual(
            server.exchange(b"MAIL FROM:<a@b.example>\r\n"),
            b"530 5.7.0 Authentication required\r\n",
        )
        server.exchange(b"AUTH PLAIN " + PLAIN + b"\r\n")
        out = server.exchange(
            b"MAIL FROM:<alice@example.net>\r\nRCPT TO:<x@elsewhere.example>\r\n"
            b"DATA\r\nSubject: s\r\n\r\n.\r\n"
        )
        self.assertTrue(out.startswith(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 "), out)
        self.assertEqual(server.queue.items[0].envelope.auth_user, "alice")
        self.assertIn(b"with ESMTPA\r\n", server.queue.bodies[0])

    def test_auth_line_may_exceed_command_limit(self) -> None:
        # RFC 4954 allows 12288 octets for AUTH; a long (wrong) response is checked, not cut.
        token = b64(b"\0alice\0" + b"p" * 1000)
        self.assertEqual(self.server.exchange(b"AUTH PLAIN " + token + b"\r\n"), BAD_AUTH)
        self.assertEqual(self.server.exchange(b"AUTH PLAIN\r\n" + token + b"\r\n"), b"334 \r\n" + BAD_AUTH)

    def test_password_never_logged(self) -> None:
        self.server.exchange(b"AUTH PLAIN " + WRONG + b"\r\nAUTH LOGIN\r\n")
        self.server.exchange(b64(b"alice") + b"\r\n" + b64(PASSWORD.encode()) + b"\r\n")
        self.assertEqual(self.server.protocol.session.auth_user, "alice")
        self.assertTrue(self.events)
        for event in self.events:
            text = formatEvent(event) + repr(event)
            secrets = (PASSWORD, "wrong", PLAIN.decode(), WRONG.decode(), b64(PASSWORD.encode()).decode())
            for secret in secrets:
                self.assertNotIn(secret, text)


@implementer(ICredentialsChecker)
class HeldChecker:
    """A checker whose answers the test gives: the collaborator behind the Authenticator, held open."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self) -> None:
        self.waiting: list[tuple[Deferred, bytes]] = []

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred:
        held: Deferred = Deferred()
        self.waiting.append((held, credentials.username))
        return held


class PendingAuthTests(unittest.TestCase):
    def test_commands_wait_for_auth(self) -> None:
        config = make_config(auth=INSECURE)
        checker = HeldChecker()
        server = connect(config)
        server.factory.authenticator = Authenticator(
            config.auth, clock=server.clock, portal=Portal(MailUserRealm(), [checker])
        )
        server.exchange(b"EHLO c\r\n")
        self.assertEqual(
            server.exchange(b"AUTH PLAIN " + PLAIN + b"\r\nNOOP\r\nMAIL FROM:<a@b.example>\r\n"),
            b"",
        )
        held, username = checker.waiting.pop()
        held.callback(username)
        self.assertEqual(server.take(), OK_AUTH + b"250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n")

    def test_failed_check_then_continue(self) -> None:
        config = make_config(auth=INSECURE)
        checker = HeldChecker()
        server = connect(config)
        server.factory.authenticator = Authenticator(
            config.auth, clock=server.clock, portal=Portal(MailUserRealm(), [checker])
        )
        server.exchange(b"EHLO c\r\n")
        self.assertEqual(server.exchange(b"AUTH PLAIN " + PLAIN + b"\r\nNOOP\r\n"), b"")
        checker.waiting.pop()[0].errback(UnauthorizedLogin())
        self.assertEqual(server.take(), BAD_AUTH + b"250 2.0.0 Ok\r\n")

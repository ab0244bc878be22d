"""Tests for dcrouter.smtp.sasl: PLAIN and LOGIN exchanges as the client's base64 lines arrive."""

from __future__ import annotations

import base64

from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.trial import unittest

from dcrouter.mail.reply import Reply
from dcrouter.smtp.sasl import MAX_DECODED_RESPONSE, Challenge, SaslError, SaslExchange

UNDECODABLE = b"501 5.5.2 Cannot decode Base64 response\r\n"
MALFORMED = b"501 5.5.2 Malformed authentication data\r\n"
FINISHED = b"503 5.5.1 Authentication exchange already finished\r\n"


class SaslTestCase(unittest.TestCase):
    def assertCredentials(self, result: object, username: bytes, password: bytes) -> None:
        self.assertIsInstance(result, UsernamePassword)
        assert isinstance(result, UsernamePassword)
        self.assertTrue(IUsernamePassword.providedBy(result))
        self.assertEqual((result.username, result.password), (username, password))

    def assertRefused(self, exchange: SaslExchange, line: str | None, wire: bytes) -> None:
        error = self.assertRaises(SaslError, exchange.respond, line)
        self.assertIsInstance(error.reply, Reply)
        self.assertEqual(error.reply.to_bytes(), wire)


class PlainTests(SaslTestCase):
    def test_initial_response(self) -> None:
        # C: AUTH PLAIN AGFsaWNlAHNlY3JldA==   (NUL alice NUL secret)
        exchange = SaslExchange("PLAIN", "AGFsaWNlAHNlY3JldA==")
        self.assertCredentials(exchange.begin(), b"alice", b"secret")

    def test_initial_response_through_respond(self) -> None:
        self.assertCredentials(SaslExchange("PLAIN").respond("AGFsaWNlAHNlY3JldA=="), b"alice", b"secret")

    def test_empty_challenge_then_response(self) -> None:
        # C: AUTH PLAIN / S: 334 / C: AGFsaWNlAHNlY3JldA==
        exchange = SaslExchange("plain")
        challenge = exchange.respond(None)
        self.assertEqual(challenge, Challenge(""))
        self.assertCredentials(exchange.respond("AGFsaWNlAHNlY3JldA=="), b"alice", b"secret")

    def test_same_authorization_identity(self) -> None:
        exchange = SaslExchange("PLAIN", "YWxpY2UAYWxpY2UAc2VjcmV0")
        self.assertCredentials(exchange.begin(), b"alice", b"secret")

    def test_other_authorization_identity_refused(self) -> None:
        # bob NUL alice NUL secret: alice asking to act as bob
        refused = b"535 5.7.8 Authentication credentials invalid\r\n"
        self.assertRefused(SaslExchange("PLAIN"), "Ym9iAGFsaWNlAHNlY3JldA==", refused)

    def test_utf8(self) -> None:
        exchange = SaslExchange("PLAIN", "AMOpbWlsZQBww6Rzcw==")
        self.assertCredentials(exchange.begin(), "émile".encode(), "päss".encode())

    def test_cancel(self) -> None:
        exchange = SaslExchange("PLAIN")
        exchange.respond(None)
        self.assertRefused(exchange, "*", b"501 5.7.0 Authentication cancelled\r\n")

    def test_bad_base64(self) -> None:
        self.assertRefused(SaslExchange("PLAIN"), "AGFsaWNl!AHNlY3JldA", UNDECODABLE)
        self.assertRefused(SaslExchange("PLAIN"), "AGFsaWNlAHNlY3JldA=", UNDECODABLE)
        self.assertRefused(SaslExchange("PLAIN"), "AGFsaWNlAHNlY3JldA== ", UNDECODABLE)

    def test_empty_initial_response(self) -> None:
        # "=" is an empty initial response, which is not a valid PLAIN message.
        self.assertRefused(SaslExchange("PLAIN"), "=", MALFORMED)

    def test_malformed(self) -> None:
        self.assertRefused(SaslExchange("PLAIN"), "AGFsaWNl", MALFORMED)  # NUL alice: no password
        self.assertRefused(SaslExchange("PLAIN"), "AABzZWNyZXQ=", MALFORMED)  # empty user name
        self.assertRefused(SaslExchange("PLAIN"), "AGFsDWljZQB4", MALFORMED)  # CR in the user name
        self.assertRefused(SaslExchange("PLAIN"), base64.b64encode(b"\0al\nice\0x").decode(), MALFORMED)
        self.assertRefused(SaslExchange("PLAIN"), base64.b64encode(b"\0\xffalice\0x").decode(), MALFORMED)
        self.assertRefused(SaslExchange("PLAIN"), base64.b64encode(b"\0alice\0\xff").decode(), MALFORMED)
        self.assertRefused(SaslExchange("PLAIN"), base64.b64encode(b"\0a\0b\0c").decode(), MALFORMED)

    def test_over_long(self) -> None:
        too_long = b"500 5.5.6 Authentication exchange line is too long\r\n"
        big = base64.b64encode(b"\0alice\0" + b"x" * MAX_DECODED_RESPONSE).decode()
        self.assertRefused(SaslExchange("PLAIN"), big, too_long)
        self.assertRefused(SaslExchange("PLAIN"), "A" * 100_000, too_long)
        just_fits = base64.b64encode(b"\0alice\0" + b"x" * (MAX_DECODED_RESPONSE - 7)).decode()
        result = SaslExchange("PLAIN").respond(just_fits)
        self.assertCredentials(result, b"alice", b"x" * (MAX_DECODED_RESPONSE - 7))

    def test_finished_exchange_takes_no_more_input(self) -> None:
        exchange = SaslExchange("PLAIN", "AGFsaWNlAHNlY3JldA==")
        exchange.begin()
        self.assertRefused(exchange, "AGFsaWNlAHNlY3JldA==", FINISHED)

    def test_failed_exchange_takes_no_more_input(self) -> None:
        exchange = SaslExchange("PLAIN")
        self.assertRaises(SaslError, exchange.respond, "!!")
        self.assertRefused(exchange, "AGFsaWNlAHNlY3JldA==", FINISHED)

    def test_unknown_mechanism(self) -> None:
        self.assertRaises(ValueError, SaslExchange, "CRAM-MD5")


class LoginTests(SaslTestCase):
    def test_exchange(self) -> None:
        # C: AUTH LOGIN / S: 334 VXNlcm5hbWU6 / C: YWxpY2U= / S: 334 UGFzc3dvcmQ6 / C: c2VjcmV0
        exchange = SaslExchange("LOGIN")
        self.assertEqual(exchange.begin(), Challenge("VXNlcm5hbWU6"))
        self.assertEqual(exchange.respond("YWxpY2U="), Challenge("UGFzc3dvcmQ6"))
        self.assertCredentials(exchange.respond("c2VjcmV0"), b"alice", b"secret")

    def test_initial_response_is_user_name(self) -> None:
        # C: AUTH LOGIN YWxpY2U= / S: 334 UGFzc3dvcmQ6 / C: c2VjcmV0
        exchange = SaslExchange("LOGIN", "YWxpY2U=")
        self.assertEqual(exchange.begin(), Challenge("UGFzc3dvcmQ6"))
        self.assertCredentials(exchange.respond("c2VjcmV0"), b"alice", b"secret")

    def test_empty_password(self) -> None:
        exchange = SaslExchange("LOGIN")
        exchange.respond(None)
        exchange.respond("YWxpY2U=")
        self.assertCredentials(exchange.respond(""), b"alice", b"")

    def test_empty_user_name_refused(self) -> None:
        self.assertRefused(SaslExchange("LOGIN"), "=", MALFORMED)
        exchange = SaslExchange("LOGIN")
        exchange.respond(None)
        self.assertRefused(exchange, "", MALFORMED)

    def test_cancel_at_password(self) -> None:
        exchange = SaslExchange("LOGIN", "YWxpY2U=")
        exchange.begin()
        self.assertRefused(exchange, "*", b"501 5.7.0 Authentication cancelled\r\n")

    def test_bad_base64(self) -> None:
        exchange = SaslExchange("LOGIN")
        exchange.respond(None)
        self.assertRefused(exchange, "YWxpY2U", UNDECODABLE)

    def test_control_characters_in_user_name(self) -> None:
        exchange = SaslExchange("LOGIN")
        exchange.respond(None)
        self.assertRefused(exchange, base64.b64encode(b"alice\r\nRCPT").decode(), MALFORMED)

    def test_none_only_first(self) -> None:
        exchange = SaslExchange("LOGIN")
        exchange.respond(None)
        self.assertRaises(SaslError, exchange.respond, None)

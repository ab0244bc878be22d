"""OAUTH2 in the SMTP session: SASL XOAUTH2 and OAUTHBEARER (RFC 7628) with the failure continuation
(``334`` + base64 JSON error, the client's answer, then ``535``), and local JWT verification against a JWKS
file: expired, wrong audience, wrong issuer, bad signature, a stranger's key, ``alg`` tricks, and a user
other than the token's are all refused. Time is a Clock; no network."""

from __future__ import annotations

import base64
import json

from joserfc import jwt
from joserfc.jwk import OctKey
from twisted.internet.task import Clock
from twisted.trial import unittest

from dcrouter.auth.credentials import OAuthBearer
from dcrouter.auth.oauth2 import OAuth2Checker
from dcrouter.config.auth import AuthConfig, OAuth2Config
from dcrouter.config.load import ConfigError, load_options
from dcrouter.smtp.auth import Authenticator
from dcrouter.smtp.sasl import MALFORMED, SaslError, SaslExchange
from tests.oauth_tokens import AUDIENCE, ISSUER, jwks_json, token
from tests.smtp_fixtures import START_TIME, connect, make_config

OK_AUTH = b"235 2.7.0 Authentication successful\r\n"
BAD_AUTH = b"535 5.7.8 Authentication credentials invalid\r\n"
XOAUTH2_ERROR = b"334 " + base64.b64encode(b'{"status":"401","schemes":"bearer"}') + b"\r\n"
OAUTHBEARER_ERROR = b"334 " + base64.b64encode(b'{"status":"invalid_token","schemes":"bearer"}') + b"\r\n"


def xoauth2(user: str, bearer: str) -> bytes:
    return base64.b64encode(f"user={user}\x01auth=Bearer {bearer}\x01\x01".encode())


def oauthbearer(user: str | None, bearer: str) -> bytes:
    authzid = f"a={user}" if user is not None else ""
    return base64.b64encode(
        f"n,{authzid},\x01host=mx.example\x01port=587\x01auth=Bearer {bearer}\x01\x01".encode()
    )


class SaslParsingTests(unittest.TestCase):
    def finish(self, mechanism: str, data: bytes) -> object:
        return SaslExchange(mechanism, base64.b64encode(data).decode()).begin()

    def test_xoauth2(self) -> None:
        self.assertEqual(
            self.finish("XOAUTH2", b"user=alice@example.test\x01auth=Bearer abc.def-g_h\x01\x01"),
            OAuthBearer("alice@example.test", "abc.def-g_h"),
        )

    def test_oauthbearer_with_and_without_authzid(self) -> None:
        self.assertEqual(
            self.finish("OAUTHBEARER", b"n,a=a=3Db=2Cc@x,\x01auth=Bearer tok\x01\x01"),
            OAuthBearer("a=b,c@x", "tok"),
        )
        self.assertEqual(
            self.finish("OAUTHBEARER", b"n,,\x01host=h\x01port=25\x01auth=Bearer tok\x01\x01"),
            OAuthBearer(None, "tok"),
        )

    def test_malformed(self) -> None:
        for mechanism, data in [
            ("XOAUTH2", b"user=alice\x01auth=Bearer tok\x01"),  # one ^A short
            ("XOAUTH2", b"user=alice\x01\x01"),  # no auth
            ("XOAUTH2", b"user=alice\x01auth=Basic dG9r\x01\x01"),
            ("XOAUTH2", b"user=alice\x01auth=Bearer to k\x01\x01"),
            ("OAUTHBEARER", b"p=tls-unique,,\x01auth=Bearer tok\x01\x01"),  # channel binding
            ("OAUTHBEARER", b"n,a=bad=name,\x01auth=Bearer tok\x01\x01"),
            ("OAUTHBEARER", b"n,,\x01host=h\x01\x01"),
            ("OAUTHBEARER", b"n,a=x\x00y,\x01auth=Bearer tok\x01\x01"),
        ]:
            with self.assertRaises(SaslError, msg=repr(data)) as caught:
                self.finish(mechanism, data)
            self.assertEqual(caught.exception.reply, MALFORMED)

    def test_prompt_without_initial_response(self) -> None:
        exchange = SaslExchange("XOAUTH2")
        self.assertEqual(exchange.begin().text, "")  # type: ignore[union-attr]
        self.assertEqual(exchange.respond(xoauth2("a", "t").decode()), OAuthBearer("a", "t"))


class JwksFileTests(unittest.TestCase):
    """Tokens checked locally against a key set in a file, through the real Authenticator and session."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START_TIME)
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(jwks_json())
        self.oauth = OAuth2Config(jwks_file=path, issuer=ISSUER, audience=AUDIENCE, max_clock_skew=30_000)
        auth = AuthConfig(
            methods=["PLAIN", "OAUTH2"], oauth2=self.oauth, allow_insecure=True, failure_delay=0
        )
        checker = OAuth2Checker(self.oauth, http=None, clock=self.clock)
        authenticator = Authenticator(
            auth,
            clock=self.clock,
            reactor=self.clock,
            threadpool=object(),
            providers=[checker],  # type: ignore[arg-type]
        )
        self.server = connect(make_config(auth=auth), clock=self.clock, authenticator=authenticator)
        self.now = self.clock.seconds()

    def ehlo(self) -> bytes:
        return self.server.exchange(b"EHLO client.example\r\n")

    def test_advertised(self) -> None:
        self.assertIn(b"250 AUTH PLAIN XOAUTH2 OAUTHBEARER\r\n", self.ehlo())

    def test_good_token_both_mechanisms(self) -> None:
        self.ehlo()
        good = token(self.now)
        self.assertEqual(
            self.server.exchange(b"AUTH XOAUTH2 " + xoauth2("alice@example.test", good) + b"\r\n"), OK_AUTH
        )
        self.assertEqual(self.server.protocol.session.auth_user, "alice@example.test")
        other = connect(
            self.server.factory.config, clock=self.clock, authenticator=self.server.factory.authenticator
        )
        other.exchange(b"EHLO client.example\r\n")
        self.assertEqual(other.exchange(b"AUTH OAUTHBEARER " + oauthbearer(None, good) + b"\r\n"), OK_AUTH)
        self.assertEqual(other.protocol.session.auth_user, "alice@example.test")

    def test_token_sent_after_the_empty_challenge(self) -> None:
        self.ehlo()
        self.assertEqual(self.server.exchange(b"AUTH OAUTHBEARER\r\n"), b"334 \r\n")
        line = oauthbearer("Alice@Example.test", token(self.now))
        self.assertEqual(self.server.exchange(line + b"\r\n"), OK_AUTH)

    def refused(self, bearer: str, user: str | None = "alice@example.test") -> None:
        """XOAUTH2: the error challenge, an empty answer, 535; OAUTHBEARER: the same with ^A."""
        self.ehlo()
        self.assertEqual(
            self.server.exchange(b"AUTH XOAUTH2 " + xoauth2(user or "", bearer) + b"\r\n"), XOAUTH2_ERROR
        )
        self.assertEqual(self.server.exchange(b"\r\n"), BAD_AUTH)
        self.assertEqual(
            self.server.exchange(b"AUTH OAUTHBEARER " + oauthbearer(user, bearer) + b"\r\n"),
            OAUTHBEARER_ERROR,
        )
        self.assertEqual(self.server.exchange(b"AQ==\r\n"), BAD_AUTH)
        self.assertIsNone(self.server.protocol.session.auth_user)
        self.assertEqual(self.server.exchange(b"NOOP\r\n"), b"250 2.0.0 Ok\r\n")

    def test_expired(self) -> None:
        self.refused(token(self.now, exp=int(self.now) - 31))

    def test_expiry_within_the_allowed_skew(self) -> None:
        self.ehlo()
        bearer = token(self.now, exp=int(self.now) - 10)
        self.assertEqual(
            self.server.exchange(b"AUTH XOAUTH2 " + xoauth2("alice@example.test", bearer) + b"\r\n"), OK_AUTH
        )

    def test_not_yet_valid(self) -> None:
        self.refused(token(self.now, nbf=int(self.now) + 120))

    def test_without_exp(self) -> None:
        self.refused(token(self.now, exp=None))

    def test_wrong_audience(self) -> None:
        self.refused(token(self.now, aud="someone-else"))

    def test_wrong_issuer(self) -> None:
        self.refused(token(self.now, iss="https://evil.example.test"))

    def test_bad_signature(self) -> None:
        head, body, signature = token(self.now).split(".")
        claims = json.loads(base64.urlsafe_b64decode(body + "=="))
        claims["sub"] = "mallory@example.test"
        forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        self.refused(f"{head}.{forged}.{signature}", user="mallory@example.test")

    def test_strangers_key(self) -> None:
        self.refused(token(self.now, signer="stranger"))
        self.refused(token(self.now, signer="stranger", kid="good"))

    def test_alg_none_and_hmac(self) -> None:
        head = base64.urlsafe_b64encode(b'{"alg":"none","kid":"good"}').rstrip(b"=").decode()
        body = token(self.now).split(".")[1]
        self.refused(f"{head}.{body}.")
        claims = json.loads(base64.urlsafe_b64decode(body + "=="))
        secret = OctKey.import_key(jwks_json())  # the public key set as an HMAC secret: the classic confusion
        self.refused(jwt.encode({"alg": "HS256", "kid": "good"}, claims, secret, algorithms=["HS256"]))

    def test_someone_elses_token(self) -> None:
        self.refused(token(self.now), user="bob@example.test")

    def test_not_a_jwt(self) -> None:
        self.refused("not-a-token")

    def test_failures_are_throttled(self) -> None:
        auth = AuthConfig(
            methods=["OAUTH2"], oauth2=self.oauth, allow_insecure=True, failure_delay=0, max_failures=2
        )
        checker = OAuth2Checker(self.oauth, http=None, clock=self.clock)
        authenticator = Authenticator(
            auth,
            clock=self.clock,
            reactor=self.clock,
            threadpool=object(),
            providers=[checker],  # type: ignore[arg-type]
        )
        server = connect(make_config(auth=auth), clock=self.clock, authenticator=authenticator)
        server.exchange(b"EHLO client.example\r\n")
        bad = xoauth2("alice@example.test", "not-a-token")
        for _ in range(2):
            self.assertEqual(server.exchange(b"AUTH XOAUTH2 " + bad + b"\r\n"), XOAUTH2_ERROR)
            self.assertEqual(server.exchange(b"\r\n"), BAD_AUTH)
        good = xoauth2("alice@example.test", token(self.now))
        self.assertEqual(
            server.exchange(b"AUTH XOAUTH2 " + good + b"\r\n"),
            b"454 4.7.0 Too many authentication failures, try again later\r\n",
        )


OAUTH2 = "smtpConfig.auth.oauth2"


class ConfigTests(unittest.TestCase):
    def errors(self, auth: dict[str, object]) -> list[str]:
        raw = {"smtpConfig": {"ports": [2525], "hostname": "mx.example.test", "auth": auth}}
        try:
            load_options(raw)
        except ConfigError as e:
            return list(e.errors)
        return []

    def test_oauth2_needs_one_way_to_verify(self) -> None:
        self.assertEqual(
            self.errors({"methods": ["OAUTH2"], "oauth2": {"issuer": ISSUER}}),
            [f"{OAUTH2}: give exactly one of introspectionUrl, jwksUrl and jwksFile (given: none)"],
        )
        self.assertEqual(
            self.errors({"methods": ["OAUTH2"], "oauth2": {"jwksUrl": "https://idp/jwks"}}),
            [
                f"{OAUTH2}.issuer: required to verify tokens locally (a JWT for anyone else is no proof)",
                f"{OAUTH2}.audience: required to verify tokens locally (a JWT for anyone else is no proof)",
            ],
        )
        self.assertEqual(
            self.errors({"methods": ["OAUTH2"], "oauth2": {"introspectionUrl": "https://idp/introspect"}}),
            [
                "smtpConfig.auth.oauth2.clientId: required with introspectionUrl",
                "smtpConfig.auth.oauth2.clientSecret: required with introspectionUrl",
            ],
        )

    def test_files_are_read_at_load(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('{"keys": []}')
        oauth2 = {"jwksFile": path, "issuer": ISSUER, "audience": AUDIENCE}
        self.assertEqual(
            self.errors({"methods": ["OAUTH2"], "oauth2": oauth2}),
            [f"{OAUTH2}.jwksFile: {path!r} is not a JWKS (a JSON object with a non-empty \"keys\" list)"],
        )
        ldap = {"ldapUrl": "ldap://127.0.0.1/dc=x", "ldap": {"caFile": path}}
        self.assertEqual(self.errors(ldap), [f"smtpConfig.auth.ldap.caFile: no PEM certificate in {path!r}"])
        # A certificate's markers around something that is not one: refused as well (parsed, not grepped).
        with open(path, "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
        self.assertEqual(self.errors(ldap), [f"smtpConfig.auth.ldap.caFile: no PEM certificate in {path!r}"])

    def test_ldap_keys(self) -> None:
        self.assertEqual(
            self.errors({"ldapUrl": "ldap://ldap.example.test/dc=example,dc=test"}),
            [
                (
                    "smtpConfig.auth.ldapUrl: passwords would cross the network in clear: use ldaps:// or "
                    "set smtpConfig.auth.ldap.startTls = true (plain ldap:// is taken only on loopback)"
                )
            ],
        )
        self.assertEqual(self.errors({"ldapUrl": "ldaps://ldap.example.test/dc=example,dc=test"}), [])
        self.assertEqual(
            self.errors({"ldap": {"bindDn": "cn=x"}}),
            ["smtpConfig.auth.ldap: set, but smtpConfig.auth.ldapUrl is not"],
        )
        self.assertEqual(
            self.errors(
                {"ldapUrl": "ldap://127.0.0.1/dc=x", "ldap": {"bindDn": "cn=x", "userFilter": "uid=x"}}
            ),
            [
                "smtpConfig.auth.ldap.userFilter: an LDAP filter in parentheses, like (uid={user}): 'uid=x'",
            ],
        )
        self.assertEqual(
            self.errors({"ldapUrl": "ldap://127.0.0.1/dc=x", "ldap": {"bindDn": "cn=x"}}),
            ["smtpConfig.auth.ldap.bindPassword: bindDn and bindPassword go together"],
        )
        self.assertTrue(
            self.errors({"ldapUrl": "http://x/dc=x"})[0].startswith("smtpConfig.auth.ldapUrl: expected")
        )

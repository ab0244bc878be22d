"""LDAP authentication against a real slapd on 127.0.0.1 (tests/slapd_server.py): the right password logs
in, a wrong one or an unknown user is 535, injection through the user name matches nothing, and a directory
that is gone or silent is 454 4.7.0, never 535."""

from __future__ import annotations

import os

from twisted.cred.credentials import UsernamePassword
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from dcrouter.auth.build import build_providers
from dcrouter.config.auth import AuthConfig, LdapConfig
from dcrouter.smtp.auth import Authenticator, AuthFailed
from tests.pebble import write_listener_certificate
from tests.slapd_server import PEOPLE, SERVICE_DN, SERVICE_PASSWORD, SKIP_REASON, USERS, start_slapd


def ldap_auth(url: str, **ldap: object) -> Authenticator:
    settings: dict[str, object] = {"bind_dn": SERVICE_DN, "bind_password": SERVICE_PASSWORD, "timeout": 5000}
    settings.update(ldap)
    config = AuthConfig(ldap_url=url, ldap=LdapConfig(**settings), failure_delay=0)  # type: ignore[arg-type]
    return Authenticator(
        config,
        clock=reactor,
        reactor=reactor,
        threadpool=ThreadPool(),
        providers=build_providers(config, reactor),
    )


async def outcome(auth: Authenticator, user: str, password: str) -> str:
    """The user name on success, else the reply code and enhanced code (``"535 5.7.8"``)."""
    try:
        return await auth.authenticate(UsernamePassword(user.encode(), password.encode()), "127.0.0.1")
    except AuthFailed as failed:
        return f"{failed.reply.code} {failed.reply.enhanced}"


class SearchThenBindTests(unittest.TestCase):
    skip = SKIP_REASON

    def setUp(self) -> None:
        self.slapd = start_slapd(self)
        self.auth = ldap_auth(self.slapd.url)

    async def test_good_password(self) -> None:
        self.assertEqual(await outcome(self.auth, "alice", USERS["alice"]), "alice")
        self.assertEqual(await outcome(self.auth, "bob", USERS["bob"]), "bob")

    async def test_wrong_password_and_unknown_user(self) -> None:
        self.assertEqual(await outcome(self.auth, "alice", "wrong"), "535 5.7.8")
        self.assertEqual(await outcome(self.auth, "alice", USERS["bob"]), "535 5.7.8")
        self.assertEqual(await outcome(self.auth, "carol", "anything"), "535 5.7.8")

    async def test_empty_password_is_no_unauthenticated_bind(self) -> None:
        self.assertEqual(await outcome(self.auth, "alice", ""), "535 5.7.8")

    async def test_injection_through_the_name_matches_nothing(self) -> None:
        for name in ("*", "*)(uid=*", "alice)(|(uid=*", "al*", "alice\\", "*)(objectClass=*"):
            self.assertEqual(await outcome(self.auth, name, USERS["alice"]), "535 5.7.8", name)

    async def test_directory_killed_is_temporary(self) -> None:
        self.assertEqual(await outcome(self.auth, "alice", USERS["alice"]), "alice")
        self.slapd.kill()
        self.assertEqual(await outcome(self.auth, "alice", USERS["alice"]), "454 4.7.0")
        self.assertEqual(await outcome(self.auth, "alice", "wrong"), "454 4.7.0")

    async def test_directory_restarted_costs_nothing(self) -> None:
        # The kept service connection dies with the old slapd; the next check notices only when it uses it
        # (the reactor has not run in between), and tries once more on a new connection.
        self.assertEqual(await outcome(self.auth, "alice", USERS["alice"]), "alice")
        self.slapd.stop()
        self.slapd.start()
        self.assertEqual(await outcome(self.auth, "bob", USERS["bob"]), "bob")

    async def test_service_account_refused_is_temporary(self) -> None:
        auth = ldap_auth(self.slapd.url, bind_password="not-the-service-password")
        self.assertEqual(await outcome(auth, "alice", USERS["alice"]), "454 4.7.0")


class DirectBindTests(unittest.TestCase):
    skip = SKIP_REASON

    def setUp(self) -> None:
        self.slapd = start_slapd(self)
        self.auth = ldap_auth(
            self.slapd.url, bind_dn=None, bind_password=None, user_dn=f"uid={{user}},{PEOPLE}"
        )

    async def test_direct_bind(self) -> None:
        self.assertEqual(await outcome(self.auth, "alice", USERS["alice"]), "alice")
        self.assertEqual(await outcome(self.auth, "alice", "wrong"), "535 5.7.8")

    async def test_dn_injection_refused(self) -> None:
        name = f"alice,{PEOPLE}"
        self.assertEqual(await outcome(self.auth, name, USERS["alice"]), "535 5.7.8")


class Silent(Protocol):
    pass


class SilentDirectoryTests(unittest.TestCase):
    async def test_timeout_is_temporary(self) -> None:
        port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"ldap://127.0.0.1:{port.getHost().port}/{PEOPLE}"
        auth = ldap_auth(url, timeout=200)
        self.assertEqual(await outcome(auth, "alice", "pw"), "454 4.7.0")

    async def test_refused_is_temporary(self) -> None:
        port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
        number = port.getHost().port
        await port.stopListening()
        auth = ldap_auth(f"ldap://127.0.0.1:{number}/{PEOPLE}")
        self.assertEqual(await outcome(auth, "alice", "pw"), "454 4.7.0")


class TlsTests(unittest.TestCase):
    """StartTLS and ldaps:// against slapd with a certificate from a CA made here; the directory's
    certificate is verified (a CA that did not sign it is an outage, 454, never a plaintext fallback)."""

    skip = SKIP_REASON

    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.ca, cert, key = write_listener_certificate(directory)
        self.slapd = start_slapd(self, cert=cert, key=key)

    async def test_starttls(self) -> None:
        auth = ldap_auth(self.slapd.url, start_tls=True, ca_file=self.ca)
        self.assertEqual(await outcome(auth, "alice", USERS["alice"]), "alice")
        self.assertEqual(await outcome(auth, "alice", "wrong"), "535 5.7.8")

    async def test_ldaps(self) -> None:
        auth = ldap_auth(self.slapd.ldaps_url, ca_file=self.ca)
        self.assertEqual(await outcome(auth, "bob", USERS["bob"]), "bob")
        self.assertEqual(await outcome(auth, "bob", "wrong"), "535 5.7.8")

    async def test_unverified_certificate_is_temporary(self) -> None:
        other = self.mktemp()
        os.makedirs(other)
        stranger_ca, _, _ = write_listener_certificate(other)
        for auth in (
            ldap_auth(self.slapd.url, start_tls=True, ca_file=stranger_ca),
            ldap_auth(self.slapd.ldaps_url, ca_file=stranger_ca),
        ):
            self.assertEqual(await outcome(auth, "alice", USERS["alice"]), "454 4.7.0")

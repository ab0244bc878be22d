"""Tests for dcrouter.acme without a network: the HTTP-01 responder, which certificates are ordered, and the
AcmeService's schedule (obtain at start, renew before expiry, back off after failures) under a Clock.

The ACME account is replaced by :class:`FakeIssuer`, which signs real certificates with a throwaway CA, and
blocking work runs synchronously, so the whole service runs on the test's Clock. Real issuance is in
tests/integration/test_acme_pebble.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import stat
import time
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial import unittest

from dcrouter.acme.challenges import ChallengeResponder
from dcrouter.acme.client import AcmeError, IssuedCertificate, generate_key_pem, split_fullchain
from dcrouter.acme.service import (
    CHECK_INTERVAL,
    FOLLOW_INTERVAL,
    RETRY_BASE,
    RETRY_MAX,
    AcmeFollower,
    AcmeService,
    AcmeStateDirectory,
    CertificateOrder,
    certificate_orders,
)
from dcrouter.config import ConfigError, load_options
from dcrouter.config.proxy import LETSENCRYPT_PRODUCTION, LETSENCRYPT_STAGING, acme_directory_url
from dcrouter.net.certstore import CertificateStore

DAY = 86_400.0
DIRECTORY = "https://acme.test/directory"


class ChallengeResponderTests(unittest.TestCase):
    def setUp(self) -> None:
        self.responder = ChallengeResponder()

    def test_serves_added_token(self) -> None:
        self.responder.add("tok_EN-1", "tok_EN-1.thumbprint")
        self.assertEqual(
            self.responder.response_for("/.well-known/acme-challenge/tok_EN-1"), b"tok_EN-1.thumbprint"
        )
        self.assertEqual(len(self.responder), 1)

    def test_removed_token_is_gone(self) -> None:
        self.responder.add("tok", "tok.t")
        self.responder.remove("tok")
        self.assertIsNone(self.responder.response_for("/.well-known/acme-challenge/tok"))
        self.responder.remove("tok")  # twice, or never added: no error

    def test_query_string_ignored(self) -> None:
        self.responder.add("tok", "tok.t")
        self.assertEqual(self.responder.response_for("/.well-known/acme-challenge/tok?x=1"), b"tok.t")

    def test_other_paths_are_none(self) -> None:
        self.responder.add("tok", "tok.t")
        for path in (
            "/",
            "/tok",
            "/.well-known/acme-challenge/",
            "/.well-known/acme-challenge/other",
            "/.well-known/acme-challenge/tok/",
            "/.well-known/acme-challenge/../acme-challenge/tok",
            "/.well-known/acme-challenge/%74ok",
            "/x/.well-known/acme-challenge/tok",
        ):
            self.assertIsNone(self.responder.response_for(path), path)

    def test_token_must_be_base64url(self) -> None:
        for token in ("", "a/b", "a.b", "a b", "../x"):
            self.assertRaises(ValueError, self.responder.add, token, "x")


class SharedChallengeTests(unittest.TestCase):
    """With workers, worker 0's responder and the others' share tokens through a directory."""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        self.owner = ChallengeResponder(self.directory)
        self.owner.clear_shared()  # worker 0 at start: creates the directory
        self.other = ChallengeResponder(self.directory)

    def test_token_added_by_one_is_served_by_the_other(self) -> None:
        path = "/.well-known/acme-challenge/tok_EN-1"
        self.assertIsNone(self.other.response_for(path))
        self.owner.add("tok_EN-1", "tok_EN-1.thumbprint")
        self.assertEqual(self.other.response_for(path), b"tok_EN-1.thumbprint")
        self.assertEqual(os.listdir(self.directory), ["tok_EN-1"])  # no temporary file left
        self.owner.remove("tok_EN-1")
        self.assertIsNone(self.other.response_for(path))
        self.assertEqual(os.listdir(self.directory), [])

    def test_only_token_names_are_read(self) -> None:
        with open(os.path.join(self.directory, "x.tmp"), "wb") as f:
            f.write(b"not a token")
        for path in ("/.well-known/acme-challenge/x.tmp", "/.well-known/acme-challenge/../x.tmp"):
            self.assertIsNone(self.other.response_for(path), path)

    def test_owner_clears_tokens_left_by_a_killed_predecessor(self) -> None:
        self.owner.add("stale", "stale.t")
        restarted = ChallengeResponder(self.directory)
        restarted.clear_shared()
        self.assertIsNone(self.other.response_for("/.well-known/acme-challenge/stale"))

    def test_missing_directory_is_a_miss(self) -> None:
        lone = ChallengeResponder(os.path.join(self.directory, "absent"))
        self.assertIsNone(lone.response_for("/.well-known/acme-challenge/tok"))


class ClientHelperTests(unittest.TestCase):
    def test_split_fullchain(self) -> None:
        issuer = FakeIssuer(Clock())
        issued = issuer.sign(("a.example",), 90 * DAY, generate_key_pem())
        leaf, chain = split_fullchain(issued.cert_pem + issued.chain_pem)
        self.assertEqual(leaf, issued.cert_pem)
        self.assertEqual(chain, issued.chain_pem)

    def test_split_empty(self) -> None:
        self.assertRaises((AcmeError, ValueError), split_fullchain, b"")


# --- the service on a Clock ------------------------------------------------------------------------------


class FakeIssuer:
    """Issues real certificates valid for ``lifetime`` seconds from the clock's now; fails while ``fail`` is
    more than 0 (counting down). ``calls`` records the names of every order."""

    def __init__(self, clock: Clock, lifetime: float = 90 * DAY) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.fail = 0
        self.calls: list[tuple[str, ...]] = []
        self.closed = 0
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake ACME CA")])
        self.ca = self._build(self.ca_name, self.ca_key.public_key(), 3650 * DAY, ca=True)

    def _build(self, subject: x509.Name, public_key: Any, lifetime: float, ca: bool = False,
               names: Sequence[str] = ()) -> x509.Certificate:  # fmt: skip
        now = datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.ca_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(seconds=lifetime))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
        return builder.sign(self.ca_key, hashes.SHA256())

    def sign(self, names: Sequence[str], lifetime: float, key_pem: bytes) -> IssuedCertificate:
        key = serialization.load_pem_private_key(key_pem, password=None)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        leaf = self._build(subject, key.public_key(), lifetime, names=names)
        pem = serialization.Encoding.PEM
        return IssuedCertificate(leaf.public_bytes(pem), self.ca.public_bytes(pem), key_pem)

    async def issue(self, names: Sequence[str]) -> IssuedCertificate:
        self.calls.append(tuple(names))
        if self.fail > 0:
            self.fail -= 1
            raise AcmeError(f"{', '.join(names)}: the fake CA says no")
        return self.sign(names, self.lifetime, generate_key_pem())

    def close(self) -> None:
        self.closed += 1


def run_now(function: Any, *args: Any) -> Deferred[Any]:
    """Runs blocking work synchronously: the test's stand-in for the thread pool."""
    return maybeDeferred(function, *args)


ORDER = CertificateOrder(("www.example.com", "example.com"), "smartProxyConfig.routes[0]")


class ServiceTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(time.time())  # certificates carry real dates
        self.store = CertificateStore(clock=self.clock)
        self.issuer = FakeIssuer(self.clock)
        self.root = self.mktemp()

    def service(self, orders: Sequence[CertificateOrder] = (ORDER,), **kwargs: Any) -> AcmeService:
        settings: dict[str, Any] = {"renew_threshold_days": 30, "auto_renew": True}
        settings.update(kwargs)
        service = AcmeService(
            orders,
            store=self.store,
            responder=ChallengeResponder(),
            state_directory=self.root,
            directory_url=DIRECTORY,
            email="admin@example.com",
            reactor=self.clock,
            account=self.issuer,
            run_blocking=run_now,
            **settings,
        )
        self.addCleanup(service.stopService)
        return service

    def test_obtains_at_start_when_none_stored(self) -> None:
        service = self.service()
        service.startService()
        self.assertEqual(self.issuer.calls, [ORDER.names])
        key = self.store.lookup("www.example.com")
        self.assertIsNotNone(key)
        self.assertIs(self.store.lookup("example.com"), key)
        self.assertEqual(set(key.names), {"www.example.com", "example.com"})  # type: ignore[union-attr]
        # 90 days valid, 30 days threshold: due in 60 days; looked at again after a day at most.
        self.assertEqual(service.states["www.example.com"].next_check, self.clock.seconds() + CHECK_INTERVAL)

    def test_stored_on_disk_with_private_key_modes(self) -> None:
        self.service().startService()
        state = AcmeStateDirectory(self.root, DIRECTORY)
        where = state.certificate_directory(ORDER)
        for name, mode in (("cert.pem", 0o644), ("chain.pem", 0o644), ("key.pem", 0o600)):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(where, name)).st_mode), mode, name)
        key = state.account_key()  # created on first use (the fake issuer needs none)
        self.assertEqual(state.account_key(), key)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(state.path, "account.key")).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(state.path).st_mode), 0o700)
        loaded = state.load(ORDER)
        self.assertIsNotNone(loaded)
        self.assertEqual(self.store.lookup("example.com").fingerprint, loaded.fingerprint)  # type: ignore[union-attr]

    def test_restart_uses_stored_certificate(self) -> None:
        first = self.service()
        first.startService()
        first.stopService()
        self.store = CertificateStore(clock=self.clock)
        self.service().startService()
        self.assertEqual(len(self.issuer.calls), 1)
        self.assertIsNotNone(self.store.lookup("www.example.com"))

    def test_stored_certificate_for_other_names_is_replaced(self) -> None:
        self.service().startService()
        wider = CertificateOrder(("www.example.com", "example.com", "api.example.com"), "x")
        self.service([wider]).startService()
        self.assertEqual(self.issuer.calls[-1], wider.names)
        self.assertIn("api.example.com", self.store.lookup("api.example.com").names)  # type: ignore[union-attr]

    def test_renews_within_threshold(self) -> None:
        self.issuer.lifetime = 40 * DAY
        service = self.service()
        service.startService()
        first = self.store.lookup("example.com")
        # Due at 40 - 30 = 10 days; looked at daily until then.
        for _ in range(9):
            self.clock.advance(DAY)
        self.assertEqual(len(self.issuer.calls), 1)
        self.clock.advance(DAY)
        self.assertEqual(len(self.issuer.calls), 2)
        renewed = self.store.lookup("example.com")
        self.assertIsNot(renewed, first)
        self.assertGreater(renewed.not_after, first.not_after)  # type: ignore[union-attr]
        self.assertEqual(self.store.expiring(20 * DAY), [])

    def test_stored_certificate_near_expiry_renewed_at_start(self) -> None:
        self.issuer.lifetime = 20 * DAY
        self.service().startService()
        self.issuer.lifetime = 90 * DAY
        self.store = CertificateStore(clock=self.clock)
        self.service().startService()
        self.assertEqual(len(self.issuer.calls), 2)
        self.assertEqual(self.store.expiring(60 * DAY), [])

    def test_failures_back_off_and_keep_certificate(self) -> None:
        self.issuer.lifetime = 31 * DAY  # due within a day
        service = self.service()
        service.startService()
        self.clock.advance(DAY)
        self.assertEqual(len(self.issuer.calls), 2)  # renewed once already; now make renewals fail
        self.clock.advance(DAY)
        self.issuer.fail = 4
        calls = len(self.issuer.calls)
        self.clock.advance(DAY)  # a renewal attempt fails
        self.assertEqual(len(self.issuer.calls), calls + 1)
        in_use = self.store.lookup("example.com")
        delays = []
        for _ in range(3):
            before = self.clock.seconds()
            due = service.states["www.example.com"].next_check
            assert due is not None
            delays.append(due - before)
            self.clock.advance(due - before)
        self.assertEqual(delays, [RETRY_BASE, 2 * RETRY_BASE, 4 * RETRY_BASE])
        self.assertIs(self.store.lookup("example.com"), in_use)
        self.clock.advance(8 * RETRY_BASE)  # the fourth failure, then the fifth attempt succeeds
        self.clock.advance(16 * RETRY_BASE)
        self.assertIsNot(self.store.lookup("example.com"), in_use)
        self.assertEqual(service.states["www.example.com"].failures, 0)

    def test_backoff_is_capped(self) -> None:
        self.issuer.fail = 100
        service = self.service()
        service.startService()
        for _ in range(20):
            self.clock.advance(RETRY_MAX)
        state = service.states["www.example.com"]
        self.assertIsNone(self.store.lookup("example.com"))
        self.assertEqual(state.next_check, self.clock.seconds() + RETRY_MAX)

    def test_no_renewal_without_auto_renew(self) -> None:
        self.issuer.lifetime = 31 * DAY
        service = self.service(auto_renew=False)
        service.startService()
        for _ in range(40):
            self.clock.advance(DAY)
        self.assertEqual(len(self.issuer.calls), 1)

    def test_stop_cancels_timers(self) -> None:
        service = self.service()
        service.startService()
        self.assertTrue(self.clock.getDelayedCalls())
        self.successResultOf(service.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_releases_the_account_connections(self) -> None:
        # AcmeAccount keeps a requests session (pooled connections to the CA) for its orders.
        service = self.service()
        service.startService()
        self.assertEqual(self.issuer.closed, 0)
        self.successResultOf(service.stopService())
        self.assertEqual(self.issuer.closed, 1)

    def test_orders_run_one_at_a_time(self) -> None:
        orders = [CertificateOrder((f"n{i}.example.com",), f"o{i}") for i in range(3)]
        service = self.service(orders)
        service.startService()
        self.assertEqual([c[0] for c in self.issuer.calls], [o.primary for o in orders])
        for order in orders:
            self.assertIsNotNone(self.store.lookup(order.primary))


# --- configuration ---------------------------------------------------------------------------------------


def acme_config(**acme: Any) -> dict[str, Any]:
    """A config with one terminating "auto" route and one useNetworkProxy entry, ACME enabled."""
    settings: dict[str, Any] = {"enabled": True, "accountEmail": "admin@example.com"}
    settings.update(acme)
    return {
        "smartProxyConfig": {
            "acme": settings,
            "routes": [
                {
                    "name": "www",
                    "match": {"ports": 443, "domains": ["Example.com", "www.example.com."]},
                    "action": {"type": "forward", "target": {"host": "10.0.0.1", "port": 8080}},
                    "tls": {"mode": "terminate", "certificate": "auto"},
                }
            ],
            "domainConfigs": [
                {
                    "domains": ["shop.example.com"],
                    "targetIPs": ["10.0.0.2"],
                    "portRanges": [{"from": 8443, "to": 8443}],
                    "useNetworkProxy": True,
                }
            ],
        }
    }


class FollowerTests(unittest.TestCase):
    """Workers other than worker 0 take what worker 0's AcmeService stores, and order nothing."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(time.time())
        self.issuer = FakeIssuer(self.clock, lifetime=40 * DAY)
        self.root = self.mktemp()
        self.owner_store = CertificateStore(clock=self.clock)
        self.follower_store = CertificateStore(clock=self.clock)

    def build(self, cls: type[AcmeService], store: CertificateStore) -> AcmeService:
        service = cls(
            [ORDER],
            store=store,
            responder=ChallengeResponder(),
            state_directory=self.root,
            directory_url=DIRECTORY,
            email="admin@example.com",
            renew_threshold_days=30,
            reactor=self.clock,
            account=self.issuer,
            run_blocking=run_now,
        )
        self.addCleanup(service.stopService)
        return service

    def test_follows_issue_and_renewal(self) -> None:
        follower = self.build(AcmeFollower, self.follower_store)
        follower.startService()  # before worker 0 has anything: serves nothing yet, orders nothing
        self.assertIsNone(self.follower_store.lookup("example.com"))
        self.build(AcmeService, self.owner_store).startService()
        first = self.owner_store.lookup("example.com")
        assert first is not None
        self.clock.advance(FOLLOW_INTERVAL)
        taken = self.follower_store.lookup("www.example.com")
        self.assertEqual(taken.fingerprint if taken else None, first.fingerprint)
        # Worker 0 renews at 40 - 30 = 10 days; the follower serves the renewed one within one interval.
        for _ in range(10):
            self.clock.advance(DAY)
        renewed = self.owner_store.lookup("example.com")
        assert renewed is not None
        self.assertNotEqual(renewed.fingerprint, first.fingerprint)
        self.clock.advance(FOLLOW_INTERVAL)
        taken = self.follower_store.lookup("example.com")
        self.assertEqual(taken.fingerprint if taken else None, renewed.fingerprint)
        self.assertEqual(len(self.issuer.calls), 2)  # worker 0's two orders; none by the follower

    def test_loads_stored_certificate_at_start(self) -> None:
        self.build(AcmeService, self.owner_store).startService()
        self.build(AcmeFollower, self.follower_store).startService()
        self.assertIsNotNone(self.follower_store.lookup("example.com"))

    def test_half_written_pair_is_taken_on_the_next_look(self) -> None:
        self.build(AcmeService, self.owner_store).startService()
        follower = self.build(AcmeFollower, self.follower_store)
        follower.startService()
        first = self.follower_store.lookup("example.com")
        assert first is not None
        state = AcmeStateDirectory(self.root, DIRECTORY)
        where = state.certificate_directory(ORDER)
        issued = self.issuer.sign(ORDER.names, 90 * DAY, generate_key_pem())
        with open(os.path.join(where, "cert.pem"), "wb") as f:  # the new certificate, the old key
            f.write(issued.cert_pem)
        self.clock.advance(FOLLOW_INTERVAL)
        self.assertIs(self.follower_store.lookup("example.com"), first)
        with open(os.path.join(where, "key.pem"), "wb") as f:
            f.write(issued.key_pem)
        self.clock.advance(FOLLOW_INTERVAL)
        taken = self.follower_store.lookup("example.com")
        self.assertIsNot(taken, first)
        self.assertGreater(taken.not_after, first.not_after)  # type: ignore[union-attr]

    def test_stops_looking_when_stopped(self) -> None:
        follower = self.build(AcmeFollower, self.follower_store)
        follower.startService()
        follower.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class WorkersTests(unittest.TestCase):
    """``workers`` > 1 with ACME: accepted; worker 0 orders, the others follow, HTTP-01 tokens shared."""

    def options(self) -> Any:
        self.state = os.path.abspath(self.mktemp())
        return load_options(
            {
                "workers": 2,
                "smartProxyConfig": {
                    "bindAddress": "127.0.0.1",
                    "acme": {"enabled": True, "accountEmail": "a@example.com", "stateDirectory": self.state},
                    "routes": [
                        {
                            "match": {"ports": [8443], "domains": ["www.example.com"]},
                            "action": {"type": "forward", "target": {"host": "127.0.0.1", "port": 9}},
                            "tls": {"mode": "terminate", "certificate": "auto"},
                        }
                    ],
                },
            }
        ).options

    def test_worker_0_orders_the_others_follow(self) -> None:
        from dcrouter import DcRouter

        owner = DcRouter(self.options(), reactor=Clock(), worker=0)  # type: ignore[arg-type]
        self.assertEqual(type(owner.acme), AcmeService)
        shared = os.path.join(self.state, "http-01")
        self.assertEqual(owner.challenges.shared_directory, shared)
        self.assertTrue(os.path.isdir(shared))
        other = DcRouter(self.options(), reactor=Clock(), worker=1)  # type: ignore[arg-type]
        self.assertIsInstance(other.acme, AcmeFollower)
        self.assertEqual(other.challenges.shared_directory, os.path.join(self.state, "http-01"))

    def test_one_worker_shares_nothing(self) -> None:
        from dcrouter import DcRouter

        options = self.options()
        router = DcRouter(dataclasses.replace(options, workers=1), reactor=Clock())  # type: ignore[arg-type]
        self.assertEqual(type(router.acme), AcmeService)
        self.assertIsNone(router.challenges.shared_directory)
        self.assertFalse(os.path.exists(os.path.join(self.state, "http-01")))


class ConfigTests(unittest.TestCase):
    def errors(self, raw: dict[str, Any]) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            load_options(raw)
        return list(caught.exception.errors)

    def test_orders(self) -> None:
        options = load_options(acme_config()).options
        self.assertEqual(
            certificate_orders(options),
            [
                CertificateOrder(("example.com", "www.example.com"), "smartProxyConfig.routes[0]"),
                CertificateOrder(("shop.example.com",), "smartProxyConfig.domainConfigs[0]"),
            ],
        )

    def test_no_orders_when_disabled_or_absent(self) -> None:
        raw = acme_config()
        del raw["smartProxyConfig"]["routes"]
        raw["smartProxyConfig"]["domainConfigs"][0]["useNetworkProxy"] = False
        self.assertEqual(certificate_orders(load_options(raw).options), [])
        self.assertEqual(certificate_orders(load_options({"smtpConfig": {"ports": [2525]}}).options), [])

    def test_directory_by_use_production(self) -> None:
        def directory(**acme: Any) -> str:
            return acme_directory_url(load_options(acme_config(**acme)).options.smart_proxy_config.acme)

        self.assertEqual(directory(), LETSENCRYPT_STAGING)
        self.assertEqual(directory(useProduction=True), LETSENCRYPT_PRODUCTION)
        self.assertEqual(
            directory(useProduction=True, directoryUrl="https://ca.test/dir"), "https://ca.test/dir"
        )

    def test_state_directory_default(self) -> None:
        acme = load_options(acme_config()).options.smart_proxy_config.acme
        self.assertEqual(acme.state_directory, "/var/lib/dcrouter/acme")

    def test_account_email_required(self) -> None:
        raw = acme_config()
        del raw["smartProxyConfig"]["acme"]["accountEmail"]
        self.assertIn(
            "smartProxyConfig.acme.accountEmail: required when smartProxyConfig.acme.enabled is true",
            self.errors(raw),
        )

    def test_plain_http_directory_refused(self) -> None:
        errors = self.errors(acme_config(directoryUrl="http://ca.test/dir"))
        expected = "smartProxyConfig.acme.directoryUrl: must be an https://"
        self.assertTrue(any(e.startswith(expected) for e in errors), errors)

    def test_auto_needs_acme_enabled(self) -> None:
        raw = acme_config(enabled=False)
        raw["smartProxyConfig"]["domainConfigs"][0]["useNetworkProxy"] = False
        self.assertIn(
            'smartProxyConfig.routes[0].tls.certificate: "auto" needs smartProxyConfig.acme.enabled = true',
            self.errors(raw),
        )

    def test_auto_needs_exact_names(self) -> None:
        raw = acme_config()
        raw["smartProxyConfig"]["routes"][0]["match"]["domains"] = ["*.example.com"]
        raw["smartProxyConfig"]["domainConfigs"][0]["domains"] = ["*.shop.example.com"]
        errors = self.errors(raw)
        for where in ("routes[0].match.domains", "domainConfigs[0].domains"):
            expected = f"smartProxyConfig.{where}: ACME by HTTP-01"
            self.assertTrue(any(e.startswith(expected) for e in errors), errors)
        raw["smartProxyConfig"]["routes"][0]["match"]["domains"] = "*"
        self.assertTrue(any("match.domains: ACME needs the names" in e for e in self.errors(raw)))

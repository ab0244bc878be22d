"""Authentication providers: the chain behind the portal (order, refusals passed on, an outage answered as
an outage), and third-party providers from configuration (the example package's StaticTokens by dotted path
and by entry point, its options checked by its schema), logging in through the real Authenticator."""

from __future__ import annotations

import base64
import hashlib

from twisted.cred.checkers import ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dcrouter.auth.build import build_providers
from dcrouter.auth.chain import CheckerChain
from dcrouter.auth.credentials import OAuthBearer
from dcrouter.auth.ldap import escape_dn_value, escape_filter_value
from dcrouter.config import plugins
from dcrouter.config.auth import AuthConfig
from dcrouter.config.load import load_options
from dcrouter.config.ratelimits import IngressLimitsConfig, LimitConfig, TierConfig
from dcrouter.interfaces import IOAuthBearerToken, ProviderUnavailable
from dcrouter.limits.ingress import build_ingress_limits
from dcrouter.smtp.auth import Authenticator, AuthFailed, MailUserRealm
from dcrouter.smtp.policy import SessionPolicy
from tests.smtp_fixtures import _clock, connect, make_config
from tests.test_plugins import PluginCase

TOKEN = "build-bot-token"
DIGEST = hashlib.sha256(TOKEN.encode()).hexdigest()
STATIC = "dcrouter_example_plugins.tokens:StaticTokens"
PROVIDERS = "smtpConfig.auth.providers"


@implementer(ICredentialsChecker)
class Down:
    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials: object) -> Deferred[str]:
        return fail(ProviderUnavailable("directory down"))


def authenticator(*checkers: object, **auth: object) -> Authenticator:
    from twisted.cred.portal import Portal

    config = AuthConfig(failure_delay=0, **auth)  # type: ignore[arg-type]
    return Authenticator(config, clock=Clock(), portal=Portal(MailUserRealm(), [CheckerChain(checkers)]))


async def outcome(auth: Authenticator, credentials: object) -> str:
    try:
        return await auth.authenticate(credentials, "192.0.2.1")  # type: ignore[arg-type]
    except AuthFailed as failed:
        return f"{failed.reply.code} {failed.reply.enhanced}"


class ChainTests(TestCase):
    def setUp(self) -> None:
        self.local = InMemoryUsernamePasswordDatabaseDontUse(alice=b"local")

    async def test_first_success_wins_and_refusals_pass_on(self) -> None:
        other = InMemoryUsernamePasswordDatabaseDontUse(bob=b"other")
        auth = authenticator(self.local, other)
        self.assertEqual(await outcome(auth, UsernamePassword(b"alice", b"local")), "alice")
        self.assertEqual(await outcome(auth, UsernamePassword(b"bob", b"other")), "bob")
        self.assertEqual(await outcome(auth, UsernamePassword(b"bob", b"wrong")), "535 5.7.8")

    async def test_an_outage_is_never_a_refusal(self) -> None:
        auth = authenticator(self.local, Down())
        self.assertEqual(await outcome(auth, UsernamePassword(b"alice", b"local")), "alice")
        self.assertEqual(await outcome(auth, UsernamePassword(b"bob", b"any")), "454 4.7.0")

    async def test_only_checkers_taking_the_credentials_are_asked(self) -> None:
        @implementer(ICredentialsChecker)
        class Tokens:
            credentialInterfaces = (IOAuthBearerToken,)

            def requestAvatarId(self, credentials: IOAuthBearerToken) -> Deferred[str]:
                return succeed("t-user") if credentials.token == "t" else fail(UnauthorizedLogin())

        auth = authenticator(Down(), Tokens())
        self.assertEqual(await outcome(auth, OAuthBearer(None, "t")), "t-user")
        self.assertEqual(await outcome(auth, OAuthBearer(None, "u")), "535 5.7.8")

    def test_interfaces(self) -> None:
        self.assertTrue(verifyObject(IOAuthBearerToken, OAuthBearer("a", "t")))
        self.assertTrue(verifyObject(ICredentialsChecker, CheckerChain([self.local, Down()])))


class EscapingTests(TestCase):
    def test_filter_value(self) -> None:
        self.assertEqual(escape_filter_value("*)(uid=*"), "\\2a\\29\\28uid=\\2a")
        self.assertEqual(escape_filter_value("a\\b\x00"), "a\\5cb\\00")
        self.assertEqual(escape_filter_value("zoë"), "zoë")

    def test_dn_value(self) -> None:
        self.assertEqual(escape_dn_value("a,ou=x+y"), "a\\2cou\\3dx\\2by")
        self.assertEqual(escape_dn_value(" #a "), "\\20#a\\20")
        self.assertEqual(escape_dn_value("#a"), "\\23a")
        self.assertEqual(escape_dn_value('"<>;\\'), "\\22\\3c\\3e\\3b\\5c")


class ThirdPartyProviderTests(PluginCase):
    def setUp(self) -> None:
        self.use_examples()

    def load(self, provider: dict[str, object]) -> AuthConfig:
        raw = {
            "smtpConfig": {
                "ports": [2525],
                "hostname": "mx.example.test",
                "auth": {"methods": ["OAUTH2"], "providers": [provider], "failureDelay": 0},
            }
        }
        options = load_options(raw).options
        assert options.smtp_config is not None
        return options.smtp_config.auth

    def test_dotted_path_logs_in(self) -> None:
        config = self.load({"type": STATIC, "options": {"tokens": {"build-bot": DIGEST}}})
        checkers = build_providers(config, Clock())
        self.assertEqual(len(checkers), 1)
        self.assertTrue(verifyObject(ICredentialsChecker, checkers[0]))
        auth = Authenticator(config, clock=Clock(), reactor=Clock(), threadpool=object(), providers=checkers)  # type: ignore[arg-type]
        self.assertEqual(
            self.successResultOf(auth.authenticate(OAuthBearer(None, TOKEN), "192.0.2.1")), "build-bot"
        )
        refused = self.failureResultOf(
            auth.authenticate(OAuthBearer("build-bot", "guess"), "192.0.2.1"), AuthFailed
        )
        self.assertEqual(refused.value.reply.code, 535)

    def test_entry_point(self) -> None:
        self.register_entry_points(f"[dcrouter.auth]\nstatic-tokens = {STATIC}\n")
        config = self.load({"type": "static-tokens", "options": {"tokens": {"build-bot": DIGEST}}})
        self.assertEqual(type(build_providers(config, Clock())[0]).__name__, "StaticTokens")

    def test_options_checked_by_the_plugin_schema(self) -> None:
        errors = self.config_errors(
            {
                "smtpConfig": {
                    "ports": [2525],
                    "hostname": "mx.example.test",
                    "auth": {
                        "methods": ["OAUTH2"],
                        "providers": [
                            {"type": STATIC, "options": {"tokens": {"bot": "x"}, "extra": 1}},
                            {"type": "no.such:Provider"},
                            {"type": "dcrouter_example_plugins.keyword:KeywordScanner"},
                        ],
                    },
                }
            }
        )
        self.assertEqual(
            errors,
            [
                f"{PROVIDERS}[0].options.extra: unknown key",
                f"{PROVIDERS}[0].options.tokens: 'bot': expected the SHA-256 of the token in lowercase hex",
                (
                    f"{PROVIDERS}[1].type: cannot load auth plugin 'no.such:Provider': "
                    "ModuleNotFoundError: No module named 'no'"
                ),
                (
                    f"{PROVIDERS}[2].type: auth plugin 'dcrouter_example_plugins.keyword:KeywordScanner' is "
                    "not a class implementing ICredentialsChecker"
                ),
            ],
        )
        self.assertIsInstance(plugins.GROUPS["auth"], str)


class RateLimitTests(TestCase):
    """The rate limits' authFailures count refusals, not outages: a directory that is down must not leave
    its users locked out once it is back."""

    def test_outage_is_not_a_failed_attempt(self) -> None:
        tier = TierConfig(auth_failures=[LimitConfig(2, window=600_000)])
        config = make_config(
            auth=AuthConfig(allow_insecure=True, failure_delay=0),
            rate_limits=IngressLimitsConfig(anonymous=tier),
        )
        clock = _clock()
        limits = build_ingress_limits(config, clock)
        down = authenticator(Down(), allow_insecure=True)
        server = connect(config, clock=clock, policy=SessionPolicy(config, limits=limits), authenticator=down)
        server.exchange(b"EHLO client.example\r\n")
        plain = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0pw") + b"\r\n"
        for _ in range(3):
            self.assertEqual(server.exchange(plain), b"454 4.7.0 Temporary authentication failure\r\n")

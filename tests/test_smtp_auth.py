"""Tests for dcrouter.smtp.auth: the cred checker over the configured users, and the Authenticator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import Portal
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from dcrouter import passwords
from dcrouter.config.auth import AuthConfig, UserConfig
from dcrouter.passwords import hash_password, parse_password_hash
from dcrouter.smtp.auth import (
    MAX_FAILURE_DELAY,
    Authenticator,
    AuthFailed,
    FailureCounter,
    IMailUser,
    MailUserRealm,
    UserTableChecker,
    build_portal,
    timing_dummy,
)
from dcrouter.smtp.sasl import SaslError, SaslExchange

INVALID = b"535 5.7.8 Authentication credentials invalid\r\n"
TOO_MANY = b"454 4.7.0 Too many authentication failures, try again later\r\n"


def creds(username: str, password: str) -> UsernamePassword:
    return UsernamePassword(username.encode("utf-8"), password.encode("utf-8"))


class ImmediateReactor:
    """Delivers thread results at once: the throttling tests run the verification synchronously."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


class SynchronousThreadPool:
    """Runs work when asked: at once (``hold=False``) or when ``release()`` is called. Counts the calls, so a
    test can see that a refused attempt checked no password."""

    def __init__(self, *, hold: bool = False) -> None:
        self.hold = hold
        self.calls = 0
        self._held: list[Callable[[], None]] = []

    def callInThreadWithCallback(
        self, onResult: Callable[[bool, Any], None], f: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> None:
        self.calls += 1

        def run() -> None:
            try:
                result = f(*args, **kwargs)
            except BaseException as error:  # noqa: BLE001 (as twisted's ThreadPool does: all go to onResult)
                onResult(False, error)
            else:
                onResult(True, result)

        if self.hold:
            self._held.append(run)
        else:
            run()

    def release(self) -> None:
        held, self._held = self._held, []
        for run in held:
            run()


class CheckerTests(unittest.TestCase):
    """The checker with a real thread pool and the real reactor."""

    def setUp(self) -> None:
        self.patch(passwords, "DEFAULT_LOG2_N", 10)
        self.users = [
            UserConfig(username="alice", password=hash_password("wonderland")),
            UserConfig(username="bob", password="plain-text-secret"),
        ]
        self.threadpool = ThreadPool(minthreads=1, maxthreads=2, name="test-auth")
        self.threadpool.start()
        self.addCleanup(self.threadpool.stop)
        self.checker = UserTableChecker(self.users, reactor=global_reactor, threadpool=self.threadpool)

    async def _avatar(self, username: str, password: str) -> str:
        return await self.checker.requestAvatarId(creds(username, password))

    def avatar(self, username: str, password: str) -> Deferred[str]:
        return Deferred.fromCoroutine(self._avatar(username, password))

    async def test_hashed_password(self) -> None:
        self.assertEqual(await self.avatar("alice", "wonderland"), "alice")

    async def test_plain_text_password(self) -> None:
        self.assertEqual(await self.avatar("bob", "plain-text-secret"), "bob")

    async def test_wrong_password(self) -> None:
        with self.assertRaises(UnauthorizedLogin):
            await self.avatar("alice", "Wonderland")
        with self.assertRaises(UnauthorizedLogin):
            await self.avatar("bob", "plain-text-secre")

    async def test_unknown_user(self) -> None:
        with self.assertRaises(UnauthorizedLogin):
            await self.avatar("carol", "wonderland")
        # Case matters: user names are matched exactly.
        with self.assertRaises(UnauthorizedLogin):
            await self.avatar("Alice", "wonderland")

    async def test_unknown_user_with_dummy_as_password(self) -> None:
        # Even the stored dummy itself, given as a plain password for an unknown name, does not let anyone in.
        with self.assertRaises(UnauthorizedLogin):
            await self.avatar("carol", timing_dummy(self.users))

    def test_runs_off_the_reactor_thread(self) -> None:
        d = self.checker.requestAvatarId(creds("alice", "wonderland"))
        # The result travels back through reactor.callFromThread, which cannot run while this test holds the
        # reactor thread: a synchronous check would already have fired.
        self.assertNoResult(d)
        return d.addCallback(self.assertEqual, "alice")

    async def test_portal_login(self) -> None:
        portal = build_portal(self.users, reactor=global_reactor, threadpool=self.threadpool)
        interface, avatar, logout = await portal.login(creds("alice", "wonderland"), None, IMailUser)
        self.assertIs(interface, IMailUser)
        self.assertEqual(avatar, "alice")
        logout()


class TimingDummyTests(unittest.TestCase):
    def test_same_cost_as_configured_hashes(self) -> None:
        users = [
            UserConfig(username="bob", password="plain"),
            UserConfig(username="alice", password=hash_password("x", log2_n=11, r=4, p=2)),
        ]
        dummy = parse_password_hash(timing_dummy(users))
        assert dummy is not None
        self.assertEqual((dummy.log2_n, dummy.r, dummy.p), (11, 4, 2))
        self.assertNotEqual(timing_dummy(users), timing_dummy(users))

    def test_plain_text_only(self) -> None:
        dummy = timing_dummy([UserConfig(username="bob", password="plain")])
        self.assertFalse(passwords.looks_like_password_hash(dummy))
        self.assertNotEqual(dummy, "plain")


class AuthenticatorSetup(unittest.TestCase):
    def setUp(self) -> None:
        self.patch(passwords, "DEFAULT_LOG2_N", 10)
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.threadpool = SynchronousThreadPool()
        self.log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def authenticator(self, **overrides: Any) -> Authenticator:
        settings: dict[str, Any] = {
            "users": [
                UserConfig(username="alice", password=hash_password("wonderland")),
                UserConfig(username="bob", password="builder"),
            ],
            "max_failures": 3,
            "failure_window": 60_000,
            "failure_delay": 1_000,
        }
        settings.update(overrides)
        return Authenticator(
            AuthConfig(**settings), clock=self.clock, reactor=ImmediateReactor(), threadpool=self.threadpool
        )

    def assertUser(self, d: Deferred[str], username: str) -> None:
        self.assertEqual(self.successResultOf(d), username)

    def assertReply(self, d: Deferred[str], wire: bytes) -> None:
        failure = self.failureResultOf(d, AuthFailed)
        self.assertEqual(failure.value.reply.to_bytes(), wire)

    def fail_after(self, d: Deferred[str], seconds: float) -> None:
        """``d`` fails with 535 exactly ``seconds`` after now, not before."""
        if seconds > 0:
            self.clock.advance(seconds - 0.001)
            self.assertNoResult(d)
            self.clock.advance(0.001)
        self.assertReply(d, INVALID)


class MechanismTests(AuthenticatorSetup):
    def test_default_mechanisms(self) -> None:
        self.assertEqual(self.authenticator().mechanisms, ["PLAIN", "LOGIN"])

    def test_configured_mechanisms(self) -> None:
        self.assertEqual(
            self.authenticator(methods=["LOGIN", "OAUTH2", "LOGIN"]).mechanisms,
            ["LOGIN", "XOAUTH2", "OAUTHBEARER"],
        )

    def test_start(self) -> None:
        exchange = self.authenticator().start("plain", "AGFsaWNlAHNlY3JldA==")
        self.assertIsInstance(exchange, SaslExchange)
        self.assertEqual(exchange.mechanism, "PLAIN")
        result = exchange.begin()
        assert isinstance(result, UsernamePassword)
        self.assertEqual((result.username, result.password), (b"alice", b"secret"))

    def test_unrecognized(self) -> None:
        for authenticator, mechanism in [
            (self.authenticator(), "CRAM-MD5"),
            (self.authenticator(), "OAUTH2"),
            (self.authenticator(methods=["LOGIN"]), "PLAIN"),
        ]:
            error = self.assertRaises(SaslError, authenticator.start, mechanism, None)
            self.assertEqual(error.reply.to_bytes(), b"504 5.5.4 Unrecognized authentication type\r\n")


class AuthenticateTests(AuthenticatorSetup):
    def test_success_is_not_delayed(self) -> None:
        auth = self.authenticator()
        self.assertUser(auth.authenticate(creds("alice", "wonderland"), "192.0.2.1"), "alice")
        self.assertUser(auth.authenticate(creds("bob", "builder"), "192.0.2.1"), "bob")

    def test_wrong_password_is_delayed(self) -> None:
        d = self.authenticator().authenticate(creds("alice", "guess"), "192.0.2.1")
        self.fail_after(d, 1.0)

    def test_unknown_user_looks_like_wrong_password(self) -> None:
        auth = self.authenticator()
        unknown = auth.authenticate(creds("mallory", "guess"), "192.0.2.1")
        wrong = auth.authenticate(creds("alice", "guess"), "192.0.2.2")
        # Both paths did one verification (the unknown one against the dummy hash).
        self.assertEqual(self.threadpool.calls, 2)
        self.assertNoResult(unknown)
        self.assertNoResult(wrong)
        self.clock.advance(1.0)
        self.assertReply(unknown, INVALID)
        self.assertReply(wrong, INVALID)

    def test_delay_grows_per_failure(self) -> None:
        auth = self.authenticator(max_failures=10)
        for count, user in enumerate(["alice", "bob", "carol", "alice"], start=1):
            self.fail_after(auth.authenticate(creds(user, "guess"), "192.0.2.1"), float(count))

    def test_delay_is_capped(self) -> None:
        auth = self.authenticator(max_failures=10, failure_delay=4_000)
        self.fail_after(auth.authenticate(creds("alice", "a"), "192.0.2.1"), 4.0)
        self.fail_after(auth.authenticate(creds("alice", "b"), "192.0.2.1"), 8.0)
        self.fail_after(auth.authenticate(creds("alice", "c"), "192.0.2.1"), MAX_FAILURE_DELAY)

    def test_hanging_up_does_not_reset_counting(self) -> None:
        auth = self.authenticator(max_failures=10)
        first = auth.authenticate(creds("alice", "a"), "192.0.2.1")
        # The client drops the connection before the delayed reply; the failure is already counted.
        first.cancel()
        self.failureResultOf(first)
        self.fail_after(auth.authenticate(creds("alice", "b"), "192.0.2.1"), 2.0)

    def test_refused_after_max_failures_per_ip(self) -> None:
        auth = self.authenticator()
        for count, user in enumerate(["alice", "bob", "carol"], start=1):
            self.fail_after(auth.authenticate(creds(user, "guess"), "192.0.2.1"), float(count))
        calls = self.threadpool.calls
        # Even the right password is refused now, at once, and without being checked.
        self.assertReply(auth.authenticate(creds("alice", "wonderland"), "192.0.2.1"), TOO_MANY)
        self.assertEqual(self.threadpool.calls, calls)
        # Another IP is not affected.
        self.assertUser(auth.authenticate(creds("alice", "wonderland"), "192.0.2.9"), "alice")

    def test_refused_after_max_failures_per_user(self) -> None:
        auth = self.authenticator()
        for count in range(1, 4):
            self.fail_after(auth.authenticate(creds("alice", "guess"), f"192.0.2.{count}"), float(count))
            mallory = auth.authenticate(creds("mallory", "guess"), f"192.0.2.{10 + count}")
            self.fail_after(mallory, float(count))
        calls = self.threadpool.calls
        # A fresh IP gets the same refusal for the existing user and for the unknown one.
        self.assertReply(auth.authenticate(creds("alice", "wonderland"), "198.51.100.7"), TOO_MANY)
        self.assertReply(auth.authenticate(creds("mallory", "x"), "198.51.100.8"), TOO_MANY)
        self.assertEqual(self.threadpool.calls, calls)
        self.assertUser(auth.authenticate(creds("bob", "builder"), "198.51.100.7"), "bob")

    def test_refusal_ends_when_failures_leave_the_window(self) -> None:
        auth = self.authenticator()
        for count in range(1, 4):
            self.fail_after(auth.authenticate(creds("alice", "guess"), "192.0.2.1"), float(count))
        # Failures count when the check ends, before the delayed reply: at t0, t0+1 and t0+3. Now is t0+6.
        self.clock.advance(60 - 6 - 0.001)
        self.assertReply(auth.authenticate(creds("alice", "wonderland"), "192.0.2.1"), TOO_MANY)
        self.clock.advance(0.001)
        # The oldest failure left the window: two remain, so the next failure waits 3 s and then locks again.
        again = auth.authenticate(creds("alice", "guess"), "192.0.2.1")
        self.assertReply(auth.authenticate(creds("alice", "wonderland"), "192.0.2.1"), TOO_MANY)
        self.fail_after(again, 3.0)
        self.clock.advance(60)
        self.assertUser(auth.authenticate(creds("alice", "wonderland"), "192.0.2.1"), "alice")
        self.fail_after(auth.authenticate(creds("alice", "guess"), "192.0.2.1"), 1.0)

    def test_checks_in_flight_count_against_the_limit(self) -> None:
        self.threadpool.hold = True
        auth = self.authenticator()
        # Per IP: three users guessed at once from one address.
        pending = [auth.authenticate(creds(user, "guess"), "192.0.2.1") for user in ["alice", "bob", "carol"]]
        self.assertReply(auth.authenticate(creds("dave", "guess"), "192.0.2.1"), TOO_MANY)
        # Per user: one user guessed at once from three addresses.
        pending += [auth.authenticate(creds("erin", "guess"), f"198.51.100.{n}") for n in range(3)]
        self.assertReply(auth.authenticate(creds("erin", "guess"), "198.51.100.9"), TOO_MANY)
        self.assertEqual(self.threadpool.calls, 6)
        self.threadpool.release()
        self.clock.advance(3.0)
        for d in pending:
            self.assertReply(d, INVALID)

    def test_cancel_during_check(self) -> None:
        self.threadpool.hold = True
        auth = self.authenticator(max_failures=1)
        d = auth.authenticate(creds("alice", "wonderland"), "192.0.2.1")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        # The abandoned check no longer holds a place against the limit, and counted no failure.
        self.threadpool.hold = False
        self.threadpool.release()
        self.assertUser(auth.authenticate(creds("alice", "wonderland"), "192.0.2.1"), "alice")

    def test_long_user_names_are_counted_by_digest(self) -> None:
        auth = self.authenticator(max_failures=2)
        long_name = "x" * 10_000
        self.fail_after(auth.authenticate(creds(long_name, "a"), "192.0.2.1"), 1.0)
        self.fail_after(auth.authenticate(creds(long_name, "b"), "192.0.2.2"), 2.0)
        self.assertReply(auth.authenticate(creds(long_name, "c"), "192.0.2.3"), TOO_MANY)
        # A different long name with the same prefix is a different key.
        self.fail_after(auth.authenticate(creds(long_name + "y", "d"), "192.0.2.4"), 1.0)
        self.assertTrue(all(len(event.get("user", "")) < 300 for event in self.log))

    def test_success_clears_user_counter_not_ip_counter(self) -> None:
        auth = self.authenticator(max_failures=10)
        self.fail_after(auth.authenticate(creds("alice", "a"), "192.0.2.1"), 1.0)
        self.fail_after(auth.authenticate(creds("alice", "b"), "192.0.2.1"), 2.0)
        self.assertUser(auth.authenticate(creds("alice", "wonderland"), "192.0.2.1"), "alice")
        # alice's counter is cleared: from another IP her next failure waits 1 s.
        self.fail_after(auth.authenticate(creds("alice", "c"), "192.0.2.2"), 1.0)
        # The IP's counter is not: its next failure (for another user) is its third.
        self.fail_after(auth.authenticate(creds("bob", "d"), "192.0.2.1"), 3.0)

    def test_zero_delay(self) -> None:
        auth = self.authenticator(failure_delay=0)
        self.assertReply(auth.authenticate(creds("alice", "guess"), "192.0.2.1"), INVALID)

    def test_broken_check_is_temporary(self) -> None:
        # A portal with no checker for these credentials: the check cannot be made at all.
        auth = Authenticator(AuthConfig(), clock=self.clock, portal=Portal(MailUserRealm(), []))
        d = auth.authenticate(creds("alice", "wonderland"), "192.0.2.1")
        self.assertReply(d, b"454 4.7.0 Temporary authentication failure\r\n")
        self.assertEqual(len(self.flushLoggedErrors(UnhandledCredentials)), 1)

    def test_needs_portal_or_threadpool(self) -> None:
        self.assertRaises(TypeError, Authenticator, AuthConfig(), clock=self.clock)

    def test_logs_user_and_ip_never_password(self) -> None:
        auth = self.authenticator()
        self.fail_after(auth.authenticate(creds("alice", "hunter2-guess"), "192.0.2.1"), 1.0)
        self.successResultOf(auth.authenticate(creds("bob", "builder"), "192.0.2.1"))
        failures = [event for event in self.log if "failed" in formatEvent(event)]
        self.assertEqual(len(failures), 1)
        self.assertEqual((failures[0]["user"], failures[0]["ip"]), ("alice", "192.0.2.1"))
        self.assertEqual(failures[0]["log_namespace"], "dcrouter.smtp.auth")
        for event in self.log:
            text = formatEvent(event) + repr(event)
            self.assertNotIn("hunter2-guess", text)
            self.assertNotIn("builder", text)


class RealThreadAuthenticatorTests(unittest.TestCase):
    """The default portal end to end: real thread pool, real reactor for thread results, Clock for delays."""

    def setUp(self) -> None:
        self.patch(passwords, "DEFAULT_LOG2_N", 10)
        self.threadpool = ThreadPool(minthreads=1, maxthreads=2, name="test-auth-e2e")
        self.threadpool.start()
        self.addCleanup(self.threadpool.stop)
        config = AuthConfig(
            users=[UserConfig(username="alice", password=hash_password("wonderland"))], failure_delay=0
        )
        self.auth = Authenticator(config, clock=Clock(), reactor=global_reactor, threadpool=self.threadpool)

    async def test_success(self) -> None:
        self.assertEqual(await self.auth.authenticate(creds("alice", "wonderland"), "192.0.2.1"), "alice")

    async def test_failure(self) -> None:
        with self.assertRaises(AuthFailed) as caught:
            await self.auth.authenticate(creds("alice", "nope"), "192.0.2.1")
        self.assertEqual(caught.exception.reply.to_bytes(), INVALID)


class FailureCounterTests(unittest.TestCase):
    def test_entries_expire(self) -> None:
        counter = FailureCounter(window=10.0, limit=3)
        counter.fail("a", 0.0)
        counter.fail("b", 5.0)
        self.assertEqual(len(counter), 2)
        counter.prune(10.0)
        self.assertEqual(len(counter), 1)
        self.assertEqual(counter.recent("a", 10.0), 0)
        self.assertEqual(counter.recent("b", 10.0), 1)
        counter.prune(15.0)
        self.assertEqual(len(counter), 0)

    def test_table_is_capped(self) -> None:
        counter = FailureCounter(window=10.0, limit=3, max_keys=2)
        counter.fail("a", 0.0)
        counter.fail("b", 1.0)
        counter.fail("a", 2.0)
        counter.fail("c", 3.0)
        self.assertEqual(len(counter), 2)
        # "b" failed least recently, so it was the one dropped.
        recent = [counter.recent(key, 3.0) for key in ["a", "b", "c"]]
        self.assertEqual(recent, [2, 0, 1])

    def test_times_per_key_are_bounded(self) -> None:
        counter = FailureCounter(window=10.0, limit=3)
        for moment in range(100):
            counter.fail("a", moment / 100)
        self.assertEqual(counter.recent("a", 1.0), 3)
        self.assertTrue(counter.blocked("a", 1.0))

"""SMTP AUTH: a twisted.cred portal over ``smtpConfig.auth.users`` and the other providers (LDAP, OAUTH2
tokens, plugins: :mod:`dcrouter.auth`), and the throttling around all of them.

One :class:`Authenticator` serves the whole router, so failure counters survive reconnects. The protocol asks
it which mechanisms to advertise, starts a :class:`~dcrouter.smtp.sasl.SaslExchange`, and hands the resulting
credentials to :meth:`Authenticator.authenticate`, whose Deferred fires with the user name or fails with
:class:`AuthFailed` carrying the reply to send.

Throttling decisions (each one is something a reader would ask about):

- Failures are counted per client IP and per user name (whether or not the user exists) over a sliding window
  of ``failureWindow`` ms. A failure reply is held back ``failureDelay`` ms per failure counted for that IP or
  name (the larger of the two), capped at :data:`MAX_FAILURE_DELAY` seconds; success replies are never
  delayed.
- A failure is counted when the password check ends, not when the delayed reply goes out, so hanging up early
  saves an attacker nothing. Checks still in flight count against the limit too, so a client cannot start many
  checks in parallel before the first failure is recorded.
- Once ``maxFailures`` failures are counted for an IP or a name, attempts from that IP or for that name are
  refused with ``454 4.7.0`` without checking any password, until enough of those failures leave the window.
  Refused attempts are not counted themselves, so the lockout of a name ends on schedule even under continued
  guessing.
- A success clears the counter of its user name only, never the IP's: otherwise one valid account would let
  its holder guess other users' passwords without limit.
- Counter tables drop entries whose failures all left the window and are capped at :data:`MAX_TRACKED_KEYS`
  entries each, evicting the least recently failed.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from dcrouter.auth.chain import CheckerChain
from dcrouter.config.auth import AuthConfig, UserConfig
from dcrouter.interfaces import IOAuthBearerToken, ProviderUnavailable
from dcrouter.log import logger
from dcrouter.mail.reply import Reply
from dcrouter.passwords import ScryptHash, parse_password_hash, verify_password
from dcrouter.smtp.sasl import MECHANISMS, OAUTH_MECHANISMS, SaslError, SaslExchange

log = logger(__name__)

MAX_FAILURE_DELAY = 10.0
MAX_TRACKED_KEYS = 100_000
#: User names longer than this are counted and logged by a digest / a prefix, so that up to MAX_TRACKED_KEYS
#: names of up to 12 KiB each (what SASL lets through) cannot fill memory or logs.
MAX_USER_KEY = 256

AUTH_SUCCEEDED = Reply(235, "2.7.0", "Authentication successful")
INVALID_CREDENTIALS = Reply(535, "5.7.8", "Authentication credentials invalid")
TOO_MANY_FAILURES = Reply(454, "4.7.0", "Too many authentication failures, try again later")
TEMPORARY_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure")
UNRECOGNIZED_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")


class AuthFailed(Exception):
    """Authentication did not succeed; ``reply`` is what to send the client."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"{reply.code} {reply.enhanced} {reply.text}")
        self.reply = reply


class IMailUser(Interface):
    """The avatar interface of SMTP AUTH. The avatar is the authenticated user name (a ``str``)."""


def timing_dummy(users: Sequence[UserConfig]) -> str:
    """A stored value that no password matches, costing as much to check as the configured users' passwords.

    Checked for unknown user names so that the time a failure takes does not tell whether the name exists.
    Built from random bytes instead of hashing a password, so constructing a checker costs no CPU.
    """
    for user in users:
        parsed = parse_password_hash(user.password)
        if parsed is not None:
            salt, digest = os.urandom(len(parsed.salt)), os.urandom(len(parsed.digest))
            return ScryptHash(parsed.log2_n, parsed.r, parsed.p, salt, digest).encode()
    # Only plain-text passwords are configured: a plain-text check costs the same whatever the stored value.
    return "dummy:" + os.urandom(24).hex()


def _verify_utf8(stored: str, password: bytes | str) -> bool:
    # The SASL layer refuses passwords that are not UTF-8; a credentials object built elsewhere still gets the
    # full-cost check, then a refusal, so decoding failures do not show in timing either.
    if isinstance(password, str):
        return verify_password(stored, password)
    try:
        text, valid = password.decode("utf-8"), True
    except UnicodeDecodeError:
        text, valid = password.decode("utf-8", "replace"), False
    return verify_password(stored, text) and valid


def _as_text(value: bytes | str) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _user_key(username: str) -> str:
    if len(username) <= MAX_USER_KEY:
        return username
    return "sha256:" + hashlib.sha256(username.encode("utf-8", "surrogatepass")).hexdigest()


def _loggable(username: str) -> str:
    return username if len(username) <= MAX_USER_KEY else username[:MAX_USER_KEY] + "..."


@implementer(ICredentialsChecker)
class UserTableChecker:
    """Checks ``IUsernamePassword`` credentials against the configured users.

    ``requestAvatarId`` returns a Deferred firing with the user name (``str``) or failing with
    ``UnauthorizedLogin`` — the same for an unknown user as for a wrong password, after the same amount of
    work. Password verification runs in ``threadpool``; the Deferred fires in ``reactor``'s thread.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self, users: Sequence[UserConfig], *, reactor: IReactorFromThreads, threadpool: ThreadPool
    ) -> None:
        self._users: dict[str, str] = {}
        for user in users:
            # The loader refuses duplicate names; if one slips through, the first entry wins.
            self._users.setdefault(user.username, user.password)
        self._dummy = timing_dummy(users)
        self._reactor = reactor
        self._threadpool = threadpool

    # Twisted types avatar IDs as bytes, but the Portal hands them to the realm untouched, and the realm
    # here (MailUserRealm) takes the name as text: decoding it twice would be the only gain of bytes.
    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[str]:  # type: ignore[override]
        username = _as_text(credentials.username)
        stored = self._users.get(username)
        known = stored is not None
        against = stored if stored is not None else self._dummy
        checked = deferToThreadPool(
            self._reactor, self._threadpool, _verify_utf8, against, credentials.password
        )

        def decide(matched: bool) -> str:
            if matched and known:
                return username
            raise UnauthorizedLogin()

        return checked.addCallback(decide)


@implementer(IRealm)
class MailUserRealm:
    """Gives each authenticated user an avatar that is simply its name."""

    def requestAvatar(
        self, avatarId: Any, mind: object, *interfaces: Any
    ) -> tuple[Any, str, Callable[[], None]]:
        if IMailUser not in interfaces:
            raise NotImplementedError("MailUserRealm only provides IMailUser")
        return IMailUser, _as_text(avatarId), lambda: None


def build_portal(
    users: Sequence[UserConfig],
    *,
    reactor: IReactorFromThreads,
    threadpool: ThreadPool,
    providers: Sequence[ICredentialsChecker] = (),
) -> Portal:
    """A Portal over ``users`` and then ``providers`` (asked in that order, :class:`CheckerChain`):
    ``login(creds, None, IMailUser)`` fires with ``(IMailUser, name, logout)``."""
    checkers: list[ICredentialsChecker] = []
    if users or not providers:
        checkers.append(UserTableChecker(users, reactor=reactor, threadpool=threadpool))
    checkers.extend(providers)
    return Portal(MailUserRealm(), [CheckerChain(checkers)])


class FailureCounter:
    """Recent failure times per key (an IP or a user name), bounded in age and in number of keys."""

    def __init__(self, *, window: float, limit: int, max_keys: int = MAX_TRACKED_KEYS) -> None:
        self._window = window
        self._limit = max(limit, 1)
        self._max_keys = max_keys
        # Ordered by the time of each key's latest failure, oldest first, so pruning stops at the first live
        # key.
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._pending: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._failures)

    def prune(self, now: float) -> None:
        horizon = now - self._window
        while self._failures:
            key, times = next(iter(self._failures.items()))
            if times[-1] > horizon:
                break
            del self._failures[key]

    def recent(self, key: str, now: float) -> int:
        """Failures of ``key`` within the window ending at ``now``."""
        times = self._failures.get(key)
        if times is None:
            return 0
        horizon = now - self._window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[key]
            return 0
        return len(times)

    def blocked(self, key: str, now: float) -> bool:
        """True if failures plus checks in flight for ``key`` reached the limit."""
        return self.recent(key, now) + self._pending.get(key, 0) >= self._limit

    def begin(self, key: str) -> None:
        self._pending[key] = self._pending.get(key, 0) + 1

    def end(self, key: str) -> None:
        left = self._pending.get(key, 0) - 1
        if left > 0:
            self._pending[key] = left
        else:
            self._pending.pop(key, None)

    def fail(self, key: str, now: float) -> int:
        """Record a failure of ``key`` at ``now``; returns the failures now counted for it."""
        times = self._failures.pop(key, None)
        if times is None:
            times = deque(maxlen=self._limit)
        times.append(now)
        self._failures[key] = times
        while len(self._failures) > self._max_keys:
            self._failures.popitem(last=False)
        return self.recent(key, now)

    def clear(self, key: str) -> None:
        self._failures.pop(key, None)


class Authenticator:
    """SMTP AUTH for one router: mechanisms, SASL exchanges, credential checks and failure throttling.

    Give either ``portal`` (any Portal whose login yields ``IMailUser`` avatars) or ``reactor`` and
    ``threadpool`` to build the default one over ``config.users``. ``clock`` times the failure window and
    delays.
    """

    def __init__(
        self,
        config: AuthConfig,
        *,
        clock: IReactorTime,
        reactor: IReactorFromThreads | None = None,
        threadpool: ThreadPool | None = None,
        portal: Portal | None = None,
        providers: Sequence[ICredentialsChecker] = (),
    ) -> None:
        if portal is None:
            if reactor is None or threadpool is None:
                raise TypeError("Authenticator needs a portal, or a reactor and a threadpool to build one")
            portal = build_portal(config.users, reactor=reactor, threadpool=threadpool, providers=providers)
        self._config = config
        self._clock = clock
        self._portal = portal
        self._providers = list(providers)
        window = config.failure_window / 1000.0
        self._by_ip = FailureCounter(window=window, limit=config.max_failures)
        self._by_user = FailureCounter(window=window, limit=config.max_failures)

    def close(self) -> None:
        """Close what the providers keep open (the LDAP service connection): called when the router stops.
        A provider (a plugin's too) that holds connections may have a ``close()`` taking no argument."""
        for provider in self._providers:
            close = getattr(provider, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:  # noqa: BLE001 (one provider's trouble must not stop the others closing)
                    log.failure("closing authentication provider {provider!r}", provider=provider)

    @property
    def mechanisms(self) -> list[str]:
        """The mechanisms to advertise after ``AUTH``, in configured order, without duplicates."""
        offered: list[str] = []
        for method in self._config.methods:
            name = method.upper()
            names = OAUTH_MECHANISMS if name == "OAUTH2" else (name,)
            offered.extend(n for n in names if n in MECHANISMS and n not in offered)
        return offered

    def start(self, mechanism: str, initial_response: str | None = None) -> SaslExchange:
        """A new exchange for ``mechanism`` (case-insensitive); its first call is ``begin()``.

        Raises SaslError(504 5.5.4) for a mechanism that is unknown or not enabled.
        """
        name = mechanism.upper()
        if name not in self.mechanisms:
            raise SaslError(UNRECOGNIZED_MECHANISM)
        return SaslExchange(name, initial_response)

    def authenticate(
        self,
        credentials: IUsernamePassword | IOAuthBearerToken,
        client_ip: str,
        *,
        session_id: str | None = None,
    ) -> Deferred[str]:
        """Check ``credentials`` for a client at ``client_ip`` (``session_id``: the SMTP session asking, for
        the log lines).

        Fires with the user name, or fails with AuthFailed whose reply is ``535 5.7.8`` (invalid, after the
        throttling delay), ``454 4.7.0`` "Too many authentication failures" (refused unchecked) or ``454
        4.7.0`` "Temporary authentication failure" (the check itself broke).
        """
        return Deferred.fromCoroutine(self._authenticate(credentials, client_ip, session_id))

    async def _authenticate(
        self, credentials: IUsernamePassword | IOAuthBearerToken, client_ip: str, session_id: str | None
    ) -> str:
        username = _as_text(credentials.username or "")
        user_key, shown = _user_key(username), _loggable(username)
        if not username:
            # A token without a named user (OAUTHBEARER without a=): counted by the token, so that such
            # attempts from everywhere do not share one counter (anyone could lock everyone out).
            token = cast(str, getattr(credentials, "token", ""))
            user_key = "token:" + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
        now = self._clock.seconds()
        self._by_ip.prune(now)
        self._by_user.prune(now)
        if self._by_ip.blocked(client_ip, now) or self._by_user.blocked(user_key, now):
            log.warn(
                "AUTH refused: too many failures for ip {ip} or user {user!r}",
                ip=client_ip,
                user=shown,
                session_id=session_id,
            )
            raise AuthFailed(TOO_MANY_FAILURES)
        self._by_ip.begin(client_ip)
        self._by_user.begin(user_key)
        try:
            result = await self._login(credentials)
        finally:
            self._by_ip.end(client_ip)
            self._by_user.end(user_key)
        if isinstance(result, str):
            self._by_user.clear(user_key)
            log.info(
                "AUTH succeeded for user {user!r} from ip {ip}",
                ip=client_ip,
                user=result,
                session_id=session_id,
            )
            return result
        if result.check(ProviderUnavailable):
            log.warn(
                "AUTH for user {user!r} from ip {ip} undecided: {reason}",
                ip=client_ip,
                user=shown,
                reason=str(result.value),
                session_id=session_id,
            )
            raise AuthFailed(TEMPORARY_FAILURE)
        if not result.check(UnauthorizedLogin):
            log.failure(
                "AUTH check broke for user {user!r} from ip {ip}",
                result,
                ip=client_ip,
                user=shown,
                session_id=session_id,
            )
            raise AuthFailed(TEMPORARY_FAILURE)
        await self._delay_failure(client_ip, user_key, shown, session_id)
        raise AuthFailed(INVALID_CREDENTIALS)

    async def _login(self, credentials: IUsernamePassword | IOAuthBearerToken) -> str | Failure:
        try:
            _interface, avatar, logout = await self._portal.login(
                cast(ICredentials, credentials), None, IMailUser
            )
        except CancelledError:
            # The caller gave up (the client hung up): nothing broke, so nothing to log or answer.
            raise
        except Exception:  # noqa: BLE001 (a value: the caller logs it and answers 454, or 535 if refused)
            return Failure()
        # The avatar holds no resources, so the session needs no logout.
        logout()
        # The Portal types avatars as object; ours (MailUserRealm) is the user name.
        return _as_text(cast("bytes | str", avatar))

    async def _delay_failure(self, client_ip: str, user_key: str, shown: str, session_id: str | None) -> None:
        now = self._clock.seconds()
        count = max(self._by_ip.fail(client_ip, now), self._by_user.fail(user_key, now))
        delay = min(count * self._config.failure_delay / 1000.0, MAX_FAILURE_DELAY)
        log.info(
            "AUTH failed for user {user!r} from ip {ip} ({count} recent failures, reply in {delay}s)",
            ip=client_ip,
            user=shown,
            count=count,
            delay=delay,
            session_id=session_id,
        )
        if delay > 0:
            await deferLater(self._clock, delay)

"""Passwords checked against an LDAP directory (``smtpConfig.auth.ldapUrl``), with ldaptor on the reactor.

Search then bind (the default): a service connection, bound as ``auth.ldap.bindDn`` (or anonymous), finds
the user's entry with ``userFilter``; the password is then checked by a simple bind as that entry on a
connection of its own, closed after. The service connection is kept and reused; a broken or timed-out one is
dropped and made again on the next check. Direct bind (``userDn``) skips the search.

The user name is escaped where it goes (RFC 4515 in a filter, RFC 4514 in a DN), so ``*)(uid=*`` is a name
that matches nothing. An empty password is refused before any bind: to LDAP it means an unauthenticated bind,
which succeeds (RFC 4513 §5.1.2). Every connection and operation is bounded by ``timeout``; an outage
(refused, reset, timed out, a busy or unavailable server) raises :class:`~dcrouter.interfaces.
ProviderUnavailable` (``454 4.7.0``), only a wrong password or an unknown user ``UnauthorizedLogin``.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from ldaptor import ldapfilter
from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap.ldapclient import LDAPClient
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from dcrouter.config.auth import USER_PLACEHOLDER, LdapConfig
from dcrouter.interfaces import ProviderUnavailable
from dcrouter.log import logger
from dcrouter.net.ldapurl import LdapUrl

log = logger(__name__)

#: Result codes that say "these credentials do not log in" (RFC 4511 appendix A): invalidCredentials,
#: inappropriateAuthentication, insufficientAccessRights, unwillingToPerform (a locked account). Any other
#: failure is the directory's trouble, not the client's.
REFUSED_CODES = frozenset({48, 49, 50, 53})
SUCCESS = 0
NO_SUCH_OBJECT = 32


def escape_filter_value(value: str) -> str:
    """``value`` as an assertion value in an LDAP filter (RFC 4515 §3): ``*()\\`` and NUL as ``\\XX``."""
    return "".join(f"\\{ord(c):02x}" if c in "*()\\\x00" else c for c in value)


def escape_dn_value(value: str) -> str:
    """``value`` as an attribute value in a DN (RFC 4514 §2.4): the specials as ``\\XX`` hex pairs, and a
    leading space or ``#`` and a trailing space too."""
    out = [f"\\{ord(c):02x}" if c in ',+"\\<>;=\x00' else c for c in value]
    if out and out[0] in (" ", "#"):
        out[0] = f"\\{ord(out[0]):02x}"
    if out and out[-1] == " ":
        out[-1] = "\\20"
    return "".join(out)


def _trust(config: LdapConfig) -> Any:
    if config.ca_file is None:
        return ssl.platformTrust()
    with open(config.ca_file, "rb") as f:
        pem = f.read()
    certificates = []
    marker = b"-----END CERTIFICATE-----"
    for chunk in pem.split(marker)[:-1]:
        certificates.append(ssl.Certificate.loadPEM(chunk + marker + b"\n"))
    if not certificates:
        raise ValueError(f"no certificate in {config.ca_file}")
    return ssl.trustRootFromCertificates(certificates)


def _is_ip(host: str) -> int:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return 0


@implementer(ICredentialsChecker)
class LdapChecker:
    """Checks ``IUsernamePassword`` against the directory at ``url``; fires with the user name as given."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, url: LdapUrl, config: LdapConfig, *, reactor: Any, clock: IReactorTime | None = None):
        self._url = url
        self._config = config
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._timeout = config.timeout / 1000.0
        self._tls = ssl.optionsForClientTLS(url.host, _trust(config)) if url.tls or config.start_tls else None
        self._service: LDAPClient | None = None

    def close(self) -> None:
        """Close the service connection (the next check would open another)."""
        client, self._service = self._service, None
        if client is not None and client.connected:
            client.unbind()

    @property
    def service_connected(self) -> bool:
        """Whether a service connection is open (for tests and diagnostics)."""
        return self._service is not None and bool(self._service.connected)

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[str]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._check(credentials.username, credentials.password))

    async def _check(self, raw_user: bytes | str, raw_password: bytes | str) -> str:
        username = raw_user if isinstance(raw_user, str) else raw_user.decode("utf-8")
        password = raw_password if isinstance(raw_password, bytes) else raw_password.encode("utf-8")
        if not password:
            raise UnauthorizedLogin()
        try:
            dn = await self._user_dn(username)
            if dn is None:
                raise UnauthorizedLogin()
            await self._bind_as(dn, password)
        except (UnauthorizedLogin, CancelledError):
            raise
        except ProviderUnavailable as e:
            raise ProviderUnavailable(f"LDAP directory {self._where()}: {e}") from None
        except Exception as e:  # noqa: BLE001 (any other breakage is an outage, never a refusal)
            raise ProviderUnavailable(f"LDAP directory {self._where()}: {type(e).__name__}: {e}") from None
        return username

    def _where(self) -> str:
        return f"{self._url.scheme}://{self._url.host}:{self._url.port}"

    async def _user_dn(self, username: str) -> str | None:
        if self._config.user_dn is not None:
            return self._config.user_dn.replace(USER_PLACEHOLDER, escape_dn_value(username))
        text = self._config.user_filter.replace(USER_PLACEHOLDER, escape_filter_value(username))
        request = pureldap.LDAPSearchRequest(
            baseObject=self._url.base_dn,
            scope=pureldap.LDAP_SCOPE_wholeSubtree,
            derefAliases=pureldap.LDAP_DEREF_neverDerefAliases,
            sizeLimit=2,
            timeLimit=max(1, int(self._timeout)),
            typesOnly=True,
            filter=ldapfilter.parseFilter(text),
            attributes=["1.1"],
        )
        client, reused = await self._service_client()
        try:
            entries = await self._bounded(self._search(client, request))
        except (CancelledError, ProviderUnavailable):
            self._drop_service(client)
            raise
        except Exception:
            # A kept connection the directory closed while idle (its idle timeout, a firewall): one more
            # try on a new one, so such a close costs the client nothing.
            self._drop_service(client)
            if not reused:
                raise
            client, _ = await self._service_client()
            try:
                entries = await self._bounded(self._search(client, request))
            except Exception:
                self._drop_service(client)
                raise
        if len(entries) != 1:
            if len(entries) > 1:
                log.warn("LDAP: the user filter matches several entries for {user!r}", user=username[:256])
            return None
        return entries[0]

    def _search(self, client: LDAPClient, request: Any) -> Deferred[list[str]]:
        done: Deferred[list[str]] = Deferred()
        entries: list[str] = []

        def handle(response: Any) -> bool:
            if isinstance(response, pureldap.LDAPSearchResultEntry):
                name = response.objectName
                entries.append(name.decode("utf-8") if isinstance(name, bytes) else str(name))
                return False
            if isinstance(response, pureldap.LDAPSearchResultDone):
                code = response.resultCode
                if code in (SUCCESS, NO_SUCH_OBJECT) or (code == 4 and len(entries) > 1):
                    done.callback(entries)  # 4: sizeLimitExceeded, more than one match
                else:
                    done.errback(ProviderUnavailable(f"search failed with result code {code}"))
                return True
            return False  # references: not followed

        sent = client.send_multiResponse(request, handle)
        # The connection's loss fails the operation's Deferred (not the handler): pass that on.
        sent.addErrback(lambda f: None if done.called else done.errback(f))
        return done

    async def _bind_as(self, dn: str, password: bytes) -> None:
        client = await self._connect()
        try:
            response = await self._bounded(client.send(pureldap.LDAPBindRequest(dn=dn, auth=password)))
        finally:
            if client.connected:
                client.transport.loseConnection()
        code = response.resultCode
        if code in REFUSED_CODES:
            raise UnauthorizedLogin()
        if code != SUCCESS:
            raise ProviderUnavailable(f"bind failed with result code {code}")

    async def _service_client(self) -> tuple[LDAPClient, bool]:
        """The service connection, and whether it was kept from an earlier check."""
        client = self._service
        if client is not None and client.connected:
            return client, True
        self._service = None
        client = await self._connect()
        if self._config.bind_dn is not None:
            password = (self._config.bind_password or "").encode("utf-8")
            try:
                response = await self._bounded(
                    client.send(pureldap.LDAPBindRequest(dn=self._config.bind_dn, auth=password))
                )
            except Exception:
                self._drop_service(client)
                raise
            if response.resultCode != SUCCESS:
                self._drop_service(client)
                # A refused service account is a configuration problem: the user can only retry later.
                raise ProviderUnavailable(f"bindDn refused with result code {response.resultCode}")
        self._service = client
        return client, False

    def _drop_service(self, client: LDAPClient) -> None:
        if self._service is client:
            self._service = None
        if client.connected:
            client.transport.abortConnection()

    async def _connect(self) -> LDAPClient:
        host, port = self._url.host, self._url.port
        version = _is_ip(host)
        endpoint: Any
        if version == 4:
            endpoint = TCP4ClientEndpoint(self._reactor, host, port, timeout=self._timeout)
        elif version == 6:
            endpoint = TCP6ClientEndpoint(self._reactor, host, port, timeout=self._timeout)
        else:
            endpoint = HostnameEndpoint(self._reactor, host, port, timeout=self._timeout)
        if self._tls is not None and self._url.tls:
            endpoint = wrapClientTLS(self._tls, endpoint)
        client: LDAPClient = await self._bounded(connectProtocol(endpoint, LDAPClient()))
        if self._config.start_tls and not self._url.tls:
            try:
                await self._bounded(client.startTLS(self._tls))
            except Exception:
                client.transport.abortConnection()
                raise
        return client

    async def _bounded(self, d: Any) -> Any:
        if not isinstance(d, Deferred):
            d = Deferred.fromCoroutine(d)
        d.addTimeout(self._timeout, self._clock)
        try:
            return await d
        except TimeoutError:
            raise ProviderUnavailable(f"no answer within {self._timeout:g}s") from None

"""One ACME account speaking RFC 8555 with certbot's ``acme`` package: obtain a certificate by HTTP-01 or
DNS-01.

``acme`` (and the ``requests`` session under it) blocks, so every network call runs in a thread pool
(``deferToThreadPool``); what touches shared state -- the :class:`ChallengeResponder` the port-80 listener
reads -- and every wait between polls happen on the reactor, so a stopping router is never held up by a
``time.sleep`` in a worker thread. The JWS signing, nonces and problem documents are the library's: no
hand-written JOSE here.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import josepy as jose
import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from dcrouter.acme.challenges import ChallengeResponder, Dns01Responder
from dcrouter.log import logger
from dcrouter.net.reactor import IRouterReactor

log = logger(__name__)

_T = TypeVar("_T")

#: Seconds one order may take from "answer the challenges" to "certificate downloaded" before it is
#: abandoned (and retried later by the service). Let's Encrypt validates in seconds; this bounds a stuck one.
ORDER_TIMEOUT = 120.0

#: Seconds between polls of a pending authorization (RFC 8555 §7.5.1 leaves the pace to the client).
POLL_INTERVAL = 1.0

#: Seconds one HTTP request to the ACME server may take.
REQUEST_TIMEOUT = 30

USER_AGENT = "dcrouter (acme-python)"


class AcmeError(Exception):
    """An order failed; the message says which names and why (the CA's problem document when it gave one)."""


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate the CA issued: the leaf, the rest of the chain, and the new private key (all PEM)."""

    cert_pem: bytes
    chain_pem: bytes
    key_pem: bytes


def generate_key_pem() -> bytes:
    """A new P-256 private key as unencrypted PKCS#8 PEM. P-256 rather than RSA: generated in a millisecond
    (on the reactor thread, if need be) and accepted by every ACME CA and TLS client we care about."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def split_fullchain(fullchain_pem: str | bytes) -> tuple[bytes, bytes]:
    """``(leaf PEM, chain PEM)`` of a PEM bundle whose first certificate is the leaf (RFC 8555 §7.4.2)."""
    data = fullchain_pem.encode("ascii") if isinstance(fullchain_pem, str) else fullchain_pem
    certificates = x509.load_pem_x509_certificates(data)
    if not certificates:
        raise AcmeError("the CA returned no certificate")
    pems = [c.public_bytes(serialization.Encoding.PEM) for c in certificates]
    return pems[0], b"".join(pems[1:])


def _problem(error: BaseException) -> str:
    """A one-line reason from an ``acme`` exception (ValidationError carries the failed challenges)."""
    if isinstance(error, errors.ValidationError):
        reasons = [
            f"{authzr.body.identifier.value}: {challb.error}"
            for authzr in error.failed_authzrs
            for challb in authzr.body.challenges
            if challb.error is not None
        ]
        return "; ".join(reasons) or "validation failed"
    return str(error) or type(error).__name__


class AcmeAccount:
    """An ACME account (``account_key_pem``, registered on first use) at ``directory_url``.

    ``responder`` serves the HTTP-01 key authorizations while an order is validated; with ``challenge``
    ``"dns-01"``, ``dns_responder`` publishes the DNS-01 TXT values instead. ``ca_bundle`` is a
    PEM file of CAs to trust for the directory's HTTPS instead of the system's (a private CA, or pebble in
    tests). Blocking calls go to ``threadpool``, which the caller starts and stops.
    """

    def __init__(
        self,
        *,
        directory_url: str,
        account_key_pem: bytes,
        email: str | None,
        responder: ChallengeResponder,
        reactor: IRouterReactor,
        threadpool: ThreadPool,
        ca_bundle: str | None = None,
        challenge: str = "http-01",
        dns_responder: Dns01Responder | None = None,
    ) -> None:
        if challenge == "dns-01" and dns_responder is None:
            raise ValueError("DNS-01 needs a Dns01Responder (the router's DNS server)")
        self.challenge = challenge
        self._dns_responder = dns_responder
        self.directory_url = directory_url
        self._email = email
        self._responder = responder
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        self._threadpool = threadpool
        key = serialization.load_pem_private_key(account_key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the ACME account key must be an EC (P-256) key")
        self._jwk = jose.JWKEC(key=key)
        self._ca_bundle = ca_bundle
        self._client: client.ClientV2 | None = None

    def _in_thread(self, function: Callable[..., _T], *args: Any) -> Any:
        return deferToThreadPool(self._reactor, self._threadpool, function, *args)

    # -- blocking parts (worker thread) -------------------------------------------------------------------

    def _connect(self) -> client.ClientV2:
        """Fetch the directory and register the account, or find it when the key is already registered."""
        net = client.ClientNetwork(
            self._jwk,
            alg=jose.ES256,
            # requests takes a CA bundle path where acme's annotation says bool; True means the system CAs.
            verify_ssl=self._ca_bundle or True,  # type: ignore[arg-type]
            user_agent=USER_AGENT,
            timeout=REQUEST_TIMEOUT,
        )
        directory = client.ClientV2.get_directory(self.directory_url, net)
        acme = client.ClientV2(directory, net=net)
        registration = messages.NewRegistration.from_data(email=self._email, terms_of_service_agreed=True)
        try:
            acme.new_account(registration)
            log.info("ACME: registered a new account at {directory}", directory=self.directory_url)
        except errors.ConflictError as conflict:
            # The key is known to the CA already (a restart): carry on with that account.
            existing = messages.RegistrationResource(uri=conflict.location, body=messages.Registration())
            acme.query_registration(existing)
        return acme

    # -- the flow (reactor) -------------------------------------------------------------------------------

    async def _acme(self) -> client.ClientV2:
        if self._client is None:
            self._client = await self._in_thread(self._connect)
        return self._client

    async def issue(self, names: Sequence[str]) -> IssuedCertificate:
        """Order a certificate for ``names`` (the first is the subject), prove control of each by HTTP-01
        through the responder, and download the certificate with a freshly generated key.

        :raises AcmeError: the CA refused or validation failed; the message names the reason.
        """
        try:
            return await self._issue(list(names))
        except AcmeError:
            raise
        except (errors.Error, requests.RequestException, ValueError) as error:
            # Start from the directory next time: the CA may have forgotten the account (its state was reset)
            # or the connection may have been the problem.
            self._forget_client()
            raise AcmeError(f"{', '.join(names)}: {_problem(error)}") from error

    def _forget_client(self) -> None:
        """Drop the client and close its HTTP session's pooled connections (requests keeps them open)."""
        if self._client is not None:
            self._client.net.session.close()
            self._client = None

    def close(self) -> None:
        """Release the connections to the CA; the next order connects afresh. Called at stop."""
        self._forget_client()

    async def _issue(self, names: list[str]) -> IssuedCertificate:
        acme = await self._acme()
        key_pem = generate_key_pem()
        csr_pem = crypto_util.make_csr(key_pem, names)
        order: messages.OrderResource = await self._in_thread(acme.new_order, csr_pem)
        deadline = self._clock.seconds() + ORDER_TIMEOUT
        cleanups: list[Callable[[], None]] = []
        try:
            for authzr in order.authorizations:
                if authzr.body.status == messages.STATUS_VALID:
                    continue  # validated recently (CAs reuse authorizations for a while)
                await self._answer(acme, authzr, cleanups)
            for authzr in order.authorizations:
                await self._wait_valid(acme, authzr, deadline)
        finally:
            for cleanup in cleanups:
                cleanup()
        finalize_by = datetime.datetime.now() + datetime.timedelta(
            seconds=max(1.0, deadline - self._clock.seconds())
        )
        done: messages.OrderResource = await self._in_thread(acme.finalize_order, order, finalize_by)
        if not done.fullchain_pem:
            raise AcmeError(f"{', '.join(names)}: the order completed without a certificate")
        cert_pem, chain_pem = split_fullchain(done.fullchain_pem)
        return IssuedCertificate(cert_pem=cert_pem, chain_pem=chain_pem, key_pem=key_pem)

    async def _answer(
        self,
        acme: client.ClientV2,
        authzr: messages.AuthorizationResource,
        cleanups: list[Callable[[], None]],
    ) -> None:
        """Serve the key authorization of ``authzr`` (HTTP-01 body or DNS-01 TXT value) and tell the CA to
        validate it; ``cleanups`` gets what withdraws it."""
        name = authzr.body.identifier.value
        kind = challenges.DNS01 if self.challenge == "dns-01" else challenges.HTTP01
        challenge = next((c for c in authzr.body.challenges if isinstance(c.chall, kind)), None)
        if challenge is None:
            raise AcmeError(f"{name}: the CA offers no {self.challenge} challenge")
        response, validation = challenge.response_and_validation(self._jwk)
        # Served before the CA is asked to look, or its first look could miss it.
        if isinstance(challenge.chall, challenges.DNS01):
            assert self._dns_responder is not None
            dns_responder = self._dns_responder
            # For a wildcard the identifier is the base name (RFC 8555 §7.1.3): same TXT name.
            txt_name = challenge.chall.validation_domain_name(name)
            dns_responder.add(txt_name, validation)
            cleanups.append(lambda: dns_responder.remove(txt_name, validation))
        else:
            token = challenge.chall.encode("token")
            self._responder.add(token, validation)
            cleanups.append(lambda: self._responder.remove(token))
        await self._in_thread(acme.answer_challenge, challenge, response)

    async def _wait_valid(
        self, acme: client.ClientV2, authzr: messages.AuthorizationResource, deadline: float
    ) -> None:
        """Poll ``authzr`` until it is settled; raise unless it became valid."""
        name = authzr.body.identifier.value
        while True:
            updated, _ = await self._in_thread(acme.poll, authzr)
            status = updated.body.status
            if status == messages.STATUS_VALID:
                return
            if status not in (messages.STATUS_PENDING, messages.STATUS_PROCESSING):
                reasons = [str(c.error) for c in updated.body.challenges if c.error is not None]
                raise AcmeError(f"{name}: authorization {status}: {'; '.join(reasons) or 'no reason given'}")
            if self._clock.seconds() >= deadline:
                raise AcmeError(f"{name}: not validated within {ORDER_TIMEOUT:.0f}s")
            # The wait is on the reactor, not a sleeping worker thread.
            await deferLater(self._clock, POLL_INTERVAL, lambda: None)

"""TLS termination of a routed connection, and TLS towards backends of ``terminate-and-reencrypt`` routes.

The session has already read the client's ClientHello (to route by SNI) when it decides to terminate, so
the TLS server cannot start from a fresh socket: :func:`terminate_tls` wraps the session's transport in a
:class:`~twisted.protocols.tls.TLSMemoryBIOProtocol` built on the certificate store's connection creator
(which picks the certificate for the SNI name in pyOpenSSL's servername callback) and replays the peeked
bytes into it. From then on the session passes every byte it reads to the returned protocol, whose
application protocol (the HTTP forwarder) sees plaintext.

Both sides follow the router's TLS policy (:mod:`dcrouter.net.tls`): towards clients the route's
``tlsProfile``, towards backends ``intermediate``.

Towards the backend (``terminate-and-reencrypt``) the certificate is **not verified**: backends behind a
proxy commonly carry self-signed or internal certificates, and the hop is inside the operator's network.
The backend is sent the client's SNI name so that virtual hosts there still select by name.
"""

from __future__ import annotations

from typing import Any
from typing import Protocol as TypingProtocol

from OpenSSL import SSL
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocol,
)
from twisted.internet.protocol import Factory
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from dcrouter.net.tls import INTERMEDIATE, TlsPolicy, client_options

#: The only application protocol the terminating side speaks (offered by ALPN so clients do not pick h2).
ALPN = (b"http/1.1",)


class ServerCreatorSource(TypingProtocol):
    """What termination needs of :class:`dcrouter.net.certstore.CertificateStore`."""

    def server_options(
        self, *, policy: TlsPolicy = INTERMEDIATE, alpn: tuple[bytes, ...] = ()
    ) -> IOpenSSLServerConnectionCreator: ...


def terminate_tls(
    transport: Any, creator: IOpenSSLServerConnectionCreator, application: IProtocol, replay: bytes
) -> TLSMemoryBIOProtocol:
    """Start a TLS server on ``transport`` (already connected, paused or not) for ``application``, feeding
    it ``replay`` — the bytes already read from the client, ClientHello first. The caller must pass every
    later byte to the returned protocol's ``dataReceived`` and the connection's loss to its
    ``connectionLost``."""
    # The wrapped factory is never asked for a protocol: the application protocol is given.
    factory = TLSMemoryBIOFactory(creator, False, Factory())
    tls = TLSMemoryBIOProtocol(factory, application)
    tls.makeConnection(transport)
    if replay:
        tls.dataReceived(replay)
    return tls


class BackendTls:
    """The client side of TLS towards backends: one SSL context (the ``intermediate`` policy, the peer's
    certificate not verified — see the module docstring), a connection creator per backend connection."""

    def __init__(self) -> None:
        # Not verified: CertificateOptions without a trust root leaves the context at VERIFY_NONE. No ALPN
        # offer: without one HTTP/1.1 is implied, and some servers (pyOpenSSL's without an ALPN list of their
        # own) answer an offer with an alert instead of ignoring it.
        self.context = client_options(INTERMEDIATE).getContext()

    def creator(self, server_name: str | None) -> IOpenSSLClientConnectionCreator:
        return _UnverifiedClient(self.context, server_name)


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClient:
    def __init__(self, context: SSL.Context, server_name: str | None) -> None:
        self._context = context
        self._server_name = server_name

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._server_name:
            connection.set_tlsext_host_name(self._server_name.encode("idna"))
        connection.set_connect_state()
        return connection

"""TLS termination of a routed connection, and TLS towards backends of ``terminate-and-reencrypt`` routes.

The session has already read the client's ClientHello (to route by SNI) when it decides to terminate, so
the TLS server cannot start from a fresh socket: :func:`terminate_tls` wraps the session's transport in a
:class:`~twisted.protocols.tls.TLSMemoryBIOProtocol` built on the certificate store's connection creator
(which picks the certificate for the SNI name in pyOpenSSL's servername callback) and replays the peeked
bytes into it. From then on the session passes every byte it reads to the returned protocol, whose
application protocol (the HTTP forwarder) sees plaintext.

**Ending.** Twisted's TLS layer closes the socket only once the peer has answered our close_notify with its
own, and the session's socket is half-closeable, so the client's FIN alone ends nothing: a connection the
forwarder closed while it had paused reading, or whose client answered with a FIN, stayed open for good
(CLOSE-WAIT, a file handle and a per-IP slot each). :class:`TerminatedTls` therefore makes every ending
complete: once the application closes, the client is read again (to hear its close_notify or FIN), the
client's FIN closes the socket, and whatever is still open ``close_timeout`` seconds after the close began
is aborted.

Both sides follow the router's TLS policy (:mod:`dcrouter.net.tls`): towards clients the route's
``tlsProfile``, towards backends ``intermediate``.

Towards the backend (``terminate-and-reencrypt``) the certificate is verified by default
(:meth:`BackendTls.verified`): chained to the route's ``backendCaFile`` or the system's CAs, for its
``serverName`` or the target host, which is also the SNI sent. With ``verifyBackend = false``
(:meth:`BackendTls.creator`) any certificate is taken and the backend is sent the client's SNI name, so
that virtual hosts there still select by name.
"""

from __future__ import annotations

from typing import Any
from typing import Protocol as TypingProtocol

from OpenSSL import SSL
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IReactorTime,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.log import logger
from dcrouter.net.tls import INTERMEDIATE, TlsPolicy, client_options, verified_client_options

log = logger(__name__)

#: The only application protocol the terminating side speaks (offered by ALPN so clients do not pick h2).
ALPN = (b"http/1.1",)

#: Seconds a terminated connection may take to end once it began to close (our close_notify sent, or the
#: client's received): enough for a client to read the last response and answer, not enough to matter
#: when it never does.
CLOSE_TIMEOUT = 10.0


class ServerCreatorSource(TypingProtocol):
    """What termination needs of :class:`dcrouter.net.certstore.CertificateStore`."""

    def server_options(
        self, *, policy: TlsPolicy = INTERMEDIATE, alpn: tuple[bytes, ...] = ()
    ) -> IOpenSSLServerConnectionCreator: ...


@implementer(IHalfCloseableProtocol)
class TerminatedTls(TLSMemoryBIOProtocol):
    """The TLS server side of a terminated connection, over the session's TCP transport.

    Beyond :class:`TLSMemoryBIOProtocol`, it guarantees that the connection ends (the session's
    ``connectionLost`` follows) once either side began to close:

    - :meth:`loseConnection` by the application sends close_notify and resumes reading from the client
      (the application may have paused it), so that the client's close_notify or FIN is seen: the close in
      stages of RFC 9112 §9.6, close_notify standing for the half-close;
    - :meth:`readConnectionLost` (the client's FIN, passed on by the session) closes the socket when we are
      closing already; otherwise it is passed to an application that can half-close
      (``IHalfCloseableProtocol``), and closes the connection for any other;
    - ``close_timeout`` seconds after the close began (ours, or the client's close_notify), a connection
      still open is aborted.
    """

    transport: Any  # the session's TCP transport: also a producer, and half-closeable

    def __init__(
        self,
        factory: TLSMemoryBIOFactory,
        application: IProtocol,
        *,
        clock: IReactorTime,
        close_timeout: float = CLOSE_TIMEOUT,
    ) -> None:
        super().__init__(factory, application)
        self._clock = clock
        self._close_timeout = close_timeout
        self._closing = False
        self._aborting = False
        self._peer_eof = False
        self._close_deadline: IDelayedCall | None = None

    # -- closing, our side ------------------------------------------------------------------------------

    def loseConnection(self) -> None:
        if not self.connected:
            return
        super().loseConnection()
        self._began_closing()
        if self._peer_eof:
            # Nothing more can come from the client: the socket closes once our bytes are out.
            self.transport.loseConnection()

    def abortConnection(self) -> None:
        self._aborting = True
        super().abortConnection()

    def _began_closing(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._close_deadline = self._clock.callLater(self._close_timeout, self._close_overdue)
        # The application may have paused reading (waiting for a response, a full backend): the client's
        # close_notify or FIN can only end the connection if it is read.
        if not self._aborting and not getattr(self.transport, "disconnecting", False):
            self.transport.resumeProducing()

    def _close_overdue(self) -> None:
        self._close_deadline = None
        log.info(
            "proxy: {peer}: TLS close not completed within {timeout:g}s; connection aborted",
            peer=_peer_host(self.transport),
            timeout=self._close_timeout,
        )
        self.transport.abortConnection()

    # -- events from the client -------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        # The client's close_notify makes the TLS layer answer and close the socket by itself; that close
        # still waits for our unsent bytes, which a client that stopped reading never takes.
        if not self._closing and getattr(self.transport, "disconnecting", False):
            self._began_closing()

    def readConnectionLost(self) -> None:
        """The client sent FIN: no TLS record can follow."""
        self._peer_eof = True
        if self._closing:
            self.transport.loseConnection()
            return
        application = self.wrappedProtocol
        if IHalfCloseableProtocol.providedBy(application):
            application.readConnectionLost()  # an application that closes in answer closes the socket
        else:
            self.loseConnection()

    def writeConnectionLost(self) -> None:
        """Not called: the session's transport reports its own write side to the session."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._close_deadline is not None and self._close_deadline.active():
            self._close_deadline.cancel()
        self._close_deadline = None
        super().connectionLost(reason)


def _peer_host(transport: Any) -> str:
    peer = transport.getPeer()
    return str(getattr(peer, "host", peer))


def terminate_tls(
    transport: Any,
    creator: IOpenSSLServerConnectionCreator,
    application: IProtocol,
    replay: bytes,
    *,
    clock: IReactorTime,
    close_timeout: float = CLOSE_TIMEOUT,
) -> TerminatedTls:
    """Start a TLS server on ``transport`` (already connected, paused or not) for ``application``, feeding
    it ``replay`` — the bytes already read from the client, ClientHello first. The caller must pass every
    later byte to the returned protocol's ``dataReceived``, the client's EOF to its ``readConnectionLost``
    and the connection's loss to its ``connectionLost``. ``clock`` times the end (``close_timeout``)."""
    # The wrapped factory is never asked for a protocol: the application protocol is given.
    factory = TLSMemoryBIOFactory(creator, False, Factory(), clock=clock)
    tls = TerminatedTls(factory, application, clock=clock, close_timeout=close_timeout)
    tls.makeConnection(transport)
    if replay:
        tls.dataReceived(replay)
    return tls


class BackendTls:
    """The client side of TLS towards backends, under the ``intermediate`` policy: verifying creators by
    backend name and CA file, or one unverified SSL context (see the module docstring)."""

    def __init__(self) -> None:
        # Not verified: CertificateOptions without a trust root leaves the context at VERIFY_NONE. No ALPN
        # offer: without one HTTP/1.1 is implied, and some servers (pyOpenSSL's without an ALPN list of their
        # own) answer an offer with an alert instead of ignoring it.
        self.context = client_options(INTERMEDIATE).getContext()

        # (host name, CA file) -> a verifying creator: each holds its own SSL context, so one per pair
        self._verified: dict[tuple[str, str | None], IOpenSSLClientConnectionCreator] = {}

    def creator(self, server_name: str | None) -> IOpenSSLClientConnectionCreator:
        """Unverified (``verifyBackend = false``), sending ``server_name`` by SNI."""
        return _UnverifiedClient(self.context, server_name)

    def verified(self, host_name: str, ca_file: str | None) -> IOpenSSLClientConnectionCreator:
        """Verifying the backend's certificate for ``host_name`` (also sent by SNI unless an IP address)
        against the CA certificates of ``ca_file`` (PEM), or the system's trust store when None. The file is
        read the first time a pair is asked for (a small file: once per backend name per run)."""
        key = (host_name, ca_file)
        creator = self._verified.get(key)
        if creator is None:
            from twisted.internet import ssl

            if ca_file is None:
                root = ssl.platformTrust()
            else:
                from cryptography import x509
                from cryptography.hazmat.primitives.serialization import Encoding

                with open(ca_file, "rb") as handle:
                    found = x509.load_pem_x509_certificates(handle.read())
                root = ssl.trustRootFromCertificates(
                    [ssl.Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in found]
                )
            creator = self._verified[key] = verified_client_options(INTERMEDIATE, host_name, root)
        return creator


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

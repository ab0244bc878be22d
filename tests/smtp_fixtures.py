"""Shared pieces for the ESMTP server protocol tests: a configuration, a queue whose answers the test
controls, a server wired to a StringTransport and a Clock, and an in-memory transport able to run a real
STARTTLS."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import weakref
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.test.iosim import FakeTransport
from zope.interface import directlyProvides, implementer

from dcrouter.config.auth import AuthConfig
from dcrouter.config.domains import DomainConfig
from dcrouter.config.smtp import SmtpConfig
from dcrouter.interfaces import IDeliveryQueue
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.processing.processor import EmailProcessor
from dcrouter.queue.contract import ItemPage
from dcrouter.queue.item import QueueItem, QueueItemStatus
from dcrouter.smtp.auth import Authenticator, MailUserRealm
from dcrouter.smtp.policy import SessionPolicy
from dcrouter.smtp.protocol import ESMTPServerFactory, ESMTPServerProtocol

HOSTNAME = "mx.example.test"
PEER_IP = "192.0.2.10"
#: The Clock starts here so Received dates are fixed: Tue, 14 Nov 2023 22:13:20 +0000.
START_TIME = 1_700_000_000.0
DATE = "Tue, 14 Nov 2023 22:13:20 +0000"
GREETING = b"220 mx.example.test ESMTP dcrouter\r\n"
EHLO_PLAIN = (
    b"250-mx.example.test\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 10000\r\n"
    b"250-8BITMIME\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250 SMTPUTF8\r\n"
)
PASSWORD = "s3cret pass"


def make_config(**changes: Any) -> SmtpConfig:
    """A small configuration: example.org is ours, 10000-octet messages, short limits tests can reach."""
    base = SmtpConfig(
        ports=[25, 587, 465],
        hostname=HOSTNAME,
        max_message_size=10_000,
        domain_configs=[DomainConfig(domains=["example.org"])],
        auth=AuthConfig(failure_delay=0),
        max_recipients=3,
        max_bad_commands=5,
        max_received_headers=3,
        socket_timeout=30_000,
        data_timeout=60_000,
        connection_timeout=600_000,
    )
    return dataclasses.replace(base, **changes)


@implementer(IDeliveryQueue)
class ControlledQueue:
    """The queue collaborator: every enqueue is recorded with its body; it answers at once (``auto``) or
    with a Deferred the test fires later (``pending``)."""

    max_size = 0
    #: Ingress is given its spool directory by the factory in these tests; nothing is linked in here.
    spool_directory = tempfile.gettempdir()

    def __init__(self, auto: bool = True) -> None:
        self.auto = auto
        self.items: list[QueueItem] = []
        self.bodies: list[bytes] = []
        self.pending: list[Deferred[QueueItem]] = []

    def enqueue(self, item: QueueItem, message: SpooledMessage) -> Deferred[QueueItem]:
        with message.open() as body:
            self.bodies.append(body.read())
        message.discard()
        self.items.append(item)
        if self.auto:
            return succeed(item)
        waiting: Deferred[QueueItem] = Deferred()
        self.pending.append(waiting)
        return waiting

    def dequeue(self, item_id: str) -> Deferred[Any]:
        return succeed(None)

    def update(self, item_id: str, **changes: Any) -> Deferred[Any]:
        return succeed(None)

    def update_if(self, item_id: str, expected: Any, /, **changes: Any) -> Deferred[Any]:
        return succeed(None)

    def dequeue_if(self, item_id: str, expected: Any) -> Deferred[Any]:
        return succeed(None)

    def get_next(self, count: int = 1, schedule: Any = None) -> Deferred[list[QueueItem]]:
        return succeed([])

    def open_body(self, item_id: str) -> Deferred[Any]:
        return succeed(None)

    def get(self, item_id: str) -> Deferred[Any]:
        return succeed(None)

    def get_by_status(self, status: Any) -> Deferred[list[QueueItem]]:
        return succeed([])

    def get_by_destination(self, destination: str) -> Deferred[list[QueueItem]]:
        return succeed([])

    def get_item_count(self) -> Deferred[int]:
        return succeed(len(self.items))

    def status_summary(self) -> Deferred[dict[str, tuple[int, float | None]]]:
        return succeed({"queued": (len(self.items), None)} if self.items else {})

    def list_items(self, filter: Any, limit: int, cursor: str | None = None) -> Deferred[Any]:
        return succeed(ItemPage(list(reversed(self.items))[:limit], None))

    def count_by_status(self) -> Deferred[dict[str, int]]:
        return succeed({status.value: 0 for status in QueueItemStatus})

    def count_by_destination(self) -> Deferred[Any]:
        from dcrouter.queue.contract import destination_counts

        return succeed(destination_counts([]))

    def purge_expired(self, max_age: float) -> Deferred[int]:
        return succeed(0)

    def purge_all(self) -> Deferred[int]:
        return succeed(0)

    def load(self) -> Deferred[dict[str, int]]:
        return succeed({})

    def save(self) -> Deferred[None]:
        return succeed(None)

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def is_processing(self) -> bool:
        return True


def make_authenticator(config: SmtpConfig, clock: Clock) -> Authenticator:
    """The real Authenticator over an in-memory portal (user ``alice``), so checks answer synchronously."""
    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=PASSWORD.encode())
    return Authenticator(config.auth, clock=clock, portal=Portal(MailUserRealm(), [checker]))


@dataclasses.dataclass
class Server:
    """A server protocol on a StringTransport with its collaborators; ``exchange`` sends and returns the reply
    bytes written since the last call."""

    protocol: ESMTPServerProtocol
    transport: StringTransport
    clock: Clock
    queue: ControlledQueue
    factory: ESMTPServerFactory

    def exchange(self, data: bytes) -> bytes:
        self.protocol.dataReceived(data)
        return self.take()

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out


def make_factory(
    config: SmtpConfig | None = None,
    *,
    port: int = 25,
    queue: ControlledQueue | None = None,
    clock: Clock | None = None,
    policy: Any = None,
    authenticator: Any = "default",
    tls_options: Any = None,
    sessions: Any = None,
    events: Any = None,
) -> ESMTPServerFactory:
    """A factory on ``port`` with the test collaborators; ``sessions`` is an OpenSessions registry to share
    (by default the factory makes its own); ``events``: an EventBus for the session and the processor."""
    config = config or make_config()
    clock = clock or _clock()
    if authenticator == "default":
        authenticator = make_authenticator(config, clock)
    spool_directory = tempfile.mkdtemp(prefix="dcrouter-spool-")
    factory = ESMTPServerFactory(
        config=config,
        port=port,
        policy=policy or SessionPolicy(config),
        authenticator=authenticator,
        acceptor=EmailProcessor(
            queue or ControlledQueue(), clock.seconds, **({"events": events} if events else {})
        ),
        spool_directory=spool_directory,
        tls_options=tls_options,
        clock=clock,
        sessions=sessions,
        **({"events": events} if events is not None else {}),
    )
    # No test case is at hand to clean up after: the directory goes when the factory does (or at exit).
    weakref.finalize(factory, shutil.rmtree, spool_directory, ignore_errors=True)
    return factory


def _clock() -> Clock:
    clock = Clock()
    clock.advance(START_TIME)
    return clock


class BufferingTransport(StringTransport):
    """A StringTransport that pushes back as a TCP transport does (``FileDescriptor``): once more than
    ``buffer_size`` written bytes wait unread, the registered producer is paused; :meth:`drain` (the client
    reading) empties the buffer and resumes it."""

    def __init__(self, *args: Any, buffer_size: int = 64 * 1024, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buffer_size = buffer_size
        self.output_paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if (
            len(self.io.getvalue()) > self.buffer_size
            and self.producer is not None
            and not self.output_paused
        ):
            self.output_paused = True
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        out = self.value()
        self.clear()
        if self.output_paused and self.producer is not None:
            self.output_paused = False
            self.producer.resumeProducing()
        return out


def connect(
    config: SmtpConfig | None = None,
    *,
    greet: bool = True,
    peer: str = PEER_IP,
    transport_class: type[StringTransport] = StringTransport,
    **kwargs: Any,
) -> Server:
    """A connected server; the greeting is consumed unless ``greet`` is False."""
    queue = kwargs.pop("queue", None) or ControlledQueue()
    clock = kwargs.pop("clock", None) or _clock()
    factory = make_factory(config, queue=queue, clock=clock, **kwargs)
    protocol = factory.buildProtocol(IPv4Address("TCP", peer, 40000))
    transport = transport_class(
        hostAddress=IPv4Address("TCP", "127.0.0.1", factory.port), peerAddress=IPv4Address("TCP", peer, 40000)
    )
    protocol.makeConnection(transport)
    # ``factory``: the session's own copy (taken at connect, as a reload needs), so a test that sets a
    # collaborator on it after connecting (a spool writer, an authenticator) reaches this session.
    server = Server(protocol, transport, clock, queue, protocol._f)
    if greet:
        server.take()
    return server


class StartTLSFakeTransport(FakeTransport):
    """An iosim transport whose ``startTLS`` inserts a real ``TLSMemoryBIOProtocol`` between the wire and the
    protocol, the way a TCP transport does: bytes after the switch are TLS records, encrypted for real."""

    def __init__(self, protocol: Any, isServer: bool, **kwargs: Any) -> None:
        super().__init__(protocol, isServer, **kwargs)
        self._tls_protocol: Any = None

    def startTLS(self, contextFactory: Any, beNormal: bool = True) -> None:
        tls_factory = TLSMemoryBIOFactory(contextFactory, not self.isServer, None)
        # The unbuffered class: its writes need no reactor turn to reach the wire.
        tls_protocol = TLSMemoryBIOProtocol(tls_factory, self.protocol, False)
        self._tls_protocol = tls_protocol
        self.protocol = tls_protocol
        self.getHandle = tls_protocol.getHandle
        directlyProvides(self, ISSLTransport)
        tls_protocol.makeConnection(_RawSide(self))

    def write(self, data: bytes) -> None:
        if self._tls_protocol is not None:
            self._tls_protocol.write(data)
        else:
            super().write(data)

    def raw_write(self, data: bytes) -> None:
        super().write(data)

    def loseConnection(self) -> None:
        if self._tls_protocol is not None and not self.disconnecting:
            self._tls_protocol.loseConnection()
        else:
            super().loseConnection()


class _RawSide:
    """What the TLS layer of a StartTLSFakeTransport writes to: the wire below it."""

    def __init__(self, transport: StartTLSFakeTransport) -> None:
        self._transport = transport

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        self._transport.raw_write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self._transport.raw_write(b"".join(data))

    def loseConnection(self) -> None:
        FakeTransport.loseConnection(self._transport)

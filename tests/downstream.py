"""A scripted downstream SMTP server for delivery tests: answers what the test's :class:`Script` says, and
records every envelope and the exact message bytes it received. It listens on 127.0.0.1 (port 0) for
integration tests (:func:`start_downstream`), or sits in a :class:`MemoryNetwork` for unit tests, which never
touch the network.

Usage::

    downstream = start_downstream(Script(rcpt={"bad@example.test": "550 5.1.1 No such user"}))
    ...deliver to 127.0.0.1:downstream.port...
    self.addCleanup(downstream.stop)
    [message] = downstream.messages
    message.mail_from, message.recipients, message.data  # data: unstuffed, CRLF line ends, no final "."

Replies are scripted as a string (always that reply) or a list of strings (one per use, in order, counted
over the whole server, the last one repeating): "451 then 250" is ``data=["451 4.3.0 Later", "250 Ok"]``.
It is deliberately small and strict rather than a full MTA: it speaks just enough ESMTP (EHLO, HELO,
STARTTLS, AUTH PLAIN, MAIL, RCPT, DATA, RSET, NOOP, QUIT) for a client to be tested against real sockets.
"""

from __future__ import annotations

import base64
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connect

from tests.smtp_fixtures import StartTLSFakeTransport

Scripted = str | list[str]

#: Stages a server can stop answering at (``Script.hang``): it reads on but never replies from there on.
HANG_STAGES = ("greeting", "EHLO", "MAIL", "RCPT", "DATA", "end-of-data")


@dataclass
class Script:
    """What the downstream answers. Defaults accept everything."""

    greeting: Scripted = "220 downstream.test ESMTP scripted"
    #: EHLO keywords after the first line; STARTTLS and AUTH are added from ``tls``/``users``.
    extensions: list[str] = field(
        default_factory=lambda: ["PIPELINING", "SIZE 10000000", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"]
    )
    #: Offer STARTTLS with these options (``dcrouter.net.certfiles.server_tls_options``); None: no STARTTLS.
    tls: CertificateOptions | None = None
    #: Offer AUTH PLAIN and accept these user → password pairs; None: no AUTH.
    users: dict[str, str] | None = None
    mail: Scripted = "250 2.1.0 Ok"
    #: Per recipient address; recipients not named get ``rcpt_default``.
    rcpt: dict[str, Scripted] = field(default_factory=dict)
    rcpt_default: Scripted = "250 2.1.5 Ok"
    #: The reply to the DATA command itself (354 to go on).
    data_command: Scripted = "354 End data with <CR><LF>.<CR><LF>"
    #: The reply after the final ".".
    data: Scripted = "250 2.0.0 Ok: queued"
    #: Stop answering from this stage on (one of HANG_STAGES); the connection stays open.
    hang: str | None = None

    def __post_init__(self) -> None:
        if self.hang is not None and self.hang not in HANG_STAGES:
            raise ValueError(f"hang must be one of {HANG_STAGES}")


@dataclass
class ReceivedMessage:
    """One completed transaction, whatever the final reply was (``reply`` says)."""

    mail_from: str
    recipients: list[str]
    #: The message as the client meant it: dot-unstuffed, exactly as sent otherwise.
    data: bytes
    #: The bytes on the wire between the 354 and the end-of-data line, still dot-stuffed.
    raw: bytes
    reply: str
    tls: bool
    auth_user: str | None
    #: Index of the connection it arrived on (0 for the first connection the server accepted).
    connection: int


@dataclass
class Connection:
    """One accepted connection: every command line it sent (AUTH arguments are not kept), in order."""

    index: int
    commands: list[str] = field(default_factory=list)
    tls: bool = False
    closed: bool = False


class Downstream:
    """A listening scripted server. ``messages`` and ``connections`` grow as clients talk to it."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.messages: list[ReceivedMessage] = []
        self.connections: list[Connection] = []
        self.port = 0
        self._listening: IListeningPort | None = None
        self._protocols: list[_ScriptedSMTP] = []
        self._uses: dict[str, int] = {}
        self._message_waiters: list[tuple[int, Deferred[list[ReceivedMessage]]]] = []

    def wait_for_messages(self, count: int) -> Deferred[list[ReceivedMessage]]:
        """Fires with ``messages`` once at least ``count`` transactions have completed (at once if they
        have). Bound it with ``addTimeout``."""
        waiter: Deferred[list[ReceivedMessage]] = Deferred()
        if len(self.messages) >= count:
            waiter.callback(list(self.messages))
        else:
            self._message_waiters.append((count, waiter))
        return waiter

    def _notify_message_waiters(self) -> None:
        ready = [(n, d) for n, d in self._message_waiters if len(self.messages) >= n]
        self._message_waiters = [(n, d) for n, d in self._message_waiters if len(self.messages) < n]
        for _, waiter in ready:
            waiter.callback(list(self.messages))

    def reply(self, key: str, scripted: Scripted) -> str:
        """The next reply of a scripted entry (lists advance per use, the last one repeating)."""
        if isinstance(scripted, str):
            return scripted
        used = self._uses.get(key, 0)
        self._uses[key] = used + 1
        return scripted[min(used, len(scripted) - 1)]

    def commands(self) -> list[str]:
        """Every command line of every connection, in connection order."""
        return [line for connection in self.connections for line in connection.commands]

    def disconnect(self) -> None:
        """Close every open connection from the server side (as a server does to idle clients)."""
        for protocol in list(self._protocols):
            if protocol.transport is not None:
                protocol.transport.loseConnection()

    def stop(self) -> Deferred[None]:
        """Stop listening and drop every open connection. The Deferred fires when the port is closed."""
        for protocol in list(self._protocols):
            if protocol.transport is not None:
                protocol.transport.abortConnection()  # type: ignore[attr-defined]
        if self._listening is None:
            return succeed(None)
        listening, self._listening = self._listening, None
        stopped = listening.stopListening()
        return stopped if isinstance(stopped, Deferred) else succeed(None)


def start_downstream(
    script: Script | None = None, *, interface: str = "127.0.0.1", port: int = 0, reactor: Any = None
) -> Downstream:
    """Listen on ``interface`` (127.0.0.1), on a port chosen by the system unless ``port`` is given (a second
    server on 127.0.0.2 can share the first one's port, as two targets of one route must). The port is
    ``downstream.port``. Call ``stop()`` in cleanup."""
    reactor = reactor or global_reactor
    downstream = Downstream(script or Script())
    factory = Factory.forProtocol(lambda: _ScriptedSMTP(downstream))
    downstream._listening = reactor.listenTCP(port, factory, interface=interface)
    downstream.port = downstream._listening.getHost().port  # type: ignore[union-attr]
    return downstream


def closed_port(reactor: Any = None) -> Deferred[int]:
    """A port on 127.0.0.1 that was just listened on and closed: connecting to it is refused."""
    reactor = reactor or global_reactor
    listening = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    port: int = listening.getHost().port
    stopped = listening.stopListening() or succeed(None)
    return stopped.addCallback(lambda _: port)


class MemoryNetwork:
    """Scripted servers reachable through ``reactor`` (a MemoryReactor the code under test connects with),
    joined to each connection it makes by iosim, with real TLS in memory (StartTLSFakeTransport). Nothing
    moves until :meth:`flush`, which completes the pending connections (refused where no server is) and
    pumps bytes both ways, advancing ``clock`` by 0 on each turn, until nothing moves."""

    #: Turns of :meth:`flush` after which a conversation is taken to be looping.
    MAX_TURNS = 100_000

    def __init__(self, clock: Clock) -> None:
        self.reactor = MemoryReactor()
        self.clock = clock
        self._servers: dict[tuple[str, int], Downstream] = {}
        self._pumps: list[IOPump] = []
        self._ports = itertools.count(2525)
        self._client_ports = itertools.count(40000)
        self._waiters: list[tuple[Callable[[], Any], str, Deferred[None]]] = []

    def downstream(
        self, script: Script | None = None, *, address: str = "127.0.0.1", port: int | None = None
    ) -> Downstream:
        """A server at ``address`` on ``port`` (by default one no other server of this network has)."""
        downstream = Downstream(script or Script())
        downstream.port = next(self._ports) if port is None else port
        self._servers[(address, downstream.port)] = downstream
        return downstream

    def closed_port(self) -> int:
        """A port no server listens on: connecting to it is refused."""
        return next(self._ports)

    def until(self, condition: Callable[[], Any], what: str = "condition") -> Deferred[None]:
        """Fires once ``condition()`` holds, checked after every turn of :meth:`flush` (at once if it
        already holds); ``what`` names it in :meth:`waiting`."""
        waiter: Deferred[None] = Deferred()
        if condition():
            waiter.callback(None)
        else:
            self._waiters.append((condition, what, waiter))
        return waiter

    def waiting(self) -> list[str]:
        """What the :meth:`until` Deferreds still waiting for are waiting for."""
        return [what for _, what, _ in self._waiters]

    def flush(self) -> None:
        """Connect, pump and fire the waiters whose condition holds, until nothing moves."""
        for _ in range(self.MAX_TURNS):
            moved = self._connect_pending()
            for pump in self._pumps:
                moved = pump.pump() or moved
            moved = self._fire_waiters() or moved
            if not moved:
                return
        raise AssertionError(f"the network still moved after {self.MAX_TURNS} turns")

    def _connect_pending(self) -> bool:
        pending = list(zip(self.reactor.tcpClients, self.reactor.connectors, strict=True))
        self.reactor.tcpClients.clear()
        self.reactor.connectors.clear()
        for (host, port, factory, _timeout, _bind), connector in pending:
            if connector.stoppedConnecting:  # cancelled (the caller's connect timeout) before it completed
                continue
            downstream = self._servers.get((host, port))
            if downstream is None:
                factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError(host, port)))
                continue
            local = IPv4Address("TCP", "127.0.0.1", next(self._client_ports))
            remote = IPv4Address("TCP", host, port)
            client = factory.buildProtocol(remote)
            server = _ScriptedSMTP(downstream)
            self._pumps.append(
                connect(
                    server,
                    StartTLSFakeTransport(server, True, hostAddress=remote, peerAddress=local),
                    client,
                    StartTLSFakeTransport(client, False, hostAddress=local, peerAddress=remote),
                    greet=False,
                    clock=self.clock,
                )
            )
        return bool(pending)

    def _fire_waiters(self) -> bool:
        ready = [entry for entry in self._waiters if entry[0]()]
        for entry in ready:
            self._waiters.remove(entry)
            entry[2].callback(None)
        return bool(ready)


class _ScriptedSMTP(Protocol):
    def __init__(self, downstream: Downstream) -> None:
        self.downstream = downstream
        self.script = downstream.script
        self.buffer = b""
        self.in_data = False
        self.data_lines: list[bytes] = []
        self.raw: list[bytes] = []
        self.mail_from: str | None = None
        self.recipients: list[str] = []
        self.auth_user: str | None = None
        self.hung = False
        self.connection = Connection(len(downstream.connections))

    def connectionMade(self) -> None:
        self.downstream.connections.append(self.connection)
        self.downstream._protocols.append(self)
        self.send(self.downstream.reply("greeting", self.script.greeting), stage="greeting")

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.connection.closed = True
        if self in self.downstream._protocols:
            self.downstream._protocols.remove(self)

    def send(self, reply: str, *, stage: str | None = None) -> None:
        if stage is not None and stage == self.script.hang:
            self.hung = True
        if self.hung:
            return
        lines = reply.split("\n")
        code = lines[-1][:3]
        out = [f"{code}-{line[4:]}" if i < len(lines) - 1 else line for i, line in enumerate(lines)]
        self.transport.write("".join(f"{line}\r\n" for line in out).encode())  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer and self.transport is not None:
            line, self.buffer = self.buffer.split(b"\n", 1)
            line += b"\n"
            if self.in_data:
                self.data_line(line)
            else:
                self.command(line.rstrip(b"\r\n").decode("utf-8", "replace"))

    def data_line(self, line: bytes) -> None:
        if line == b".\r\n":
            self.in_data = False
            reply = self.downstream.reply("data", self.script.data)
            message = ReceivedMessage(
                mail_from=self.mail_from or "",
                recipients=list(self.recipients),
                data=b"".join(self.data_lines),
                raw=b"".join(self.raw),
                reply=reply,
                tls=self.connection.tls,
                auth_user=self.auth_user,
                connection=self.connection.index,
            )
            self.downstream.messages.append(message)
            self.reset()
            self.send(reply, stage="end-of-data")
            self.downstream._notify_message_waiters()
            return
        self.raw.append(line)
        self.data_lines.append(line[1:] if line.startswith(b".") else line)

    def reset(self) -> None:
        self.mail_from, self.recipients, self.data_lines, self.raw = None, [], [], []

    def command(self, line: str) -> None:
        verb, _, argument = line.partition(" ")
        verb = verb.upper()
        self.connection.commands.append("AUTH" if verb == "AUTH" else line)
        handler = getattr(self, f"smtp_{verb}", None)
        if handler is None:
            self.send("500 5.5.1 Command not recognized")
        else:
            handler(argument)

    def smtp_EHLO(self, argument: str) -> None:
        keywords = list(self.script.extensions)
        if self.script.tls is not None and not self.connection.tls:
            keywords.append("STARTTLS")
        if self.script.users is not None:
            keywords.append("AUTH PLAIN")
        self.reset()
        self.send("\n".join(["250 downstream.test"] + [f"250 {k}" for k in keywords]), stage="EHLO")

    def smtp_HELO(self, argument: str) -> None:
        self.reset()
        self.send("250 downstream.test", stage="EHLO")

    def smtp_STARTTLS(self, argument: str) -> None:
        if self.script.tls is None or self.connection.tls:
            self.send("502 5.5.1 STARTTLS not available")
            return
        self.send("220 2.0.0 Ready to start TLS")
        # RFC 3207 §4.2: whatever was pipelined after STARTTLS is discarded.
        self.buffer = b""
        self.transport.startTLS(self.script.tls)  # type: ignore[union-attr]
        self.connection.tls = True
        self.reset()

    def smtp_AUTH(self, argument: str) -> None:
        mechanism, _, initial = argument.partition(" ")
        if self.script.users is None or mechanism.upper() != "PLAIN" or not initial:
            self.send("504 5.5.4 Only AUTH PLAIN with an initial response")
            return
        try:
            _, user, password = base64.b64decode(initial).decode().split("\0")
        except ValueError:
            self.send("501 5.5.2 Bad AUTH PLAIN response")
            return
        if self.script.users.get(user) == password:
            self.auth_user = user
            self.send("235 2.7.0 Authentication successful")
        else:
            self.send("535 5.7.8 Authentication credentials invalid")

    def smtp_MAIL(self, argument: str) -> None:
        reply = self.downstream.reply("mail", self.script.mail)
        if reply.startswith("2"):
            self.mail_from = _path(argument)
            self.recipients = []
        self.send(reply, stage="MAIL")

    def smtp_RCPT(self, argument: str) -> None:
        recipient = _path(argument)
        scripted = self.script.rcpt.get(recipient, self.script.rcpt_default)
        reply = self.downstream.reply(f"rcpt:{recipient}", scripted)
        if reply.startswith("2"):
            self.recipients.append(recipient)
        self.send(reply, stage="RCPT")

    def smtp_DATA(self, argument: str) -> None:
        if self.mail_from is None or not self.recipients:
            self.send("554 5.5.1 No valid recipients", stage="DATA")
            return
        reply = self.downstream.reply("data_command", self.script.data_command)
        if reply.startswith("3"):
            self.in_data = True
        self.send(reply, stage="DATA")

    def smtp_RSET(self, argument: str) -> None:
        self.reset()
        self.send("250 2.0.0 Ok")

    def smtp_NOOP(self, argument: str) -> None:
        self.send("250 2.0.0 Ok")

    def smtp_QUIT(self, argument: str) -> None:
        self.send("221 2.0.0 Bye")
        self.transport.loseConnection()  # type: ignore[union-attr]


def _path(argument: str) -> str:
    """The address inside ``FROM:<...>`` / ``TO:<...>``, parameters ignored."""
    start, end = argument.find("<"), argument.find(">")
    return argument[start + 1 : end] if 0 <= start < end else ""

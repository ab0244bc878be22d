"""dcrouter's ESMTP server protocol (RFC 5321 with PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES,
SMTPUTF8, STARTTLS and AUTH), written on ``Protocol`` rather than ``twisted.mail.smtp`` (docs/decisions.md,
"Why not twisted.mail.smtp", says why; tests/test_twisted_mail_defects.py reproduces each reason).

What a caller may rely on:

- Input is framed and run as :class:`~dcrouter.smtp.framing.CommandReceiver` says: strictly one command at a
  time, in order, so replies come out in the order of the commands, even while one waits on a Deferred (a
  policy check, AUTH, queueing); pipelined input is bounded; a bare LF ends a command line (never a DATA
  line); a command line over ``maxCommandLineLength`` gets ``500 5.5.2 Line too long`` once.
- STARTTLS discards every byte received after the STARTTLS line and resets the session (RFC 3207 §4.2).
- DATA is streamed through :class:`~dcrouter.smtp.datastream.DataStream` into a
  :class:`~dcrouter.smtp.spool.SpoolWriter`; a ``Received:`` field goes first. The complete message goes to
  the factory's :class:`~dcrouter.interfaces.IMessageAcceptor` (processing and the queue behind it, of which
  this package knows nothing) as :func:`~dcrouter.smtp.transaction.hand_off` says: ``250`` only once its
  Deferred fires (the message is durable), a refusal's own reply otherwise; storage failures are 4xx.
- Every reply but the greeting, EHLO/HELO, ``354`` and ``334`` carries an RFC 3463 enhanced status code.
- Time is bounded as Postfix bounds it: a command line must be complete ``commandTimeout`` after its first
  byte; a DATA transfer must keep up ``minDataRate``; beyond ``maxJunkCommands`` NOOP, RSET, VRFY, HELP and
  repeated greetings each count as an error toward ``maxBadCommands``. With ``pregreetDelay`` a client that
  talks before the 220 is refused with ``521 5.5.1``. Every timer runs on the factory's clock.
- Rate limits (the policy's :class:`~dcrouter.interfaces.IIngressLimits`, docs/limits.md) are asked at
  connect (the greeting waits for an answer that comes later; a refusal is a ``421 4.7.0`` and the end),
  before each AUTH exchange (``421 4.7.0`` and the end), at MAIL and RCPT (their own replies), and told of
  each failed AUTH and each accepted message's size.
- A graceful stop (:meth:`ESMTPServerProtocol.shut_down`, driven by :mod:`dcrouter.smtp.service`) answers
  ``421 4.3.2`` at once when idle, otherwise after the transaction in flight (its ``250`` first).

Decisions: a message with a text line over ``maxLineLength`` is refused after its end with ``554 5.6.0``
naming the header or body line (a content problem: 554 is RFC 5321's reply to a failed transaction after
DATA, X.6 the class for message content); bare CR or LF, or NUL, in DATA is refused with ``550 5.6.0``
rather than normalised; 500 and 503 replies count toward
``maxBadCommands``; ``354`` and ``334`` carry no enhanced code (RFC 2034 defines them for 2xx/4xx/5xx only).
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IReactorTime,
    ISystemHandle,
    ITCPTransport,
    ITLSTransport,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.config.smtp import SmtpConfig
from dcrouter.events import NO_EVENTS, EventBus
from dcrouter.interfaces import IMessageAcceptor
from dcrouter.log import logger
from dcrouter.mail.acceptance import LOCAL_ERROR
from dcrouter.mail.address import AddressError, parse_mail_argument, parse_rcpt_argument
from dcrouter.mail.queueid import new_queue_id
from dcrouter.mail.reply import Reply
from dcrouter.smtp.auth import TEMPORARY_FAILURE, Authenticator, AuthFailed
from dcrouter.smtp.datastream import DataStream
from dcrouter.smtp.eager import resolve
from dcrouter.smtp.framing import CLOSED, COMMAND, DATA, PREGREET, SASL, CommandReceiver, decode_line
from dcrouter.smtp.policy import SessionPolicy
from dcrouter.smtp.sasl import Challenge, SaslError, SaslExchange
from dcrouter.smtp.service import OpenSessions
from dcrouter.smtp.session import Session
from dcrouter.smtp.spool import SpoolWriter
from dcrouter.smtp.transaction import Transaction, check_mail_params, hand_off, received_field

if TYPE_CHECKING:
    from OpenSSL import SSL

log = logger(__name__)

OK = Reply(250, "2.0.0", "Ok")
BAD_SEQUENCE_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
UNKNOWN_COMMAND = Reply(500, "5.5.1", "Error: command not recognized")
NO_ARGUMENTS = Reply(501, "5.5.4", "Syntax error: no parameters allowed")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_SUCCEEDED = Reply(235, "2.7.0", "Authentication successful")
ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
_HELP = Reply(214, "2.0.0", "Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS AUTH")

NON_SMTP_COMMAND = Reply(421, "4.7.0", "Non-SMTP command, closing connection")
#: A client that talked before the greeting (postscreen's pregreet test). 521 (RFC 7504) rather than 554: RFC
#: 5321 has a server that greets with 554 wait for QUIT, while 521 lets it close at once; postscreen agrees.
PREGREET_REFUSED = Reply(521, "5.5.1", "Protocol error: client sent data before the greeting")

#: Commands that move no mail (Postfix's smtpd_junk_command_limit; ETRN is an unknown command here).
_JUNK_VERBS = frozenset({"NOOP", "RSET", "VRFY", "HELP"})
_GREETING_VERBS = frozenset({"HELO", "EHLO"})
#: Verbs of other protocols that end the session at once (Postfix: smtpd_forbidden_commands).
_NON_SMTP_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS"})
_COUNTED_AS_BAD = frozenset({500, 503})


class ESMTPServerFactory(Factory):
    """Builds one :class:`ESMTPServerProtocol` per connection on one listening ``port``.

    ``port`` decides the role: in ``config.implicit_tls_ports`` the router wraps this factory in TLS from the
    first byte (and STARTTLS is never offered); in ``config.submission_ports`` AUTH is required before MAIL.
    ``tls_options`` enables STARTTLS elsewhere. ``clock`` drives every timer. ``sessions`` is the registry
    the router's SmtpService drains when it stops (shared by all its listeners; by default one of its own).
    """

    def __init__(
        self,
        *,
        config: SmtpConfig,
        port: int,
        policy: SessionPolicy,
        authenticator: Authenticator | None,
        acceptor: IMessageAcceptor,
        spool_directory: str,
        tls_options: CertificateOptions | None,
        clock: IReactorTime,
        sessions: OpenSessions | None = None,
        events: EventBus = NO_EVENTS,
    ) -> None:
        self.config = config
        #: Where the sessions report connections, messages and security findings (dcrouter.events).
        self.events = events
        self.port = port
        self.policy = policy
        self.authenticator = authenticator
        self.acceptor = acceptor
        self.spool_directory = spool_directory
        self.tls_options = tls_options
        self.clock = clock
        #: Every open session of the router's SMTP listeners, for a graceful stop (SmtpService).
        self.sessions = sessions if sessions is not None else OpenSessions(clock)
        self.implicit_tls = port in config.implicit_tls_ports
        self.submission = port in config.submission_ports

    #: No "Starting factory" line per port at start and stop; the router logs what listens where.
    noisy = False
    #: Makes the writer each DATA spools into, given the spool directory (tests give it a filling disk).
    spool_writer: Callable[[str], SpoolWriter] = SpoolWriter

    def buildProtocol(self, addr: Any) -> ESMTPServerProtocol:
        # The session keeps a copy of the factory as it is now: a reload (reconfigure) changes what the
        # next session gets, never the configuration of one in flight.
        # Sessions accepted between two changes share one copy (an idle session costs memory, not a factory).
        snapshot = self._snapshot
        if snapshot is None:
            snapshot = copy.copy(self)
            object.__setattr__(self, "_snapshot", snapshot)
        protocol = ESMTPServerProtocol(snapshot)
        protocol.factory = self
        return protocol

    #: The copy sessions built since the last change to this factory share; None: take a new one.
    _snapshot: ESMTPServerFactory | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        # Any change (reconfigure, a test's collaborator) is seen by the sessions accepted after it only.
        object.__setattr__(self, "_snapshot", None)
        object.__setattr__(self, name, value)

    def __copy__(self) -> ESMTPServerFactory:
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.__dict__.pop("_snapshot", None)
        return clone

    def reconfigure(
        self,
        *,
        config: SmtpConfig,
        policy: SessionPolicy,
        authenticator: Authenticator | None,
        tls_options: CertificateOptions | None,
    ) -> None:
        """What sessions accepted from now on get (a configuration reload); open sessions keep theirs."""
        self.config = config
        self.policy = policy
        self.authenticator = authenticator
        self.tls_options = tls_options
        self.submission = self.port in config.submission_ports


@implementer(IHandshakeListener)
class ESMTPServerProtocol(CommandReceiver):
    """One SMTP session. See the module docstring for its guarantees."""

    # Per-session state in slots, as CommandReceiver's (why there).
    __slots__ = (
        "_admitted",
        "_bad_commands",
        "_f",
        "_greeting_timer",
        "_junk_commands",
        "_junk_error",
        "_opened_at",
        "_sasl",
        "_session_timer",
        "_spool",
        "_stopping",
        "_tls_started",
        "_txn",
        "session",
    )

    def __init__(self, factory: ESMTPServerFactory) -> None:
        super().__init__(factory.config, factory.clock)
        self._f = factory
        self.session = Session(
            session_id=secrets.token_hex(6), peer_host="", peer_port=0, local_port=factory.port
        )
        self._admitted = False
        self._tls_started = False
        self._bad_commands = 0
        self._txn: Transaction | None = None
        self._sasl: SaslExchange | None = None
        self._spool: SpoolWriter | None = None
        self._session_timer: IDelayedCall | None = None
        self._greeting_timer: IDelayedCall | None = None
        self._junk_commands = 0
        self._junk_error = False
        self._stopping = False
        self._opened_at = 0.0

    @property
    def _wire(self) -> ITCPTransport:
        """The transport, typed as what a listening TCP port (and TLS over it) provides."""
        return cast(ITCPTransport, self.transport)

    # Connection life cycle

    def connectionMade(self) -> None:
        self._watch_output()
        peer = self._wire.getPeer()
        session = self.session
        session.peer_host = str(getattr(peer, "host", ""))
        session.peer_port = int(getattr(peer, "port", 0))
        session.submission = self._f.submission
        session.implicit_tls = self._f.implicit_tls
        refusal = self._f.policy.connection_opened(session.peer_host)
        if refusal is not None:
            self._log("warn", "Connection from {peer} refused: {reply}", reply=refusal.code)
            self._emit("connection.error", protocol="smtp", peer=session.peer_host, reason=str(refusal.text))
            self._emit("security.policy_violation", peer=session.peer_host, rule="ip", code=refusal.code)
            self._close(refusal)
            return
        self._admitted = True
        self._opened_at = self._clock.seconds()
        self._f.sessions.opened(self)
        self._log("info", "Connection from {peer} on port {port}", port=self._f.port)
        self._emit("connection.connect", protocol="smtp", peer=session.peer_host, tls=session.implicit_tls)
        self._arm_timer()  # connectionTimeout, from now
        if self._f.sessions.stopping:
            # Accepted just as the listeners stopped.
            self._close(self._shutting_down())
            return
        limited = self._f.policy.check_connection(session)
        if limited is None:
            self._greet_client()
        elif isinstance(limited, Reply):
            self._refuse_connection(limited)
        else:
            # Counters in Redis, or a tarpit: the greeting waits (input meanwhile is held, as for a command).
            self._run(self._greet_when_allowed(limited))

    async def _greet_when_allowed(self, limited: Deferred[Reply | None]) -> None:
        refusal = await limited
        if self._mode is CLOSED:
            return
        if refusal is not None:
            self._refuse_connection(refusal)
        else:
            self._greet_client()

    def _refuse_connection(self, refusal: Reply) -> None:
        self._log("warn", "Connection from {peer} refused by a rate limit: {reply}", reply=refusal.code)
        self._close(refusal)

    def _greet_client(self) -> None:
        if self._config.pregreet_delay > 0:
            # A well-behaved client waits for the 220 (RFC 5321 section 3.1); spam bots often do not.
            self._mode = PREGREET
            self._greeting_timer = self._clock.callLater(
                self._config.pregreet_delay / 1000.0, self._send_greeting
            )
            return
        self._send_greeting()

    def _send_greeting(self) -> None:
        self._greeting_timer = None
        self._mode = COMMAND
        self.setTimeout(self._config.socket_timeout / 1000.0)
        banner = self._config.banner or "dcrouter"
        self._send(Reply(220, "", f"{self._config.hostname} ESMTP {banner}"))

    def dataReceived(self, data: bytes) -> None:
        if self._mode is PREGREET:
            self._log("warn", "{peer} sent data before the greeting, disconnecting", size=len(data))
            self._violation("pregreet", PREGREET_REFUSED)
            self._close(PREGREET_REFUSED)
            return
        super().dataReceived(data)

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: TLS is up (implicit TLS or after STARTTLS); record version and cipher."""
        # Under TLS the transport's handle is the pyOpenSSL connection.
        handle = cast("SSL.Connection", cast(ISystemHandle, self.transport).getHandle())
        self.session.tls = f"{handle.get_protocol_version_name()} {handle.get_cipher_name()}"
        self._log("info", "TLS established with {peer}: {tls}")
        self._emit("connection.tls", protocol="smtp", version=handle.get_protocol_version_name())

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._mode = CLOSED
        self._held.clear()
        self.setTimeout(None)
        self._cancel_timers()
        self._abort_data()
        if self._admitted:
            self._admitted = False
            self._f.policy.connection_closed(self.session.peer_host)
            self._f.policy.session_closed(self.session)
            self._f.sessions.closed(self)
            self._log("info", "Disconnected from {peer}")
            if self._tls_active() and self.session.tls is None:
                # Implicit TLS or after STARTTLS, and the handshake never completed.
                self._emit(
                    "connection.error",
                    protocol="smtp",
                    peer=self.session.peer_host,
                    reason=reason.getErrorMessage()[:200],
                    tls=True,
                )
            self._emit(
                "connection.disconnect",
                protocol="smtp",
                duration=max(0.0, self._clock.seconds() - self._opened_at),
            )

    def timeoutConnection(self) -> None:
        self._timed_out("socketTimeout")

    # One timer per session for both connectionTimeout (from the connection) and socketTimeout (client
    # silence, while TimeoutMixin's ``timeOut`` is set): it is due at whichever comes first. An idle session
    # holds one DelayedCall, not two (docs/performance.md, "Idle sessions"). These replace TimeoutMixin's
    # setTimeout/resetTimeout, keeping their meaning for ``timeOut``.

    def setTimeout(self, period: float | None) -> float | None:
        # TimeoutMixin declares timeOut as int | None; seconds here may be fractional (milliseconds / 1000).
        previous, self.timeOut = self.timeOut, cast(int | None, period)
        self._arm_timer()
        return previous

    def resetTimeout(self) -> None:
        if self.timeOut is not None:
            self._arm_timer()

    def _session_deadline(self) -> float:
        return self._opened_at + self._config.connection_timeout / 1000.0

    def _arm_timer(self) -> None:
        timer = self._session_timer
        if not self._admitted or self._mode is CLOSED:
            if timer is not None and timer.active():
                timer.cancel()
            self._session_timer = None
            return
        now = self._clock.seconds()
        due = self._session_deadline()
        if self.timeOut is not None:
            due = min(due, now + self.timeOut)
        delay = max(0.0, due - now)
        if timer is not None and timer.active():
            timer.reset(delay)
        else:
            self._session_timer = self._clock.callLater(delay, self._timer_fired)

    def _timer_fired(self) -> None:
        self._session_timer = None
        if self._clock.seconds() >= self._session_deadline() - 1e-6:
            self._timed_out("connectionTimeout")
        else:
            self.timeoutConnection()

    def _timed_out(self, limit: str) -> None:
        if self._mode is CLOSED:
            return
        self._log("info", "Timeout for {peer} in {mode} mode ({limit})", mode=self._mode, limit=limit)
        self._close(Reply(421, "4.4.2", f"{self._config.hostname} Error: timeout exceeded"))

    # Graceful stop (driven by dcrouter.smtp.service.OpenSessions)

    def shut_down(self) -> None:
        """Stop this session as an MTA stopping does: ``421 4.3.2`` now when no transaction is in flight,
        otherwise once it ends: after the reply to its end of DATA (a ``250`` once queued), or as the answer
        to its next command when it has sent MAIL but not DATA."""
        if self._mode is CLOSED:
            return
        self._stopping = True
        if self._idle_for_shutdown():
            self._close(self._shutting_down())

    def close_for_shutdown(self) -> None:
        """The grace period is over: ``421 4.3.2`` and close now. A message whose end has not arrived was
        never acknowledged; its spool is dropped and the client will retry it."""
        if self._mode is not CLOSED:
            self._log("info", "Closing the session with {peer} in {mode} mode: stopping", mode=self._mode)
            self._close(self._shutting_down())

    def abort_for_shutdown(self) -> None:
        """Drop a connection whose peer does not let it close (its unread replies are discarded)."""
        self._wire.abortConnection()

    def _stop_if_idle(self) -> bool:
        if self._stopping and self._mode is not CLOSED and self._idle_for_shutdown():
            self._close(self._shutting_down())
            return True
        return False

    def _idle_for_shutdown(self) -> bool:
        return not self._busy and self._txn is None and self._mode is not DATA

    def _shutting_down(self) -> Reply:
        return Reply(421, "4.3.2", f"{self._config.hostname} Service shutting down, try again later")

    def _close(self, reply: Reply) -> None:
        """Send ``reply`` (a 421 or 221) and end the session; later input is ignored."""
        self._send(reply)
        self._flush()
        self._mode = CLOSED
        self._in.clear()
        self.setTimeout(None)
        self._cancel_timers()
        self._abort_data()
        self._wire.loseConnection()

    def _cancel_timers(self) -> None:
        for timer in (self._session_timer, self._greeting_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._session_timer = self._greeting_timer = None
        self._cancel_input_timers()

    def _abort_data(self) -> None:
        if self._spool is not None:
            self._spool.abort()
        self._spool = None
        self._stream = None

    def _reply(self, reply: Reply | None, counts: bool) -> bool:
        junk_error, self._junk_error = self._junk_error, False
        if reply is not None:
            self._send(reply)
            if reply.code >= 400 and self._f.events.wants("connection.command_refused"):
                self._emit("connection.command_refused", code=reply.code, replyClass=f"{reply.code // 100}xx")
            if counts and (reply.code in _COUNTED_AS_BAD or junk_error):
                self._bad_commands += 1
                if self._bad_commands >= self._config.max_bad_commands:
                    self._log("warn", "Too many errors from {peer}", count=self._bad_commands)
                    self._violation("too_many_errors", TOO_MANY_ERRORS)
                    self._close(TOO_MANY_ERRORS)
                    return False
        return True

    def _internal_error(self, failure: Failure) -> Reply:
        self._log("failure", "Internal error in SMTP session with {peer}", failure=failure)
        self._txn = None
        self._sasl = None
        if self._mode is not CLOSED:
            self._mode = COMMAND
        return LOCAL_ERROR

    def _send(self, reply: Reply) -> None:
        if self._mode is not CLOSED:
            self._write(reply.to_bytes())

    # Commands

    async def _dispatch(self, raw: bytes | Reply) -> Reply | None:
        if self._stopping:
            # Stopping, with a transaction open (an idle session was closed at once): answer its next
            # command, whatever it is, with 421 (RFC 5321 section 3.8).
            self._close(self._shutting_down())
            return None
        text = decode_line(raw)
        if isinstance(text, Reply):
            if self._mode is SASL:
                # A line the exchange cannot take ends the exchange; the next line is a command again.
                self._sasl = None
                self._mode = COMMAND
            return text
        if self._mode is SASL:
            return await self._auth_step(text)
        verb, _, arg = text.partition(" ")
        if verb.upper() in _NON_SMTP_VERBS:
            # Cross-protocol abuse (a browser or proxy made to talk to an SMTP port): hang up at once instead
            # of treating what follows, an HTTP request, as SMTP commands.
            self._log("warn", "Non-SMTP command from {peer}, disconnecting", verb=verb[:20])
            self._violation("non_smtp", NON_SMTP_COMMAND)
            self._close(NON_SMTP_COMMAND)
            return None
        handler = self._HANDLERS.get(verb.upper())
        if handler is None:
            self._log("info", "Unknown command from {peer}", verb=verb[:20])
            return UNKNOWN_COMMAND
        if self._is_junk(verb.upper()):
            self._junk_commands += 1
            # Postfix: past the limit each one also counts as an error, so maxBadCommands ends the session.
            self._junk_error = self._junk_commands > self._config.max_junk_commands
        return await handler(self, arg)

    def _is_junk(self, verb: str) -> bool:
        """A command that moves no mail. A repeated HELO/EHLO (not the first after connect or STARTTLS) is
        one unless the client is trusted (authenticated, or in relayNetworks)."""
        if verb in _JUNK_VERBS:
            return True
        return (
            verb in _GREETING_VERBS
            and self.session.helo is not None
            and not self._f.policy.may_relay(self.session)
        )

    async def _ehlo(self, arg: str) -> Reply:
        return self._greet(arg, esmtp=True)

    async def _helo(self, arg: str) -> Reply:
        return self._greet(arg, esmtp=False)

    def _greet(self, arg: str, *, esmtp: bool) -> Reply:
        name = arg.strip()
        if not name or " " in name or not name.isascii() or not name.isprintable():
            return Reply(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname")
        self.session.helo = name
        self.session.esmtp = esmtp
        self._txn = None
        hostname = self._config.hostname
        if not esmtp:
            return Reply(250, "", hostname)
        lines = [
            hostname,
            "PIPELINING",
            f"SIZE {self._config.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
        ]
        if self._starttls_available():
            lines.append("STARTTLS")
        if self._f.authenticator is not None and self._auth_allowed():
            mechanisms = self._f.authenticator.mechanisms
            if mechanisms:
                lines.append("AUTH " + " ".join(mechanisms))
        return Reply(250, "", tuple(lines))

    def _tls_active(self) -> bool:
        return self._f.implicit_tls or self._tls_started

    def _starttls_available(self) -> bool:
        return self._f.tls_options is not None and not self._tls_active()

    def _auth_allowed(self) -> bool:
        return self._tls_active() or self._config.auth.allow_insecure

    async def _starttls(self, arg: str) -> Reply | None:
        if arg.strip():
            return NO_ARGUMENTS
        if self._tls_active():
            return Reply(503, "5.5.1", "Error: TLS already active")
        transport = ITLSTransport(self.transport, None)
        if self._f.tls_options is None or transport is None:
            return Reply(454, "4.7.0", "TLS not available")
        self._send(Reply(220, "2.0.0", "Ready to start TLS"))
        # The 220, and any reply held before it, goes out in plaintext before the handshake starts.
        self._flush()
        # RFC 3207 §4.2 and CVE-2011-0411: nothing the client sent before the handshake may be acted upon.
        self._discard_input()
        transport.startTLS(self._f.tls_options)
        self._tls_started = True
        self.session.helo = None
        self.session.esmtp = False
        self.session.auth_user = None
        self._txn = None
        self._log("info", "STARTTLS with {peer}")
        return None

    async def _auth(self, arg: str) -> Reply | None:
        authenticator = self._f.authenticator
        if authenticator is None:
            return Reply(502, "5.5.1", "Error: authentication not enabled")
        if not self.session.esmtp:
            return Reply(503, "5.5.1", "Error: send EHLO first")
        if self.session.auth_user is not None:
            return Reply(503, "5.5.1", "Error: already authenticated")
        if self._txn is not None:
            return Reply(503, "5.5.1", "Error: AUTH not allowed during a mail transaction")
        if not self._auth_allowed():
            return ENCRYPTION_REQUIRED
        parts = arg.split()
        if not parts or len(parts) > 2:
            return Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        limited = await resolve(self._f.policy.check_auth(self.session))
        if self._mode is CLOSED:
            return None
        if limited is not None:
            self._log("warn", "AUTH from {peer} refused by a rate limit: {reply}", reply=limited.code)
            self._close(limited)
            return None
        try:
            self._sasl = authenticator.start(parts[0], parts[1] if len(parts) == 2 else None)
        except SaslError as error:
            return error.reply
        return await self._auth_step(parts[1] if len(parts) == 2 else None)

    async def _auth_step(self, line: str | None) -> Reply | None:
        exchange = self._sasl
        assert exchange is not None and self._f.authenticator is not None
        try:
            result = exchange.respond(line)
        except SaslError as error:
            self._sasl = None
            self._mode = COMMAND
            self._log("info", "AUTH exchange with {peer} ended: {reply}", reply=error.reply.code)
            return error.reply
        if isinstance(result, Challenge):
            self._mode = SASL
            return Reply(334, "", result.text)
        self._sasl = None
        self._mode = COMMAND
        try:
            user = await self._f.authenticator.authenticate(
                result, self.session.peer_host, session_id=self.session.session_id
            )
        except AuthFailed as failed:
            if failed.reply != TEMPORARY_FAILURE:
                # A provider that could not decide (directory down) says nothing against the client.
                self._f.policy.auth_failed(self.session)
            self._log(
                "warn",
                "AUTH failed for {peer}: {reply}",
                mechanism=exchange.mechanism,
                reply=failed.reply.code,
            )
            self._emit(
                "security.auth_failure",
                peer=self.session.peer_host,
                mechanism=exchange.mechanism,
                code=failed.reply.code,
            )
            challenge = exchange.failed(failed.reply) if failed.reply.code == 535 else None
            if challenge is not None and self._mode is not CLOSED:
                # XOAUTH2/OAUTHBEARER: the error comes as a challenge, the 535 after the client's answer.
                self._sasl = exchange
                self._mode = SASL
                return Reply(334, "", challenge.text)
            return failed.reply
        if self._mode is CLOSED:
            return None
        self.session.auth_user = user
        self._log("info", "AUTH succeeded for {peer}", mechanism=exchange.mechanism)
        self._emit("connection.authenticated", mechanism=exchange.mechanism)
        return AUTH_SUCCEEDED

    async def _mail(self, arg: str) -> Reply | None:
        session = self.session
        if session.helo is None:
            return BAD_SEQUENCE_HELO
        if self._txn is not None:
            return Reply(503, "5.5.1", "Error: nested MAIL command")
        if session.auth_user is None and (session.submission or self._config.auth.required):
            return AUTH_REQUIRED
        try:
            sender, params = parse_mail_argument(arg, utf8=session.esmtp)
        except AddressError as error:
            return error.reply
        refusal = check_mail_params(
            params, esmtp=session.esmtp, max_message_size=self._config.max_message_size
        )
        if refusal is not None:
            return refusal
        txn = Transaction(new_queue_id(), sender, params, utf8="SMTPUTF8" in params)
        size = int(params.get("SIZE") or 0)
        verdict = await resolve(self._f.policy.check_sender(session, sender, size))
        if self._mode is CLOSED:
            return None
        if verdict is not None:
            self._log("info", "Sender refused for {peer}: {reply}", queue_id=txn.queue_id, reply=verdict.code)
            self._violation("sender", verdict, queue_id=txn.queue_id)
            return verdict
        self._txn = txn
        return Reply(250, "2.1.0", "Ok")

    async def _rcpt(self, arg: str) -> Reply | None:
        txn = self._txn
        if txn is None:
            return Reply(503, "5.5.1", "Error: need MAIL command")
        try:
            recipient, params = parse_rcpt_argument(arg, utf8=txn.utf8)
        except AddressError as error:
            return error.reply
        if params:
            return Reply(555, "5.5.4", f"Unsupported parameter {next(iter(params))[:20]}")
        text = str(recipient)
        if text in txn.recipients:
            return Reply(250, "2.1.5", "Ok")
        if len(txn.recipients) >= self._config.max_recipients:
            return Reply(452, "4.5.3", "Too many recipients")
        verdict = await resolve(
            self._f.policy.check_recipient(self.session, recipient, txn.sender, txn.recipients)
        )
        if self._mode is CLOSED or self._txn is not txn:
            return None
        if verdict is not None:
            self._log(
                "info", "Recipient refused for {peer}: {reply}", queue_id=txn.queue_id, reply=verdict.code
            )
            if verdict.enhanced == "5.7.1":
                self._emit(
                    "security.relay_refused",
                    queue_id=txn.queue_id,
                    peer=self.session.peer_host,
                    code=verdict.code,
                )
            return verdict
        txn.recipients.append(text)
        return Reply(250, "2.1.5", "Ok")

    async def _data(self, arg: str) -> Reply | None:
        txn = self._txn
        if arg.strip():
            return NO_ARGUMENTS
        if txn is None:
            return Reply(503, "5.5.1", "Error: need MAIL command")
        if not txn.recipients:
            return Reply(503, "5.5.1", "Error: need RCPT command")
        spool = self._f.spool_writer(self._f.spool_directory)
        # Never raises: a failing file system is answered after the end of the data (see _queue).
        received = received_field(
            txn,
            self.session,
            hostname=self._config.hostname,
            tls=self._tls_active(),
            when=self._clock.seconds(),
        )
        spool.write(received)
        self._spool = spool
        self._start_data(
            DataStream(
                self._write_spool,
                max_line_length=self._config.max_line_length,
                max_message_size=self._config.max_message_size,
            )
        )
        return START_DATA

    def _write_spool(self, text: bytes) -> None:
        assert self._spool is not None
        self._spool.write(text)

    async def _rset(self, arg: str) -> Reply:
        if arg.strip():
            return NO_ARGUMENTS
        self._txn = None
        return OK

    async def _noop(self, arg: str) -> Reply:
        return OK

    async def _vrfy(self, arg: str) -> Reply:
        if not arg.strip():
            return Reply(501, "5.5.4", "Syntax: VRFY address")
        return Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")

    async def _help(self, arg: str) -> Reply:
        return _HELP

    async def _quit(self, arg: str) -> None:
        self._close(Reply(221, "2.0.0", "Bye"))

    _HANDLERS = {
        "EHLO": _ehlo,
        "HELO": _helo,
        "STARTTLS": _starttls,
        "AUTH": _auth,
        "MAIL": _mail,
        "RCPT": _rcpt,
        "DATA": _data,
        "RSET": _rset,
        "NOOP": _noop,
        "VRFY": _vrfy,
        "HELP": _help,
        "QUIT": _quit,
    }

    def _end_of_data(self, stream: DataStream) -> None:
        txn, spool = self._txn, self._spool
        assert txn is not None and spool is not None
        self._txn, self._spool = None, None
        refusal = stream.refusal(max_received_headers=self._config.max_received_headers)
        self._emit(
            "message.received", queue_id=txn.queue_id, size=stream.size, recipients=len(txn.recipients)
        )
        if refusal is not None:
            self._emit("message.refused", queue_id=txn.queue_id, code=refusal.code, reason=refusal.enhanced)
            spool.abort()
            self._log(
                "info",
                "Message from {peer} refused: {reply}",
                queue_id=txn.queue_id,
                reply=refusal.code,
                size=stream.size,
            )
            self._send(refusal)
            return
        self._run(self._queue(txn, spool, stream.size))

    async def _queue(self, txn: Transaction, spool: SpoolWriter, size: int) -> Reply:
        reply, accepted = await hand_off(
            self._f.acceptor, txn, spool, size, session=self.session, clock=self._clock, log=self._log
        )
        if accepted:
            self._junk_commands = 0  # Postfix resets the junk count once mail is accepted
            self._emit("message.accepted", queue_id=txn.queue_id, size=size)
            self._f.policy.message_accepted(self.session, txn.sender, size)
        else:
            self._emit("message.refused", queue_id=txn.queue_id, code=reply.code, reason=reply.enhanced)
        return reply

    # Events and logging

    def _emit(self, event_type: str, *, queue_id: str | None = None, **fields: Any) -> None:
        """An event of this session (dcrouter.events), with its session id and listening port."""
        events = self._f.events
        if events.wants(event_type):
            if queue_id is None and self._txn is not None:
                queue_id = self._txn.queue_id
            events.emit(
                event_type,
                queue_id=queue_id,
                session_id=self.session.session_id,
                port=self._f.port,
                **fields,
            )

    def _violation(self, rule: str, reply: Reply, *, queue_id: str | None = None) -> None:
        self._emit(
            "security.policy_violation",
            queue_id=queue_id,
            peer=self.session.peer_host,
            rule=rule,
            code=reply.code,
        )

    def _log(self, level: str, fmt: str, *, failure: Failure | None = None, **fields: Any) -> None:
        session = self.session
        fields.setdefault("queue_id", self._txn.queue_id if self._txn is not None else None)
        fields.update(
            session_id=session.session_id,
            peer=session.peer_host,
            tls=session.tls,
            auth_user=session.auth_user,
        )
        if level == "failure":
            log.failure(fmt, failure, **fields)
        else:
            getattr(log, level)(fmt, **fields)

"""dcrouter's outbound ESMTP client protocol (RFC 5321, with PIPELINING, SIZE, 8BITMIME, SMTPUTF8, STARTTLS,
ENHANCEDSTATUSCODES and AUTH PLAIN/LOGIN), written on ``Protocol`` rather than twisted.mail's client
(docs/decisions.md, "Why not twisted.mail.smtp", says why; tests/test_twisted_mail_defects.py reproduces it).

Use: connect an :class:`ESMTPClient` (an endpoint's ``connectProtocol``), then ``await wait_greeting()``,
``ehlo``, optionally ``starttls`` and ``authenticate``, then ``send`` (or ``probe``, recipient verification
without a message) as many times as wanted (``reset`` between messages is cheap and safe), then ``quit``.
One operation at a time.

What a caller may rely on:

- Every failure that ends the session is an :class:`SMTPClientError` whose ``reply`` is phrased as SMTP:
  ``421 4.4.2`` for timeouts and lost connections, ``421 4.5.0`` for a reply that is not SMTP (bad syntax, a
  line over :data:`MAX_REPLY_LINE`, more than :data:`MAX_REPLY_LINES` lines, a reply nobody asked for), the
  server's own reply for a refused greeting or EHLO/HELO. After one, the connection is closed and every later
  call raises the same error. ``temporary`` is True for all of them except EHLO/HELO answered with 5xx.
- STARTTLS and AUTH refusals also raise SMTPClientError (temporary, with the server's reply) but leave the
  session open: the caller decides (QUIT, or carry on in plaintext when TLS is only opportunistic). AUTH
  failures are temporary whatever the code (a wrong password in the route must not bounce mail: Postfix's
  ``smtp_sasl_auth_soft_bounce`` default).
- Refusals that concern one transaction are values in the :class:`TransactionResult`, never exceptions; the
  session stays usable after them. Local refusals (no command sent) look like server replies: ``552 5.3.4``
  (over the server's SIZE), ``553 5.6.7`` (SMTPUTF8 needed, not offered), ``554 5.6.3`` (8-bit body, no
  8BITMIME: RFC 6152 forbids sending it, and downgrading would mean rewriting the MIME structure and breaking
  DKIM signatures, so the message is refused rather than corrupted), ``553 5.1.3`` (an address with control
  characters, which would otherwise inject commands).
- Each awaited reply gets ``reply_timeout`` seconds (from the moment it is the next one due); a whole ``send``
  gets ``send_timeout``. The body is streamed with flow control, never read whole.
- After a ``220`` to STARTTLS every byte already received or arriving before TLS starts is discarded (an
  attacker's injected plaintext replies, the CVE-2011-0411 class), and EHLO is sent again inside TLS.
- Commands and replies are logged at debug level (namespace ``dcrouter.delivery.client``); AUTH arguments and
  SASL responses are logged as ``<redacted>``.
"""

from __future__ import annotations

import base64
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    ISSLTransport,
    ITCPTransport,
    ITLSTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from dcrouter.delivery.dotstuff import StuffedBodyProducer
from dcrouter.log import enabled, logger
from dcrouter.mail.reply import Reply
from dcrouter.net.quiet import set_no_delay

log = logger(__name__)

#: Longest reply line accepted, CRLF included. RFC 5321 §4.5.3.1.5 says 512; real servers exceed it a little.
MAX_REPLY_LINE = 4096
#: Most lines in one (multiline) reply.
MAX_REPLY_LINES = 100

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]?)(.*)", re.DOTALL)
_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: |$)")
_REDACTED = "<redacted>"
#: A reply timer firing this close to its deadline times out (float rounding must not re-arm it for nothing).
_TIMER_SLACK = 1e-6


class SMTPClientError(Exception):
    """The session cannot continue. ``reply`` says why, as SMTP; ``temporary`` says whether to retry later."""

    def __init__(self, reply: Reply, *, temporary: bool = True) -> None:
        super().__init__(f"{reply.code} {reply.enhanced} {' '.join(reply.lines())}".replace("  ", " "))
        self.reply = reply
        self.temporary = temporary


class StaleSession(SMTPClientError):
    """A reused session failed the RSET sent in front of a transaction (:attr:`ESMTPClient.reset_due`): the
    connection was dropped or reset while idle. Nothing of the transaction happened on it and no message text
    was read: the caller takes another connection, as a failed probe would have had it do."""


@dataclass
class Capabilities:
    """What the server's EHLO reply offers. ``size`` is None when SIZE is not offered and 0 when it is
    offered without a limit (RFC 1870); ``auth`` holds upper-case mechanism names. After HELO, all is off."""

    esmtp: bool
    size: int | None
    pipelining: bool
    eightbitmime: bool
    smtputf8: bool
    starttls: bool
    auth: frozenset[str]
    enhanced_status_codes: bool

    def __contains__(self, keyword: object) -> bool:
        """``"STARTTLS" in capabilities``: whether an EHLO keyword (any case) was offered."""
        if not isinstance(keyword, str):
            return False
        flags = {
            "SIZE": self.size is not None,
            "PIPELINING": self.pipelining,
            "8BITMIME": self.eightbitmime,
            "SMTPUTF8": self.smtputf8,
            "STARTTLS": self.starttls,
            "AUTH": bool(self.auth),
            "ENHANCEDSTATUSCODES": self.enhanced_status_codes,
        }
        return flags.get(keyword.upper(), False)


@dataclass
class TransactionResult:
    """One transaction's replies. ``mail`` is MAIL FROM's reply (or a local refusal); when it is not 2xx,
    ``recipients`` is empty and ``mail`` decides every recipient. Otherwise ``recipients`` has one reply per
    distinct recipient. ``data`` is None when MAIL failed or no RCPT was accepted; else it is the reply that
    decided the message: the final reply after the text, or DATA's refusal when DATA got no 354."""

    mail: Reply
    recipients: dict[str, Reply]
    data: Reply | None


@dataclass
class ProbeReplies:
    """The replies to a recipient probe (:meth:`ESMTPClient.probe`). ``rcpt`` is None when MAIL was refused
    (the RCPT reply would say nothing then); ``reset`` is RSET's reply, None when no transaction was open."""

    mail: Reply
    rcpt: Reply | None
    reset: Reply | None


def parse_capabilities(reply: Reply) -> Capabilities:
    """Capabilities from a 250 EHLO reply (keywords case-insensitive; ``AUTH=`` is the pre-RFC 4954 form)."""
    keywords: set[str] = set()
    auth: set[str] = set()
    size: int | None = None
    for line in reply.lines()[1:]:
        words = line.split()
        if not words:
            continue
        keyword = words[0].upper()
        if keyword == "AUTH" or keyword.startswith("AUTH="):
            auth.update(word.upper() for word in [keyword[5:], *words[1:]] if word)
        elif keyword == "SIZE":
            size = int(words[1]) if len(words) > 1 and words[1].isdigit() else 0
        else:
            keywords.add(keyword)
    return Capabilities(
        esmtp=True,
        size=size,
        pipelining="PIPELINING" in keywords,
        eightbitmime="8BITMIME" in keywords,
        smtputf8="SMTPUTF8" in keywords,
        starttls="STARTTLS" in keywords,
        auth=frozenset(auth),
        enhanced_status_codes="ENHANCEDSTATUSCODES" in keywords,
    )


_HELO_ONLY = Capabilities(
    esmtp=False,
    size=None,
    pipelining=False,
    eightbitmime=False,
    smtputf8=False,
    starttls=False,
    auth=frozenset(),
    enhanced_status_codes=False,
)


def _build_reply(code: int, texts: list[str]) -> Reply:
    """A Reply with the RFC 3463 code split off the text when the first line starts with one of its class."""
    match = _ENHANCED.match(texts[0])
    if match is None or match.group(1) != str(code)[0]:
        return Reply(code, "", texts[0] if len(texts) == 1 else tuple(texts))
    enhanced = ".".join(match.groups())
    if len(texts) == 1:
        return Reply(code, enhanced, _strip_enhanced(texts[0], enhanced))
    return Reply(code, enhanced, tuple(_strip_enhanced(text, enhanced) for text in texts))


def _strip_enhanced(text: str, enhanced: str) -> str:
    """``text`` without a leading ``enhanced`` and its space: what ``re.match(escape(enhanced) + "(?: |$)")``
    would cut (its ``$`` also stands before a final newline), without compiling a pattern per reply."""
    if not text.startswith(enhanced):
        return text
    rest = text[len(enhanced) :]
    if rest[:1] == " ":
        return rest[1:]
    return rest if rest in ("", "\n") else text


def _is_positive(reply: Reply) -> bool:
    return 200 <= reply.code < 300


#: What may not be in an address sent between angle brackets: control characters and the brackets.
_BAD_ADDRESS_CHARACTER = re.compile("[\x00-\x1f\x7f<>]")


def _bad_address(address: str) -> bool:
    return _BAD_ADDRESS_CHARACTER.search(address) is not None


class ESMTPClient(Protocol):
    """One outbound SMTP session. See the module docstring for its guarantees."""

    def __init__(self, *, clock: IReactorTime, reply_timeout: float, send_timeout: float) -> None:
        self._clock = clock
        self._reply_timeout = reply_timeout
        self._send_timeout = send_timeout
        self.capabilities: Capabilities | None = None
        self.is_tls = False
        self.peer = ""
        self._buffer = bytearray()
        #: Whether the protocol trace (debug) is on, as asked at the start of the read being handled.
        self._trace = False
        self._lines: list[str] = []
        self._line_code = 0
        # Replies due (commands written, replies not complete); one arriving when this is 0 is unsolicited.
        self._expected = 0
        self._replies: deque[Reply] = deque()
        self._reader: Deferred[Reply] | None = None
        self._reply_timer: IDelayedCall | None = None
        #: When the reply due now times out (``reply_timeout`` after it became the next one due).
        self._reply_deadline = 0.0
        self._failure: SMTPClientError | None = None
        self._greeting: Reply | None = None
        self._starttls_due = False
        self._discarding = False
        self._closing = False
        self._producer: StuffedBodyProducer | None = None
        #: The message of the transaction under way (``send``'s ``queue_id``), for the log lines.
        self.queue_id: str | None = None
        #: Set by a connection pool handing out an idle session unprobed: the next ``send`` begins with RSET
        #: (pipelined with the transaction's commands when PIPELINING is offered) and raises
        #: :class:`StaleSession` when that fails.
        self.reset_due = False

    @property
    def _wire(self) -> ITCPTransport:
        """The transport, typed as what TCP (and TLS over it) provides."""
        return cast(ITCPTransport, self.transport)

    @property
    def is_open(self) -> bool:
        """False once the session has failed, timed out, been aborted or lost its connection. (A connection
        closed by the peer while idle may still read True until the reactor notices: probe with RSET.)"""
        return self._failure is None and self.transport is not None

    # Connection life cycle

    def connectionMade(self) -> None:
        address = self._wire.getPeer()
        host, port = getattr(address, "host", ""), getattr(address, "port", "")
        self.peer = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
        self.is_tls = ISSLTransport.providedBy(self.transport)
        set_no_delay(self.transport)
        self._expect(1)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._failure is None:
            if self._closing:
                text = f"Connection to {self.peer} closed"
            else:
                text = f"Connection to {self.peer} lost: {reason.getErrorMessage()}"[:300]
            self._fail(SMTPClientError(Reply(421, "4.4.2", text)), abort=False)
        self._cancel_reply_timer()
        self.connected = 0

    def abort(self) -> None:
        """Drop the connection now; anything waiting fails with ``421 4.4.2``."""
        self._fail(SMTPClientError(Reply(421, "4.4.2", f"Connection to {self.peer} aborted")))
        if self.transport is not None:
            self._wire.abortConnection()

    def _fail(self, error: SMTPClientError, *, abort: bool = True) -> None:
        """End the session with ``error``: later calls raise it, a waiting call gets it now."""
        if self._failure is not None:
            return
        self._failure = error
        level = log.debug if self._closing else log.info
        level(
            "SMTP session with {peer} ended: {error}",
            peer=self.peer,
            queue_id=self.queue_id,
            error=str(error),
        )
        self._cancel_reply_timer()
        self._buffer.clear()
        if abort and self.transport is not None:
            self._wire.abortConnection()
        if self._producer is not None:
            self._producer.stopProducing()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.errback(error)

    # Replies

    def dataReceived(self, data: bytes) -> None:
        if self._failure is not None:
            return
        if self._discarding:
            log.warn(
                "Discarded {count} octets from {peer} sent before TLS",
                count=len(data),
                peer=self.peer,
                queue_id=self.queue_id,
            )
            return
        self._buffer += data
        # The protocol trace's level, asked once per read rather than once per reply line.
        self._trace = enabled(__name__)
        while self._failure is None and not self._discarding:
            end = self._buffer.find(b"\n", 0, MAX_REPLY_LINE)
            if end < 0:
                if len(self._buffer) >= MAX_REPLY_LINE:
                    self._protocol_error("reply line too long")
                return
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            self._reply_line(line)

    def _reply_line(self, raw: bytes) -> None:
        # A bare LF ends a line too: leniency cannot smuggle anything here, the server's text is only read.
        body = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        match = _REPLY_LINE.fullmatch(body)
        if match is None or (match.group(2) == b"" and match.group(3)) or b"\r" in body:
            self._protocol_error("malformed reply line")
            return
        code = int(match.group(1))
        if self._lines and code != self._line_code:
            self._protocol_error("reply code changed within a multiline reply")
            return
        self._line_code = code
        self._lines.append(match.group(3).decode("utf-8", "replace"))
        if match.group(2) == b"-":
            if len(self._lines) >= MAX_REPLY_LINES:
                self._protocol_error("too many reply lines")
            return
        reply = _build_reply(code, self._lines)
        self._lines = []
        self._deliver(reply)

    def _deliver(self, reply: Reply) -> None:
        if self._trace:  # the protocol trace: per reply, so built only when debug is on
            log.debug(
                "S: {code} {text}",
                peer=self.peer,
                queue_id=self.queue_id,
                code=reply.code,
                text=" / ".join(reply.lines()),
            )
        if self._expected == 0:
            if reply.code == 421:
                # RFC 5321 §3.8: a server shutting down may say so at any time.
                self._fail(SMTPClientError(reply))
            else:
                self._protocol_error(f"unsolicited reply {reply.code}")
            return
        self._expected -= 1
        if self._expected == 0:
            self._cancel_reply_timer()
        else:
            # The next reply's time starts now; the timer already running checks this when it fires.
            self._reply_deadline = self._clock.seconds() + self._reply_timeout
        if self._starttls_due:
            self._starttls_due = False
            if reply.code == 220:
                # RFC 3207 §4.2: nothing the server sent before the handshake may be believed.
                if self._buffer:
                    log.warn(
                        "Discarded {count} octets from {peer} sent after its 220 to STARTTLS",
                        count=len(self._buffer),
                        peer=self.peer,
                        queue_id=self.queue_id,
                    )
                self._buffer.clear()
                self._discarding = True
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.callback(reply)
        else:
            self._replies.append(reply)

    def _protocol_error(self, what: str) -> None:
        log.info("Protocol error from {peer}: {what}", peer=self.peer, queue_id=self.queue_id, what=what)
        self._fail(SMTPClientError(Reply(421, "4.5.0", f"Protocol error: {self.peer} sent a {what}")))

    def _reply(self) -> Deferred[Reply]:
        """The next reply due, in order; fails with the session's error."""
        if self._replies:
            return succeed(self._replies.popleft())
        if self._failure is not None:
            return fail(self._failure)
        reader: Deferred[Reply] = Deferred()
        self._reader = reader
        return reader

    def _expect(self, count: int) -> None:
        self._expected += count
        self._arm_reply_timer()

    def _arm_reply_timer(self) -> None:
        if self._expected > 0 and self._reply_timer is None and self._failure is None:
            self._reply_deadline = self._clock.seconds() + self._reply_timeout
            self._reply_timer = self._clock.callLater(self._reply_timeout, self._reply_timed_out)

    def _cancel_reply_timer(self) -> None:
        if self._reply_timer is not None and self._reply_timer.active():
            self._reply_timer.cancel()
        self._reply_timer = None

    def _reply_timed_out(self) -> None:
        self._reply_timer = None
        left = self._reply_deadline - self._clock.seconds()
        if left > _TIMER_SLACK:
            # A reply came meanwhile: the one now due has until its own deadline (one timer per batch of
            # pipelined replies, moved only when it fires, instead of one per reply).
            self._reply_timer = self._clock.callLater(left, self._reply_timed_out)
            return
        text = f"{self.peer} Error: timeout exceeded waiting {self._reply_timeout:g}s for a reply"
        self._fail(SMTPClientError(Reply(421, "4.4.2", text)))

    # Commands

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _command(self, *lines: str, log_as: str | None = None) -> None:
        """Write ``lines`` in one go (pipelined when several) and expect one reply for each."""
        self._check()
        if enabled(__name__):
            for line in lines:
                log.debug(
                    "C: {command}",
                    peer=self.peer,
                    queue_id=self.queue_id,
                    command=log_as if log_as is not None else line,
                )
        self._wire.write("".join(line + "\r\n" for line in lines).encode("utf-8"))
        self._expect(len(lines))

    async def _ask(self, line: str, *, log_as: str | None = None) -> Reply:
        self._command(line, log_as=log_as)
        return await self._reply()

    async def wait_greeting(self) -> Reply:
        """The server's 220 greeting. Any other greeting raises SMTPClientError (temporary: another host, or
        this one later, may accept) after a QUIT."""
        if self._greeting is None:
            greeting = await self._reply()
            self._greeting = greeting
            if greeting.code != 220:
                if greeting.code != 421:
                    self._wire.write(b"QUIT\r\n")
                self._closing = True
                self._fail(SMTPClientError(greeting), abort=False)
                self._wire.loseConnection()
        self._check()
        return self._greeting

    async def ehlo(self, name: str) -> Capabilities:
        """EHLO, or HELO when EHLO is answered with 5xx; sets and returns :attr:`capabilities`."""
        await self.wait_greeting()
        reply = await self._ask(f"EHLO {name}")
        if _is_positive(reply):
            self.capabilities = parse_capabilities(reply)
            return self.capabilities
        if reply.code < 500 or reply.code == 521:
            # 4xx: try later; 521 (RFC 7504): this host takes no mail, HELO would not change that.
            raise self._refused(reply, temporary=reply.code < 500)
        reply = await self._ask(f"HELO {name}")
        if not _is_positive(reply):
            raise self._refused(reply, temporary=reply.code < 500)
        self.capabilities = _HELO_ONLY
        return self.capabilities

    def _refused(self, reply: Reply, *, temporary: bool) -> SMTPClientError:
        """The server refused what the session needs: QUIT politely, then fail with its reply."""
        error = SMTPClientError(reply, temporary=temporary)
        if self._failure is None:
            self._closing = True
            self._wire.write(b"QUIT\r\n")
            self._fail(error, abort=False)
            self._wire.loseConnection()
        return error

    async def starttls(self, tls_options: IOpenSSLClientConnectionCreator, name: str) -> Capabilities:
        """STARTTLS, then EHLO ``name`` inside TLS. Raises SMTPClientError (temporary) without closing the
        session when STARTTLS is not offered or is answered with anything but 220; a failed handshake ends the
        session (421 4.4.2)."""
        await self.wait_greeting()
        self._check()
        if self.is_tls:
            raise SMTPClientError(Reply(503, "5.5.1", f"TLS already active with {self.peer}"))
        transport = ITLSTransport(self.transport, None)
        if transport is None:
            raise SMTPClientError(Reply(454, "4.7.0", "TLS not available on this connection"))
        if self.capabilities is not None and not self.capabilities.starttls:
            raise SMTPClientError(Reply(454, "4.7.0", f"{self.peer} does not offer STARTTLS"))
        self._starttls_due = True
        reply = await self._ask("STARTTLS")
        if reply.code != 220:
            raise SMTPClientError(reply)
        transport.startTLS(tls_options)
        self._discarding = False
        self.is_tls = True
        self.capabilities = None
        if enabled(__name__):
            log.debug("TLS started with {peer}", peer=self.peer, queue_id=self.queue_id)
        return await self.ehlo(name)

    async def authenticate(self, user: str, password: str) -> None:
        """AUTH PLAIN when offered, else AUTH LOGIN. Raises SMTPClientError (temporary) when neither is
        offered or the server does not answer 235; the credentials are never logged."""
        await self.wait_greeting()
        offered = self.capabilities.auth if self.capabilities is not None else frozenset()
        if "PLAIN" in offered:
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
            reply = await self._ask(f"AUTH PLAIN {token}", log_as=f"AUTH PLAIN {_REDACTED}")
            if reply.code == 334:
                # A server that takes no initial response asks for it.
                reply = await self._ask(token, log_as=_REDACTED)
        elif "LOGIN" in offered:
            reply = await self._ask("AUTH LOGIN")
            for secret in (user, password):
                if reply.code != 334:
                    break
                reply = await self._ask(base64.b64encode(secret.encode()).decode("ascii"), log_as=_REDACTED)
        else:
            raise SMTPClientError(Reply(454, "4.7.0", f"{self.peer} offers neither AUTH PLAIN nor LOGIN"))
        if reply.code == 334:
            # Asked for more than the mechanism has: cancel (RFC 4954 §4) and fail with that reply.
            reply = await self._ask("*")
        if reply.code != 235:
            raise SMTPClientError(reply)

    async def probe(self, mail_from: str, recipient: str) -> ProbeReplies:
        """Ask whether the server would take mail for ``recipient`` without sending any: ``MAIL FROM``,
        ``RCPT TO``, then ``RSET`` so the session is clean for the next use (all three in one write when
        PIPELINING is offered). Non-ASCII addresses add ``SMTPUTF8``; when the server lacks it, or an address
        has characters SMTP cannot carry, nothing is sent and ``mail`` is the local refusal (``553``)."""
        self._check()
        capabilities = self.capabilities
        if capabilities is None:
            raise RuntimeError("ESMTPClient.probe before ehlo")
        if _bad_address(mail_from) or _bad_address(recipient):
            return ProbeReplies(Reply(553, "5.1.3", "Address has characters SMTP cannot carry"), None, None)
        mail_line = f"MAIL FROM:<{mail_from}>"
        if not (mail_from.isascii() and recipient.isascii()):
            if not capabilities.smtputf8:
                text = f"{self.peer} does not support SMTPUTF8, which this address needs"
                return ProbeReplies(Reply(553, "5.6.7", text), None, None)
            mail_line += " SMTPUTF8"
        rcpt_line = f"RCPT TO:<{recipient}>"
        if capabilities.pipelining:
            self._command(mail_line, rcpt_line, "RSET")
            mail, rcpt, reset = await self._reply(), await self._reply(), await self._reply()
            return ProbeReplies(mail, rcpt if _is_positive(mail) else None, reset)
        mail = await self._ask(mail_line)
        if not _is_positive(mail):
            return ProbeReplies(mail, None, None)
        rcpt = await self._ask(rcpt_line)
        return ProbeReplies(mail, rcpt, await self.reset())

    async def reset(self) -> Reply:
        """RSET; returns the server's reply (a non-2xx reply is the caller's to judge)."""
        return await self._ask("RSET")

    async def quit(self) -> None:
        """QUIT and close; never raises (a session that already ended has nothing to say)."""
        if self._failure is not None or self.transport is None:
            return
        self._closing = True
        try:
            await self._ask("QUIT")
        except SMTPClientError:
            pass
        finally:
            if self.transport is not None:
                self._wire.loseConnection()

    # The transaction

    async def send(
        self,
        mail_from: str,
        recipients: Sequence[str],
        body: BinaryIO,
        size: int,
        *,
        smtputf8: bool = False,
        eight_bit: bool = False,
        queue_id: str | None = None,
    ) -> TransactionResult:
        """One mail transaction: ``body`` (message text, read from its current position to EOF, any line
        endings) to every recipient the server accepts. ``size`` is announced with SIZE. Addresses are sent
        as given between angle brackets; non-ASCII ones imply ``smtputf8``. ``queue_id`` names the message
        in the log lines of the transaction."""
        self.queue_id = queue_id
        if self.reset_due and self._failure is not None:
            raise StaleSession(self._failure.reply)
        self._check()
        capabilities = self.capabilities
        if capabilities is None:
            raise RuntimeError("ESMTPClient.send before ehlo")
        smtputf8 = smtputf8 or not all(a.isascii() for a in (mail_from, *recipients))
        refusal = self._refusal(capabilities, mail_from, size, smtputf8=smtputf8, eight_bit=eight_bit)
        if refusal is not None:
            log.info(
                "Not sending to {peer}: {reply}", peer=self.peer, queue_id=self.queue_id, reply=refusal.code
            )
            return TransactionResult(mail=refusal, recipients={}, data=None)
        timer = self._clock.callLater(self._send_timeout, self._send_timed_out)
        try:
            return await self._transaction(
                capabilities, mail_from, recipients, body, size, smtputf8=smtputf8, eight_bit=eight_bit
            )
        finally:
            if timer.active():
                timer.cancel()
            self.queue_id = None

    def _send_timed_out(self) -> None:
        text = f"{self.peer} Error: timeout exceeded: transaction took over {self._send_timeout:g}s"
        self._fail(SMTPClientError(Reply(421, "4.4.2", text)))

    def _refusal(
        self, capabilities: Capabilities, mail_from: str, size: int, *, smtputf8: bool, eight_bit: bool
    ) -> Reply | None:
        """Why this transaction cannot go to this server at all, as a permanent reply; None when it can."""
        if _bad_address(mail_from):
            return Reply(553, "5.1.7", "Sender address contains characters SMTP cannot carry")
        if smtputf8 and not capabilities.smtputf8:
            return Reply(553, "5.6.7", f"{self.peer} does not support SMTPUTF8, which this message needs")
        if eight_bit and not capabilities.eightbitmime:
            return Reply(554, "5.6.3", f"{self.peer} does not support 8BITMIME and the message is 8-bit")
        if capabilities.size and size > capabilities.size:
            return Reply(
                552, "5.3.4", f"Message size {size} exceeds the limit of {self.peer} ({capabilities.size})"
            )
        return None

    async def _transaction(
        self,
        capabilities: Capabilities,
        mail_from: str,
        recipients: Sequence[str],
        body: BinaryIO,
        size: int,
        *,
        smtputf8: bool,
        eight_bit: bool,
    ) -> TransactionResult:
        mail_line = f"MAIL FROM:<{mail_from}>"
        if capabilities.size is not None:
            mail_line += f" SIZE={size}"
        if eight_bit:
            mail_line += " BODY=8BITMIME"
        if smtputf8:
            mail_line += " SMTPUTF8"
        results: dict[str, Reply] = {}
        to_send: list[str] = []
        for recipient in dict.fromkeys(recipients):
            if _bad_address(recipient):
                results[recipient] = Reply(553, "5.1.3", "Recipient address has characters SMTP cannot carry")
            else:
                to_send.append(recipient)
        if not to_send:
            if not results:
                raise ValueError("ESMTPClient.send without recipients")
            return TransactionResult(mail=next(iter(results.values())), recipients={}, data=None)
        reset, self.reset_due = self.reset_due, False
        if capabilities.pipelining:
            # A reused session's RSET goes in the same write (RFC 2920: RSET may be anywhere in a group).
            self._command(
                *(("RSET",) if reset else ()), mail_line, *(f"RCPT TO:<{r}>" for r in to_send), "DATA"
            )
            if reset:
                await self._session_reset(self._reply())
            mail = await self._reply()
            for recipient in to_send:
                results[recipient] = await self._reply()
            data = await self._reply()
        else:
            if reset:
                await self._session_reset(Deferred.fromCoroutine(self._ask("RSET")))
            mail = await self._ask(mail_line)
            if not _is_positive(mail):
                return TransactionResult(mail=mail, recipients={}, data=None)
            for recipient in to_send:
                results[recipient] = await self._ask(f"RCPT TO:<{recipient}>")
            data = None
            if any(_is_positive(reply) for reply in results.values()):
                data = await self._ask("DATA")
        return await self._finish_transaction(mail, results, data, body)

    async def _session_reset(self, reply: Deferred[Reply]) -> None:
        """The reply to the RSET in front of a reused session's transaction; StaleSession unless 250."""
        try:
            reset = await reply
        except SMTPClientError as error:
            raise StaleSession(error.reply) from None
        if reset.code != 250:
            # A 421, or a server in no state we know: what was pipelined behind the RSET must not count.
            self.abort()
            raise StaleSession(reset)

    async def _finish_transaction(
        self, mail: Reply, results: dict[str, Reply], data: Reply | None, body: BinaryIO
    ) -> TransactionResult:
        accepted = _is_positive(mail) and any(_is_positive(reply) for reply in results.values())
        if not accepted:
            if data is not None and data.code == 354:
                # A server that wants text although it accepted nobody: give it an empty one to refuse.
                log.warn(
                    "{peer} answered DATA with 354 without recipients", peer=self.peer, queue_id=self.queue_id
                )
                await self._ask(".", log_as="<end of data>")
            if _is_positive(mail) or data is not None:
                # Leave no half transaction behind: the connection may carry the next message.
                await self.reset()
            return TransactionResult(mail=mail, recipients=results if _is_positive(mail) else {}, data=None)
        if data is None or data.code != 354:
            await self.reset()
            return TransactionResult(mail=mail, recipients=results, data=data)
        return TransactionResult(mail=mail, recipients=results, data=await self._send_body(body))

    async def _send_body(self, body: BinaryIO) -> Reply:
        """Stream the message text through the dot-stuffer; the final reply."""
        producer = StuffedBodyProducer(body, cast(IConsumer, self.transport), clock=self._clock)
        self._producer = producer
        try:
            octets = await producer.start()
        except OSError:
            # Part of the text is out: ending it now would deliver a truncated message. Hang up instead.
            log.failure("Cannot read the message body for {peer}", peer=self.peer, queue_id=self.queue_id)
            self._fail(SMTPClientError(Reply(451, "4.3.0", "Local error reading the message text")))
            raise self._failure from None  # type: ignore[misc]
        except Exception:  # noqa: BLE001 - ProducerStopped or our own failure, both end the session
            # The transport stopped us (the connection went) before telling us it was lost.
            self._fail(SMTPClientError(Reply(421, "4.4.2", f"Connection to {self.peer} lost during DATA")))
            raise self._failure from None  # type: ignore[misc]
        finally:
            self._producer = None
        if enabled(__name__):
            log.debug(
                "C: <message text, {octets} octets>", peer=self.peer, queue_id=self.queue_id, octets=octets
            )
        self._expect(1)
        return await self._reply()

"""The input side of an SMTP server session: :class:`CommandReceiver`, the base of
:class:`~dcrouter.smtp.protocol.ESMTPServerProtocol` (as ``LineReceiver`` is the base of Twisted's own
protocols), which frames command lines, runs one command at a time, holds back pipelined input and feeds
message text to the DATA stream. The commands themselves are the subclass's.

What a subclass may rely on:

- Input is buffered and handled strictly one command at a time, in order: a command line goes to
  :meth:`~CommandReceiver._dispatch`, whose coroutine runs on :func:`~dcrouter.smtp.eager.run_eagerly`; while
  it waits on a Deferred nothing after it runs, so replies come out in the order of the commands. While
  waiting, buffered input is bounded: the transport is paused past :data:`MAX_PENDING_INPUT` octets (resumed
  below half of it) and the session closed with ``421 4.7.0`` past four times that.
- Replies to pipelined commands go out together (RFC 2920 §3.2): what the commands of one read produce is
  written in one go once the input holds no further complete command to run, or the next one waits on a
  Deferred with nothing left in the input behind it; a command waiting on a Deferred (a check, the queue)
  with more pipelined commands buffered behind it holds the replies before it until it has answered. Held
  replies are written before they exceed :data:`MAX_HELD_OUTPUT` octets, before STARTTLS's handshake and
  when the session closes. A reply outside any input (the greeting, a timeout) is written at once.
- Replies wait for a client that does not read them: :meth:`~CommandReceiver._watch_output` registers a
  producer with the transport, and while the transport says its write buffer is full (``pauseProducing``)
  no further command is run until it has drained; input meanwhile is bounded as above. A client that
  pipelines and never reads holds at most the transport's buffer of replies, not one per command it sent.
- Command lines end in CRLF; a bare LF is accepted as a terminator (never in DATA). A line over
  ``maxCommandLineLength`` (``AUTH`` lines: :data:`AUTH_LINE_LIMIT`; lines of a SASL exchange: the encoded
  response's limit) is dispatched as ``500 5.5.2 Line too long`` once and discarded up to its LF.
- A command line must be complete ``commandTimeout`` after its first byte, wherever the bytes drip from; time
  a command of ours waits is not counted, nor is it client idleness (``socketTimeout`` is suspended).
- After :meth:`~CommandReceiver._start_data`, input goes to the :class:`~dcrouter.smtp.datastream.DataStream`
  until its final dot, within ``dataTimeout`` and ``minDataRate``; what follows the dot is read as commands
  again, after :meth:`~CommandReceiver._end_of_data`.

Every timer runs on the session's clock.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any, cast

from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.config.smtp import SmtpConfig
from dcrouter.log import logger
from dcrouter.mail.reply import Reply
from dcrouter.smtp.datastream import DataStream
from dcrouter.smtp.eager import run_eagerly
from dcrouter.smtp.sasl import MAX_ENCODED_RESPONSE
from dcrouter.smtp.session import Session

log = logger(__name__)

#: Octets of unprocessed input kept while a command waits before the transport is paused.
MAX_PENDING_INPUT = 64 * 1024
#: Most octets of replies held back for one write (see the module docstring; a longer reply is written alone):
#: a client that pipelines and never reads meets the transport's push-back after at most this much more and
#: one reply. (Writes within one reactor turn are one send() anyway; holding matters across turns.)
MAX_HELD_OUTPUT = 256
#: RFC 4954 §4: AUTH command lines may be up to 12288 octets.
AUTH_LINE_LIMIT = 12288

LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BAD_CHARACTERS = Reply(500, "5.5.2", "Syntax error: bad characters in command line")
TOO_MUCH_INPUT = Reply(421, "4.7.0", "Too much pipelined input")

# What the session reads its input as. The modes are compared by identity.
#: Command lines.
COMMAND = "command"
#: Lines of an AUTH exchange (base64 responses), framed as command lines.
SASL = "sasl"
#: Message text, up to its final dot.
DATA = "data"
#: Over: input is ignored.
CLOSED = "closed"
#: Connected, the greeting not sent yet (pregreetDelay): the subclass decides what input means.
PREGREET = "pregreet"

#: The line limit applies to what comes before the CRLF too; "AUTH " lines get RFC 4954's larger limit.
_AUTH_PREFIX = b"AUTH "


def decode_line(raw: bytes | Reply) -> str | Reply:
    """The text of a command line without its terminator, or the reply refusing the line."""
    if isinstance(raw, Reply):
        return raw
    body = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
    if b"\r" in body or b"\x00" in body:
        return BAD_CHARACTERS
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return BAD_CHARACTERS


class CommandReceiver(Protocol, TimeoutMixin):
    """Input framing, flow control and the one-command-at-a-time runner of an SMTP session. See the module
    docstring for what it guarantees; the methods marked as hooks are the subclass's to provide."""

    #: The session the log lines are about (the subclass sets it).
    session: Session

    # One session holds one of these for as long as its client stays connected (100,000 idle sessions is an
    # aim: docs/performance.md), so its state is in slots, not an instance dictionary. Protocol and
    # TimeoutMixin have none, so their per-instance attributes are slots here too (set in __init__, where
    # their class-level defaults would otherwise have been read): with a subclass that declares its own
    # ``__slots__`` too, an instance has no ``__dict__`` at all (tests/test_smtp_memory.py).
    __slots__ = (
        "_TimeoutMixin__timeoutCall",
        "_busy",
        "_clock",
        "_config",
        "_data_deadline",
        "_data_timer",
        "_discarding_line",
        "_held",
        "_held_octets",
        "_holding",
        "_in",
        "_line_timer",
        "_mode",
        "_output_blocked",
        "_paused",
        "_pumping",
        "_rate_timer",
        "_stream",
        "connected",
        "factory",
        "timeOut",
        "transport",
    )

    def __init__(self, config: SmtpConfig, clock: IReactorTime) -> None:
        self.transport = None
        self.connected = 0
        self.factory = None
        self.timeOut = None
        self._TimeoutMixin__timeoutCall: IDelayedCall | None = None
        self._config = config
        self._clock = clock
        self._mode = COMMAND
        self._in = bytearray()
        #: A command is running (from its line to its reply): input waits.
        self._busy = False
        self._pumping = False
        self._discarding_line = False
        self._paused = False
        #: The transport's write buffer is full (its pauseProducing): no command runs until it drains.
        self._output_blocked = False
        self._stream: DataStream | None = None
        self._data_timer: IDelayedCall | None = None
        #: commandTimeout for the command line in progress, from its first byte.
        self._line_timer: IDelayedCall | None = None
        #: minDataRate: when the DATA transfer in progress must have ended by, as it stands.
        self._rate_timer: IDelayedCall | None = None
        self._data_deadline = 0.0
        #: Replies not yet written (see the module docstring), their octets, and how deeply input handling
        #: that may produce more of them is nested (0: write at once).
        self._held: list[bytes] = []
        self._held_octets = 0
        self._holding = 0

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        """TimeoutMixin's timer source: the session's clock, not the global reactor."""
        return self._clock.callLater(period, func)

    # Hooks

    async def _dispatch(self, raw: bytes | Reply) -> Reply | None:
        """Hook: run the command ``raw`` (a line with its terminator, or the Reply refusing it); the reply to
        send, or None when the command sent its own or closed the session."""
        raise NotImplementedError

    def _reply(self, reply: Reply | None, counts: bool) -> bool:
        """Hook: send a command's reply (``counts``: toward maxBadCommands); False once the session closed."""
        raise NotImplementedError

    def _internal_error(self, failure: Failure) -> Reply:
        """Hook: a command raised ``failure``; the reply to send instead."""
        raise NotImplementedError

    def _end_of_data(self, stream: DataStream) -> None:
        """Hook: the final dot of ``stream`` has arrived (input is command lines again)."""
        raise NotImplementedError

    def _stop_if_idle(self) -> bool:
        """Hook, after each batch of input: close the session if it should end now; True once closed."""
        raise NotImplementedError

    def _timed_out(self, limit: str) -> None:
        """Hook: the time limit named ``limit`` (its configuration key) has passed."""
        raise NotImplementedError

    def _close(self, reply: Reply) -> None:
        """Hook: send ``reply`` and end the session (the mode becomes CLOSED)."""
        raise NotImplementedError

    # Output

    def _watch_output(self) -> None:
        """Have the transport tell this session when its write buffer is full and when it has drained (call
        once, when the connection is made)."""
        cast(IConsumer, self.transport).registerProducer(_OutputGate(self), True)

    def _output_full(self, full: bool) -> None:
        # Only commands wait: reading goes on into the input buffer, whose own bound pauses the transport.
        # (Pausing it here would stall a TLS handshake: the TLS layer reports its buffered writes as full
        # until the handshake, which needs reading, is done.)
        self._output_blocked = full
        if not full and not self._pumping:
            self._holding += 1
            try:
                self._pump()
            finally:
                self._release_output()

    def _write(self, data: bytes) -> None:
        """Write ``data`` (a reply), held back while input is being handled (see the module docstring)."""
        if self._held_octets + len(data) > MAX_HELD_OUTPUT:
            self._flush()
        self._held.append(data)
        self._held_octets += len(data)
        if not self._holding:
            self._flush()

    def _flush(self) -> None:
        """Write the held replies now, in one write."""
        if self._held:
            data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
            self._held.clear()
            self._held_octets = 0
            self.transport.write(data)  # type: ignore[union-attr]

    def _release_output(self) -> None:
        """The end of one round of input handling: write what it held, unless a command is waiting with more
        pipelined input behind it (its answer's round writes them all)."""
        self._holding -= 1
        if not self._holding and not (self._busy and self._in):
            self._flush()

    # Input

    def dataReceived(self, data: bytes) -> None:
        if self._mode is CLOSED:
            return
        self.resetTimeout()
        self._holding += 1
        try:
            if self._mode is DATA and not self._busy and not self._in:
                # The common case for message text: hand the chunk over without copying it into the buffer.
                self._feed_data(data)
            else:
                self._in += data
            self._pump()
        finally:
            self._release_output()

    def _discard_input(self) -> None:
        """Forget every byte received and not yet handled (STARTTLS: RFC 3207 §4.2)."""
        self._in.clear()
        self._discarding_line = False

    def _pump(self) -> None:
        """Handle buffered input until it runs out or a command has to wait."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self._busy and not self._output_blocked and self._mode is not CLOSED and self._in:
                if self._mode is DATA:
                    chunk = bytes(self._in)
                    self._in.clear()
                    self._feed_data(chunk)
                    continue
                discarding = self._discarding_line
                line = self._take_line()
                if (line is not None or discarding) and not self._discarding_line:
                    self._line_ended()
                if line is None:
                    break
                self._run(self._dispatch(line), counts=True)
        finally:
            self._pumping = False
        if self._stop_if_idle():
            return
        self._watch_line()
        self._flow_control()

    def _watch_line(self) -> None:
        """Give a command line the client has begun, and not finished, its deadline (commandTimeout, counted
        from its first byte, so dripping bytes never extend it). While a command of ours is waiting, nothing
        is counted: a line begun then gets its whole deadline once the reply is out."""
        in_progress = (self._mode is COMMAND or self._mode is SASL) and bool(
            self._in or self._discarding_line
        )
        if not in_progress:
            self._line_ended()
        elif self._line_timer is None and not self._busy:
            self._line_timer = self._clock.callLater(
                self._config.command_timeout / 1000.0, partial(self._timed_out, "commandTimeout")
            )

    def _line_ended(self) -> None:
        if self._line_timer is not None:
            if self._line_timer.active():
                self._line_timer.cancel()
            self._line_timer = None

    def _flow_control(self) -> None:
        if self._mode is CLOSED:
            return
        pending = len(self._in)
        if pending > 4 * MAX_PENDING_INPUT:
            # The transport kept delivering although paused: refuse to buffer more.
            self._close(TOO_MUCH_INPUT)
        elif pending > MAX_PENDING_INPUT and not self._paused:
            self._paused = True
            cast(IPushProducer, self.transport).pauseProducing()
        elif self._paused and pending <= MAX_PENDING_INPUT // 2 and not self._busy:
            self._paused = False
            cast(IPushProducer, self.transport).resumeProducing()

    def _line_limit(self) -> int:
        if self._mode is SASL:
            return MAX_ENCODED_RESPONSE + 2
        if self._in[: len(_AUTH_PREFIX)].upper() == _AUTH_PREFIX:
            return max(AUTH_LINE_LIMIT, self._config.max_command_line_length)
        return self._config.max_command_line_length

    def _take_line(self) -> bytes | Reply | None:
        """The next complete line (with its terminator), a Reply for an over-long one, or None (wait)."""
        buf = self._in
        if self._discarding_line:
            lf = buf.find(b"\n")
            if lf < 0:
                buf.clear()
                return None
            del buf[: lf + 1]
            self._discarding_line = False
            if not buf:
                return None
        limit = self._line_limit()
        lf = buf.find(b"\n", 0, limit)
        if lf >= 0:
            line = bytes(buf[: lf + 1])
            del buf[: lf + 1]
            return line
        if len(buf) < limit:
            return None
        # Over the limit: answer once now and drop the rest of this line, wherever its LF turns up.
        lf = buf.find(b"\n", limit)
        if lf < 0:
            buf.clear()
            self._discarding_line = True
        else:
            del buf[: lf + 1]
        return LINE_TOO_LONG

    # Running commands, one at a time

    def _run(self, work: Coroutine[Any, Any, Reply | None], *, counts: bool = False) -> None:
        """Run one command's coroutine; input waits until it has answered (synchronously or later)."""
        self._busy = True
        # Most commands answer without waiting on anything: run them straight through, and build a Deferred
        # only for those that await one (a check, AUTH, the queue).
        waiting = run_eagerly(work, partial(self._answered, counts=counts), self._internal_error)
        if waiting is None:
            return
        waiting.addErrback(self._answer_failed)
        if self._busy:
            # Our own wait (a check, AUTH, the queue) is not client idleness.
            self.setTimeout(None)

    def _answered(self, reply: Reply | None, counts: bool) -> None:
        was_waiting = self.timeOut is None
        self._busy = False
        if self._mode is CLOSED:
            return
        if was_waiting:
            self.setTimeout(self._config.socket_timeout / 1000.0)
        self._holding += 1
        try:
            if not self._reply(reply, counts):
                return
            if not self._pumping:
                self._pump()
        finally:
            self._release_output()

    def _answer_failed(self, failure: Failure) -> None:
        # Sending the reply itself broke (the transport is gone or broken): nothing left to answer.
        self._busy = False
        log.failure("Cannot answer SMTP client", failure, session_id=self.session.session_id)

    # DATA

    def _start_data(self, stream: DataStream) -> None:
        """Read what follows as message text into ``stream``, within dataTimeout and minDataRate."""
        self._stream = stream
        self._mode = DATA
        self._data_timer = self._clock.callLater(
            self._config.data_timeout / 1000.0, partial(self._timed_out, "dataTimeout")
        )
        if self._config.min_data_rate > 0:
            allowance = self._config.command_timeout / 1000.0
            self._data_deadline = self._clock.seconds() + allowance
            self._rate_timer = self._clock.callLater(allowance, self._check_data_rate)

    def _feed_data(self, chunk: bytes) -> None:
        stream = self._stream
        assert stream is not None
        self._count_data(len(chunk))
        # A failing spool does not raise here: it keeps its error for the end of the data (SpoolWriter), so
        # the stream stays in step with the client and the answer is a 451 after the final dot.
        end = stream.feed(chunk)
        if end < 0:
            return
        if end < len(chunk):
            self._in[0:0] = chunk[end:]
        self._stream = None
        self._mode = COMMAND
        for timer in (self._data_timer, self._rate_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._data_timer = self._rate_timer = None
        self._end_of_data(stream)

    def _count_data(self, octets: int) -> None:
        """minDataRate (Postfix's smtpd_min_data_rate): ``octets`` received move the transfer's deadline
        ``octets / minDataRate`` seconds later, never more than commandTimeout ahead, so a burst buys no idle
        time beyond that. The timer is only moved when it fires: no timer work per chunk."""
        if self._rate_timer is not None:
            config = self._config
            self._data_deadline = min(
                self._data_deadline + octets / config.min_data_rate,
                self._clock.seconds() + config.command_timeout / 1000.0,
            )

    def _check_data_rate(self) -> None:
        self._rate_timer = None
        if self._mode is not DATA:
            return
        left = self._data_deadline - self._clock.seconds()
        if left > 0:
            self._rate_timer = self._clock.callLater(left, self._check_data_rate)
            return
        self._timed_out("minDataRate")

    def _cancel_input_timers(self) -> None:
        """Cancel the command line's deadline and the DATA transfer's timers (the session is ending)."""
        for timer in (self._data_timer, self._line_timer, self._rate_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._data_timer = self._line_timer = self._rate_timer = None


@implementer(IPushProducer)
class _OutputGate:
    """What a session registers with its transport as producer: the transport pauses it when its write
    buffer is full and resumes it when that has drained (``FileDescriptor`` and the TLS layer do)."""

    __slots__ = ("_receiver",)

    def __init__(self, receiver: CommandReceiver) -> None:
        self._receiver = receiver

    def pauseProducing(self) -> None:
        self._receiver._output_full(True)

    def resumeProducing(self) -> None:
        self._receiver._output_full(False)

    def stopProducing(self) -> None:
        """The connection is going away; connectionLost ends the session."""

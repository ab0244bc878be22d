"""Message text on its way out: SMTP transparency (RFC 5321 §4.5.2) for a body read in chunks, and a push
producer that streams a file through it into a transport with flow control.

What a caller may rely on (:class:`DotStuffer`):

- NUL octets are dropped, before anything else. Ingress refuses messages holding one (a server downstream that
  drops NULs would read ``<CRLF>NUL.<CRLF>`` as the end of the data: SMTP smuggling), but a message queued
  before that check, or by another writer of a shared queue, may still hold one; without them every receiver
  reads the same lines, and a dot that a NUL hid is stuffed like any other.
- Line endings are normalised to CRLF: a bare LF and a bare CR each become CRLF; a CRLF stays one CRLF even
  when a chunk ends between its CR and its LF (a trailing CR is held back until the next chunk or
  :meth:`~DotStuffer.finish` shows what follows it). The output never holds a bare CR, a bare LF or a NUL.
- A ``.`` at the start of any line is doubled: the first line, a line after a CRLF inside a chunk, and a
  line that starts exactly at a chunk boundary. So ``CRLF.CRLF`` never occurs before the end.
- :meth:`~DotStuffer.finish` ends the text with ``CRLF.CRLF`` (adding the CRLF when the body does not end
  with a line break; an empty body gives ``.CRLF``, the line break being the one after ``DATA``).
- The output is the same for every way of cutting the input into chunks.

Why not twisted.mail's sender: it does not stuff the first line nor a line that begins a new chunk, and turns
every CRLF into CR CR LF (docs/decisions.md; reproduced in tests/test_twisted_mail_defects.py).
"""

from __future__ import annotations

from typing import BinaryIO

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

CRLF = b"\r\n"
END_OF_DATA = b".\r\n"
#: Octets read from the body file at a time.
CHUNK_SIZE = 64 * 1024
#: Chunks written per reactor turn when the consumer does not push back, so a fast disk and a transport that
#: buffers without pausing (a test transport, a TLS layer still handshaking) never hold the reactor for long.
CHUNKS_PER_TURN = 16


class DotStuffer:
    """A streaming SMTP transparency encoder. Call :meth:`encode` for each chunk, then :meth:`finish` once."""

    def __init__(self) -> None:
        # True when the output so far ends a line (or nothing was output): a leading "." must be doubled.
        self._at_line_start = True
        # The last chunk ended in CR: it is a line break either way, but a LF at the start of the next chunk
        # belongs to it.
        self._held_cr = False
        self._finished = False

    def encode(self, chunk: bytes) -> bytes:
        """The transparent form of ``chunk`` (possibly shorter by a held-back trailing CR)."""
        if self._finished:
            raise ValueError("DotStuffer.encode after finish")
        if b"\x00" in chunk:
            chunk = chunk.replace(b"\x00", b"")
        if not chunk:
            return b""
        if self._held_cr:
            chunk = b"\r" + chunk
        self._held_cr = chunk.endswith(b"\r")
        if self._held_cr:
            chunk = chunk[:-1]
        # Counted by what a replace() removes: it runs on memchr(), bytes.count() of one octet does not.
        newlines = len(chunk) - len(chunk.replace(b"\n", b""))
        returns = len(chunk) - len(chunk.replace(b"\r", b""))
        if returns != newlines or (newlines and chunk.count(b"\r\n") != newlines):
            # A bare CR or LF (rare: ingress refuses them). CRLF first, so every CR left is bare; then each
            # line break is one LF, and all become CRLF.
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
            newlines = 1
        # Line endings are all CRLF now (counted: no copy when they already were); stuff in one pass.
        if newlines:
            chunk = chunk.replace(b"\r\n.", b"\r\n..")
        if self._at_line_start and chunk.startswith(b"."):
            chunk = b"." + chunk
        if chunk:
            self._at_line_start = chunk.endswith(b"\r\n")
        return chunk

    def finish(self) -> bytes:
        """The end: a held-back line break or a CRLF ending an unfinished last line, then ``.CRLF``."""
        if self._finished:
            raise ValueError("DotStuffer.finish called twice")
        self._finished = True
        # A held-back CR is a line break still owed; an unfinished last line needs one before the dot.
        tail = CRLF if self._held_cr or not self._at_line_start else b""
        return tail + END_OF_DATA


class ProducerStopped(ConnectionLost):
    """The consumer went away (``stopProducing``) before the body was fully written."""


@implementer(IPushProducer)
class StuffedBodyProducer:
    """Writes ``body`` (from its current position to EOF), dot-stuffed and terminated, to ``consumer``.

    It registers itself as a streaming producer: while the consumer is paused nothing is read from ``body``,
    so at most one chunk (:data:`CHUNK_SIZE`) is held here and the transport buffers only up to its own limit.
    :meth:`start` returns a Deferred that fires with the octets written once the terminator is written, or
    fails with the ``OSError`` of a failed read or with :class:`ProducerStopped`; either way the producer is
    unregistered and reads no more.
    """

    def __init__(
        self,
        body: BinaryIO,
        consumer: IConsumer,
        *,
        clock: IReactorTime,
        chunk_size: int = CHUNK_SIZE,
        chunks_per_turn: int = CHUNKS_PER_TURN,
    ) -> None:
        self._body = body
        self._consumer = consumer
        self._clock = clock
        self._chunk_size = chunk_size
        self._chunks_per_turn = chunks_per_turn
        self._stuffer = DotStuffer()
        self._done: Deferred[int] = Deferred()
        self._paused = False
        self._finished = False
        self._producing = False
        self._next_turn: IDelayedCall | None = None
        #: What the read after a short one returned (read ahead to see the end), not yet encoded.
        self._ahead: bytes | None = None
        #: Octets handed to the consumer so far (the stuffed form, terminator included at the end).
        self.octets = 0

    def start(self) -> Deferred[int]:
        self._consumer.registerProducer(self, True)
        self._produce()
        return self._done

    def pauseProducing(self) -> None:
        self._paused = True
        self._cancel_turn()

    def resumeProducing(self) -> None:
        if self._finished:
            return
        self._paused = False
        # A consumer may resume us from inside our own write: the running loop then simply carries on.
        if not self._producing and self._next_turn is None:
            self._produce()

    def stopProducing(self) -> None:
        if not self._finished:
            self._finish(Failure(ProducerStopped()))

    def _produce(self) -> None:
        self._next_turn = None
        self._producing = True
        try:
            for _ in range(self._chunks_per_turn):
                if self._paused or self._finished:
                    return
                try:
                    chunk = self._body.read(self._chunk_size) if self._ahead is None else self._ahead
                    self._ahead = None
                    if 0 < len(chunk) < self._chunk_size:
                        # A short read is usually the last: look, so the end goes out with the text.
                        self._ahead = self._body.read(self._chunk_size)
                except OSError:
                    self._finish(Failure())
                    return
                if not chunk:
                    self._write(self._stuffer.finish())
                    self._finish(None)
                    return
                text = self._stuffer.encode(chunk)
                if self._ahead == b"":
                    # The text and its terminator in one write (one send()).
                    self._write(text + self._stuffer.finish())
                    self._finish(None)
                    return
                self._write(text)
            if not self._paused and not self._finished:
                self._next_turn = self._clock.callLater(0, self._produce)
        finally:
            self._producing = False

    def _write(self, data: bytes) -> None:
        if data:
            self.octets += len(data)
            self._consumer.write(data)

    def _cancel_turn(self) -> None:
        if self._next_turn is not None and self._next_turn.active():
            self._next_turn.cancel()
        self._next_turn = None

    def _finish(self, failure: Failure | None) -> None:
        self._finished = True
        self._cancel_turn()
        self._consumer.unregisterProducer()
        if failure is None:
            self._done.callback(self.octets)
        else:
            self._done.errback(failure)

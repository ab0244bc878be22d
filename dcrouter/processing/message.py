"""What the processing stages work on and what they report.

A :class:`Draft` is one received message on its way through the chain: the envelope (a copy stages may
change), the top-level :class:`~dcrouter.mail.headers.HeaderBlock`, the MIME metadata, and where the
body bytes are. The received file is never changed: a header-only change keeps the new block apart and the
queue stores it with the original file and the offset of its body (``QueueItem.head``/``body_offset``), so
the body is not copied; a body rewrite (an attachment removed, a footer) writes a new body file.
"""

from __future__ import annotations

import enum
import io
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

from twisted.internet.defer import Deferred

from dcrouter.mail.acceptance import Refusal as Refusal  # re-exported: plugins raise it from here
from dcrouter.mail.envelope import Envelope
from dcrouter.mail.headers import HeaderBlock
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.processing.mime import MessageInfo
from dcrouter.queue.files import message_reader

T = TypeVar("T")
#: Runs a blocking callable off the reactor thread; the Deferred fires on the reactor thread.
RunInThread = Callable[[Callable[[], Any]], Deferred]


class Verdict(str, enum.Enum):
    CLEAN = "clean"
    SPAM = "spam"
    VIRUS = "virus"
    BLOCKED = "blocked"  # a policy hit: a refused attachment type, a plugin's own rule
    UNSCANNABLE = "unscannable"  # the scanner could not see all of it (limits, a zip bomb): never clean


@dataclass(frozen=True)
class ScanResult:
    """One scanner's finding. ``reason`` is short and safe to put in an SMTP reply (a signature name, an
    attachment name, a score); ``headers`` are added when the configured action is ``tag`` (SpamAssassin-style
    status fields are added for clean results too)."""

    scanner: str
    verdict: Verdict
    reason: str = ""
    score: float | None = None
    threshold: float | None = None
    headers: tuple[tuple[str, str], ...] = ()
    #: The action this finding asks for instead of the stage's own (a scanner whose policy depends on what
    #: it found, as verification does with a domain's DMARC policy); None: the stage's.
    action: str | None = None
    #: Fields named in ``headers`` that arrived with the message are removed before those are added, except
    #: the ones ``keep(name, value)`` holds for; None: all are removed.
    keep: Callable[[str, str], bool] | None = None
    #: Add ``headers`` above every other field (trace fields such as Authentication-Results), not at the end.
    on_top: bool = False

    @property
    def hit(self) -> bool:
        return self.verdict is not Verdict.CLEAN


class ScannerUnavailable(Exception):
    """A scanner cannot give a verdict now (its daemon is down, timed out, answered nonsense): temporary."""


class Discarded(Exception):
    """The message was accepted and dropped on purpose (a ``discard`` action): ingress answers 250 as if it
    had been queued, so the sender cannot tell."""

    def __init__(self, queue_id: str, reason: str) -> None:
        super().__init__(f"{queue_id} discarded: {reason}")
        self.queue_id = queue_id
        self.reason = reason


@dataclass
class Draft:
    """A message in processing. Stages change ``envelope``, ``headers`` and (through :meth:`rewrite_body`)
    the body; :meth:`finish` hands the result to the queue."""

    queue_id: str
    envelope: Envelope
    source: SpooledMessage  # as received; never changed
    headers: HeaderBlock
    body_offset: int  # where the body starts in ``source``
    run_in_thread: RunInThread
    spool_directory: str | None = None  # where rewritten bodies go (None: kept in memory)
    info: MessageInfo | None = None
    results: list[ScanResult] = field(default_factory=list)
    #: A rewritten body (from byte 0), when a stage replaced it.
    _body: SpooledMessage | None = None
    #: Files a body rewrite in a thread is writing, and whether the draft was discarded meanwhile: a rewrite
    #: whose Deferred was cancelled (processingTimeout) finishes in its thread with nobody to take the file.
    _writing: set[str] = field(default_factory=set)
    _discarded: bool = False

    @property
    def body_changed(self) -> bool:
        return self._body is not None

    @property
    def changed(self) -> bool:
        return self.headers.changed or self._body is not None

    @property
    def size(self) -> int:
        """Bytes of the message as it stands."""
        if not self.changed:
            return self.source.size
        body = self._body.size if self._body is not None else self.source.size - self.body_offset
        return len(self.headers.to_bytes()) + body

    def open_received(self) -> BinaryIO:
        """The message exactly as received (scanners look at this)."""
        return self.source.open()

    def open_body(self) -> BinaryIO:
        """The body as it stands, positioned at its first byte. Blocking I/O: in a thread for big messages."""
        if self._body is not None:
            return self._body.open()
        stream = self.source.open()
        stream.seek(self.body_offset)
        return stream

    def open_message(self) -> BinaryIO:
        """The message as it stands: the header block, then the body. Blocking I/O, as :meth:`open_body`."""
        if not self.changed:
            return self.source.open()
        if self._body is not None:
            return message_reader(self.headers.to_bytes(), self._body.open(), 0)
        return message_reader(self.headers.to_bytes(), self.source.open(), self.body_offset)

    def rewrite_body(self, rewrite: Callable[[HeaderBlock, BinaryIO, BinaryIO], bool]) -> Deferred:
        """Run ``rewrite(headers, body_in, body_out)`` in a thread; when it returns True its output becomes
        the body (it may also change ``headers``, e.g. the top-level Content-Type). Deferred firing with that
        bool. The old rewritten body, if any, is dropped; the received file stays as it is."""

        path = None
        if self.spool_directory is not None:
            # Named here, on the reactor thread, so that discard() can remove it whatever the thread is at.
            path = os.path.join(self.spool_directory, "spool-" + secrets.token_hex(12))
            self._writing.add(path)

        def work() -> SpooledMessage | None:
            changed = False
            if self._discarded:
                return None  # cancelled before the thread got to it: the source may be gone already
            if path is None:
                out: BinaryIO = io.BytesIO()
            else:
                out = open(path, "xb")  # noqa: SIM115 (closed below on every path)
            try:
                with self.open_body() as body_in:
                    changed = rewrite(self.headers, body_in, out)
                if not changed:
                    return None
                if path is None:
                    assert isinstance(out, io.BytesIO)
                    data = out.getvalue()
                    return SpooledMessage(len(data), data=data)
                size = out.tell()
                return SpooledMessage(size, path=path)
            finally:
                out.close()
                if path is not None and (not changed or self._discarded):
                    _remove(path)

        def done(new: SpooledMessage | None) -> bool:
            if path is not None:
                self._writing.discard(path)
            if new is None:
                return False
            if self._body is not None:
                self._body.discard()
            self._body = new
            self.headers.changed = True
            return True

        return self.run_in_thread(work).addCallback(done)

    def finish(self) -> tuple[SpooledMessage, bytes | None, int]:
        """What the queue stores: the body file, the header block that goes before it (None when nothing
        changed) and the offset in the file where the stored message's body starts. Ownership of the files
        passes to the caller; the draft must not be used after."""
        if self._body is not None:
            self.source.discard()
            body, self._body = self._body, None
            return body, self.headers.to_bytes(), 0
        if self.headers.changed:
            return self.source, self.headers.to_bytes(), self.body_offset
        return self.source, None, 0

    def discard(self) -> None:
        """Drop the files of a message that will not be queued, including one a cancelled rewrite is still
        writing (its thread removes it too, if it finishes later)."""
        self._discarded = True
        for path in self._writing:
            _remove(path)
        self._writing.clear()
        if self._body is not None:
            self._body.discard()
            self._body = None
        self.source.discard()


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

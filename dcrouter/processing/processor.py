"""EmailProcessor: what happens to a received message between the end of DATA and the reply.

The chain is: metadata (the header block and the MIME structure, read off the reactor thread) → scanning
(``scanners``, each hit handled by its action) → transformations (in configured order) → DKIM signing (last,
over the bytes that will be relayed) → the queue. It runs before the 250, so a refusal is an SMTP reply to
the client, never a bounce to a possibly forged sender. Routing is decided at delivery time
(docs/decisions.md), by :mod:`dcrouter.delivery.routing`.

With no scanner, transformation or signing configured, a message goes straight to the queue (the fast path:
no header parsing, no thread hop). At most ``maxParallelProcessing`` messages are in the chain at once (more:
``451 4.3.2``), and the chain before the queue is bounded by ``processingTimeout`` (``451 4.4.1``); the
enqueue itself is never cut short, since the queue may already be committing it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from dcrouter.events import NO_EVENTS, EventBus
from dcrouter.interfaces import (
    IDeliveryQueue,
    IMessageAcceptor,
    IScanner,
    ITransformation,
    QueueFull,
    QueueUnavailable,
)
from dcrouter.log import logger
from dcrouter.mail.acceptance import LOCAL_ERROR, QUEUE_FULL, Accepted, Disposition
from dcrouter.mail.envelope import Envelope
from dcrouter.mail.headers import HeaderBlock, HeaderError, HeaderTooLarge, read_header_block
from dcrouter.mail.queueid import new_queue_id
from dcrouter.mail.reply import Reply
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.net.reactor import IRouterReactor
from dcrouter.processing.archive import ArchiveWorkExceeded, WorkBudget
from dcrouter.processing.message import (
    Discarded,
    Draft,
    Refusal,
    ScannerUnavailable,
    ScanResult,
    Verdict,
)
from dcrouter.processing.mime import MimeLimits, inspect_message
from dcrouter.queue import quarantine
from dcrouter.queue.item import Priority, QueueItem, QueueItemStatus

log = logger(__name__)

BUSY = Reply(451, "4.3.2", "Too many messages in processing, try again later")
TIMED_OUT = Reply(451, "4.4.1", "Processing the message took too long, try again later")
HEADER_TOO_LARGE = Reply(552, "5.3.4", "Message header too large")
DEFAULT_LIMITS = MimeLimits()
#: Messages up to this size are inspected and signed on the reactor thread (see EmailProcessor._runner).
INLINE_BYTES = 64 * 1024
#: Bytes that listing the archives of such a message may decompress on the reactor thread (a few
#: milliseconds); a small message whose archives hold more (a nested zip, a tar.gz) is inspected again in the
#: thread pool, since a 64 KiB message can hold archives that expand to many megabytes.
INLINE_ARCHIVE_BYTES = 1024 * 1024


class ScannerStage:
    """A scanner with what to do about its findings (``action``, ``onError``, ``onUnscannable``); built-in
    scanners are built from ``ScannerConfig`` by :mod:`dcrouter.processing.build`."""

    def __init__(
        self,
        scanner: IScanner,
        action: str = "reject",
        *,
        on_error: str = "tempfail",
        on_unscannable: str | None = None,
        subject_prefix: str | None = None,
        name: str | None = None,
        timeout: float | None = None,
    ) -> None:
        self.scanner = scanner
        self.action = action
        self.on_error = on_error
        self.on_unscannable = on_unscannable or "action"
        self.subject_prefix = subject_prefix
        self._name = name
        #: Seconds the scan may take before the scanner counts as unavailable (None: only processingTimeout).
        self.timeout = timeout

    @property
    def name(self) -> str:
        return self._name or str(self.scanner.name)


@implementer(IMessageAcceptor)
class EmailProcessor:
    """Takes a complete message from ingress and returns a Deferred firing with the durable QueueItem.

    The Deferred fails with :class:`~dcrouter.processing.message.Refusal` (its ``reply`` is what the client
    is told), :class:`~dcrouter.processing.message.Discarded` (answer 250; nothing was queued) or
    :class:`dcrouter.interfaces.QueueError` (temporary: 4xx). ``on_queued``, when set, is called with each
    item once it is durable (delivery uses it to start at once instead of at its next periodic look).
    """

    def __init__(
        self,
        queue: IDeliveryQueue,
        clock_seconds: Callable[[], float],
        *,
        reactor: IRouterReactor | None = None,
        threadpool: ThreadPool | None = None,
        scanners: Iterable[ScannerStage] = (),
        transformations: Iterable[ITransformation] = (),
        signers: Iterable[ITransformation] = (),
        limits: MimeLimits = DEFAULT_LIMITS,
        max_parallel: int = 64,
        timeout: float = 120.0,
        events: EventBus = NO_EVENTS,
    ) -> None:
        self._queue = queue
        #: Where message.processed/queued/scanned and error.processing go (dcrouter.events).
        self.events = events
        self._now = clock_seconds
        self._reactor = reactor
        self._threadpool = threadpool
        self._scanners = list(scanners)
        self._transformations = list(transformations)
        self._signers = list(signers)
        self._limits = limits
        self._max_parallel = max_parallel
        self._timeout = timeout
        self._active = 0
        self.on_queued: Callable[[QueueItem], object] | None = None
        #: When set, the ``destination`` each message is queued with (the route of its first recipient:
        #: delivery's claims share slots between destinations by it from the first attempt on).
        self.destination_of: Callable[[Envelope], str | None] | None = None
        self.stats = {"processed": 0, "refused": 0, "discarded": 0, "quarantined": 0, "tempfailed": 0}

    # -- configuration --

    def update_options(
        self,
        *,
        scanners: Iterable[ScannerStage] | None = None,
        transformations: Iterable[ITransformation] | None = None,
        signers: Iterable[ITransformation] | None = None,
        limits: MimeLimits | None = None,
        max_parallel: int | None = None,
        timeout: float | None = None,
    ) -> None:
        """Replace parts of the chain; messages already in it finish with what they started with."""
        if scanners is not None:
            self._scanners = list(scanners)
        if transformations is not None:
            self._transformations = list(transformations)
        if signers is not None:
            self._signers = list(signers)
        if limits is not None:
            self._limits = limits
        if max_parallel is not None:
            self._max_parallel = max_parallel
        if timeout is not None:
            self._timeout = timeout

    def add_scanner(self, scanner: IScanner | ScannerStage, action: str = "reject") -> None:
        stage = scanner if isinstance(scanner, ScannerStage) else ScannerStage(scanner, action)
        self._scanners = [*self._scanners, stage]

    def add_transformation(self, transformation: ITransformation) -> None:
        self._transformations = [*self._transformations, transformation]

    @property
    def active(self) -> int:
        """Messages in the chain now."""
        return self._active

    def _has_stages(self) -> bool:
        return bool(self._scanners or self._transformations or self._signers)

    # -- the chain --

    def accept(self, envelope: Envelope, message: SpooledMessage, queue_id: str) -> Deferred[Accepted]:
        """:class:`~dcrouter.interfaces.IMessageAcceptor`: process and queue one message from ingress. Every
        refusal, the queue's included, is a :class:`Refusal` carrying the reply to send."""
        return Deferred.fromCoroutine(self._accept(envelope, message, queue_id))

    async def _accept(self, envelope: Envelope, message: SpooledMessage, queue_id: str) -> Accepted:
        try:
            item: QueueItem = await self.process(envelope, message, queue_id)
        except Discarded as discarded:
            return Accepted(discarded.queue_id, Disposition.DISCARDED, discarded.reason)
        except QueueFull as error:
            raise Refusal(QUEUE_FULL, str(error) or "maxQueueSize") from error
        except (QueueUnavailable, OSError) as error:
            # A store that cannot take the message (disk full, Redis down): an operating condition.
            raise Refusal(LOCAL_ERROR, str(error) or type(error).__name__, storage=True) from error
        if item.status is QueueItemStatus.QUARANTINED:
            return Accepted(item.id, Disposition.QUARANTINED, item.last_error or "")
        return Accepted(item.id)

    def submit_local(
        self, envelope: Envelope, message: SpooledMessage, queue_id: str, *, priority: int
    ) -> Deferred[QueueItem]:
        """Queue the gateway's own mail (its DSNs): no scanning and no transformations, but the envelope
        changes that apply to such mail (an SRS reversal). Fails with DuplicateItem when ``queue_id`` is
        queued already."""
        return Deferred.fromCoroutine(self._process_local(envelope, message, queue_id, priority))

    def process(
        self,
        envelope: Envelope,
        message: SpooledMessage,
        queue_id: str | None = None,
        *,
        priority: int = Priority.FRESH,
    ) -> Deferred:
        """Process and queue one message; a Deferred firing with the durable QueueItem (see the class)."""
        queue_id = queue_id or new_queue_id()
        if not self._has_stages():
            return self._enqueue(queue_id, envelope, message, None, 0, priority, None)
        if self._active >= self._max_parallel:
            self.stats["tempfailed"] += 1
            return _failed(Refusal(BUSY, "maxParallelProcessing"))
        self._active += 1
        done = Deferred.fromCoroutine(self.process_email(envelope, message, queue_id, priority))

        def release(result: object) -> object:
            self._active -= 1
            return result

        return done.addBoth(release)

    async def process_email(
        self, envelope: Envelope, message: SpooledMessage, queue_id: str, priority: int = Priority.FRESH
    ) -> QueueItem:
        """Run every stage, then queue. The message's files are owned by this call from here on."""
        draft: Draft | None = None
        started = self._now()
        timings: dict[str, float] = {}
        try:
            staged = Deferred.fromCoroutine(self._stages(envelope, message, queue_id, timings))
            if self._reactor is not None and self._timeout:
                staged.addTimeout(self._timeout, self._reactor)
            draft, quarantine = await staged
        except Exception as error:
            if draft is not None:
                draft.discard()
            else:
                message.discard()
            refusal = self._refusal_for(error, queue_id)
            outcome = "discarded" if isinstance(refusal, Discarded) else "refused"
            if isinstance(refusal, Refusal) and refusal.reply.is_temporary:
                outcome = "tempfailed"
            self._processed(queue_id, outcome, started, timings)
            raise refusal from error
        stored, head, offset = draft.finish()
        envelope = draft.envelope
        self.stats["processed"] += 1
        self._processed(queue_id, "quarantined" if quarantine else "queued", started, timings)
        return await self._enqueue(queue_id, envelope, stored, head, offset, priority, quarantine)

    def _processed(self, queue_id: str, outcome: str, started: float, timings: dict[str, float]) -> None:
        if self.events.wants("message.processed"):
            self.events.emit(
                "message.processed",
                queue_id=queue_id,
                outcome=outcome,
                duration=max(0.0, self._now() - started),
                stages=dict(timings),
            )

    async def _process_local(
        self, envelope: Envelope, message: SpooledMessage, queue_id: str, priority: int
    ) -> QueueItem:
        """The gateway's own mail (DSNs): no scanning and no changes, except the envelope transformations that
        apply to it (``applies_to_local_mail``: a DSN to an SRS address goes to the address it stands for)."""
        changes = [t for t in self._transformations if getattr(t, "applies_to_local_mail", False)]
        if changes:
            draft = Draft(
                queue_id=queue_id,
                envelope=_copy_envelope(envelope),
                source=message,
                headers=HeaderBlock([]),
                body_offset=0,
                run_in_thread=maybeDeferred,
            )
            try:
                for change in changes:
                    await maybeDeferred(change.apply, draft)
                envelope = draft.envelope
            except Refusal as e:
                # A bounce to a forged or expired SRS address: sent as addressed rather than lost.
                log.info("{queue_id}: {reason}; sent as addressed", queue_id=queue_id, reason=e.reason)
        queued: QueueItem = await self._enqueue(
            queue_id, envelope, message, None, 0, priority, None, local=True
        )
        return queued

    async def _stages(
        self, envelope: Envelope, message: SpooledMessage, queue_id: str, timings: dict[str, float]
    ) -> tuple[Draft, str | None]:
        mark = self._now()
        draft = await self.extract_metadata(envelope, message, queue_id)
        timings["metadata"] = self._now() - mark
        try:
            quarantine = await self.scan_content(draft, timings)
            await self.apply_transformations(draft, timings)
            await self._sign(draft, timings)
        except BaseException:
            draft.discard()
            raise
        return draft, quarantine

    def _refusal_for(self, error: Exception, queue_id: str) -> Exception:
        if isinstance(error, Refusal | Discarded):
            key = "discarded" if isinstance(error, Discarded) else "refused"
            self.stats[key] += 1
            return error
        # Deferred.addTimeout fails with twisted's own TimeoutError, which is not the built-in one.
        if isinstance(error, CancelledError | DeferredTimeout | TimeoutError):
            self.stats["tempfailed"] += 1
            log.warn("{queue_id}: processing timed out", queue_id=queue_id)
            self.events.emit("error.processing", queue_id=queue_id, reason="processingTimeout")
            return Refusal(TIMED_OUT, "processingTimeout")
        log.failure("{queue_id}: processing failed", Failure(error), queue_id=queue_id)
        self.events.emit("error.processing", queue_id=queue_id, reason=type(error).__name__)
        self.stats["tempfailed"] += 1
        return Refusal(Reply(451, "4.3.0", "Local error in processing, try again later"), "error")

    # -- stages --

    def _runner(self, size: int) -> Callable[[Callable[[], Any]], Deferred]:
        """How a message's blocking work runs: in the thread pool, or inline when the message is at most
        :data:`INLINE_BYTES`. For a 10 KB message the chain's work (inspection, signing) takes less than a
        millisecond, less than the thread hops and GIL hand-overs it would cost (bench/processing)."""
        if size <= INLINE_BYTES:
            return maybeDeferred
        return self._in_thread

    def _in_thread(self, work: Callable[[], Any]) -> Deferred:
        if self._reactor is None or self._threadpool is None:
            # Unit tests without a reactor: run inline (the tests' messages are small).
            return maybeDeferred(work)
        return deferToThreadPool(self._reactor, self._threadpool, work)

    async def extract_metadata(self, envelope: Envelope, message: SpooledMessage, queue_id: str) -> Draft:
        """The header block and the MIME structure, read from the spool in a thread (one pass for
        the header block, one for the structure); a message of at most :data:`INLINE_BYTES` on the reactor
        thread, unless its archives would decompress more than :data:`INLINE_ARCHIVE_BYTES`, when it is read
        again in the thread. A header block over ``maxHeaderBytes`` is refused (552 5.3.4)."""
        limits = self._limits

        def work(budget: WorkBudget | None) -> tuple[HeaderBlock, int, Any]:
            with message.open() as stream:
                try:
                    headers, offset = read_header_block(stream, limits.max_header_bytes)
                except HeaderTooLarge:
                    raise
                except HeaderError:
                    # Not a header block at all: the whole message is body; added fields go on top.
                    headers, offset = HeaderBlock([], True), 0
                stream.seek(0)
                info = inspect_message(stream, limits, budget=budget)
            return headers, offset, info

        inline = message.size <= INLINE_BYTES
        try:
            try:
                budget = WorkBudget(INLINE_ARCHIVE_BYTES) if inline else None
                headers, offset, info = await self._runner(message.size)(lambda: work(budget))
            except ArchiveWorkExceeded:
                headers, offset, info = await self._in_thread(lambda: work(None))
        except HeaderTooLarge as e:
            raise Refusal(HEADER_TOO_LARGE, str(e)) from e
        return Draft(
            queue_id=queue_id,
            envelope=_copy_envelope(envelope),
            source=message,
            headers=headers,
            body_offset=offset,
            run_in_thread=self._runner(message.size),
            spool_directory=getattr(self._queue, "spool_directory", None),
            info=info,
        )

    async def scan_content(self, draft: Draft, timings: dict[str, float] | None = None) -> str | None:
        """Run the scanners in order. Returns the reason to quarantine, or None; raises Refusal or
        Discarded. A clean result, or a hit whose action is tag, adds the scanner's headers; fields of those
        names that the message came with are removed first (a sender must not pre-label its own mail)."""
        for stage in self._scanners:
            mark = self._now()
            try:
                scanning = maybeDeferred(stage.scanner.scan, draft)
                if stage.timeout and self._reactor is not None:
                    scanning.addTimeout(stage.timeout, self._reactor)
                try:
                    result: ScanResult = await scanning
                except (DeferredTimeout, TimeoutError) as e:
                    # The stage's own timeout (addTimeout turns its cancellation into TimeoutError; the
                    # chain's processingTimeout cancels with CancelledError and is not caught here).
                    raise ScannerUnavailable(f"no verdict within {stage.timeout:g} s") from e
            except ScannerUnavailable as e:
                if stage.on_error == "accept":
                    log.warn(
                        "{queue_id}: scanner {scanner} unavailable, passed unscanned: {error}",
                        queue_id=draft.queue_id,
                        scanner=stage.name,
                        error=str(e),
                    )
                    continue
                log.warn(
                    "{queue_id}: scanner {scanner} unavailable: {error}",
                    queue_id=draft.queue_id,
                    scanner=stage.name,
                    error=str(e),
                )
                raise Refusal(
                    Reply(451, "4.7.0", f"Content scanner {stage.name} unavailable, try again later"), str(e)
                ) from e
            draft.results.append(result)
            action = result.action or stage.action
            if result.verdict is Verdict.UNSCANNABLE and stage.on_unscannable != "action":
                action = stage.on_unscannable
            if timings is not None:
                timings[f"scanner:{stage.name}"] = self._now() - mark
            self.events.emit(
                "message.scanned",
                queue_id=draft.queue_id,
                scanner=stage.name,
                verdict=result.verdict.value,
                action=action if result.hit else "pass",
            )
            if not result.hit:
                # Passed mail carries the scanner's status (X-Spam-Status: No, score=...; X-Virus-Status:
                # Clean), as SpamAssassin and amavis leave it, whatever the action on a hit would have been.
                _tag(draft, result, None)
                continue
            log.info(
                "{queue_id}: {scanner}: {verdict} ({reason}), action {action}",
                queue_id=draft.queue_id,
                scanner=stage.name,
                verdict=result.verdict.value,
                reason=result.reason,
                action=action,
            )
            if action == "accept":
                continue
            if action == "tempfail":
                raise Refusal(
                    Reply(451, "4.7.0", f"Message cannot be scanned now ({_safe(result.reason)})"),
                    "unscannable",
                )
            if action == "tag":
                _tag(draft, result, stage.subject_prefix)
                continue
            if action == "reject":
                raise Refusal(_rejection(result), result.reason)
            if action == "discard":
                raise Discarded(draft.queue_id, f"{stage.name}: {result.reason}")
            if action == "quarantine":
                return f"{stage.name}: {result.verdict.value} ({result.reason})"
        return None

    async def apply_transformations(self, draft: Draft, timings: dict[str, float] | None = None) -> None:
        """Each transformation in configured order; DKIM signing is not among them (it runs last)."""
        for transformation in self._transformations:
            mark = self._now()
            await maybeDeferred(transformation.apply, draft)
            if timings is not None:
                timings[f"transform:{_stage_name(transformation)}"] = self._now() - mark

    async def _sign(self, draft: Draft, timings: dict[str, float] | None = None) -> None:
        mark = self._now()
        for signer in self._signers:
            await maybeDeferred(signer.apply, draft)
        if timings is not None and self._signers:
            timings["dkim"] = self._now() - mark

    # -- queueing --

    def _enqueue(
        self,
        queue_id: str,
        envelope: Envelope,
        stored: SpooledMessage,
        head: bytes | None,
        offset: int,
        priority: int,
        quarantine: str | None,
        *,
        local: bool = False,
    ) -> Deferred:
        now = self._now()
        size = stored.size if head is None else len(head) + stored.size - offset
        item = QueueItem(
            id=queue_id,
            envelope=envelope,
            size=size,
            priority=priority,
            created_at=now,
            next_attempt_at=now,
            head=head,
            body_offset=offset,
            destination=None if self.destination_of is None else self.destination_of(envelope),
        )
        if quarantine is not None:
            item.status = QueueItemStatus.QUARANTINED
            item.last_error = quarantine
        queued = self._queue.enqueue(item, stored)
        if self.events.wants("message.queued"):
            queued.addCallback(self._report_queued, local)
        if quarantine is not None:
            self.stats["quarantined"] += 1
            queued.addCallback(self._quarantined)
        elif self.on_queued is not None:
            queued.addCallback(self._notify)
        return queued

    def _report_queued(self, item: QueueItem, local: bool) -> QueueItem:
        self.events.emit(
            "message.queued",
            queue_id=item.id,
            size=item.size,
            recipients=len(item.envelope.recipients),
            local=local,
            status=item.status.value,
        )
        return item

    def _quarantined(self, item: QueueItem) -> QueueItem:
        log.warn("{queue_id}: quarantined: {reason}", queue_id=item.id, reason=item.last_error)
        return item

    def _notify(self, item: QueueItem) -> QueueItem:
        assert self.on_queued is not None
        try:
            self.on_queued(item)
        except Exception:  # noqa: BLE001 (logged; a listener's bug must not fail a durable enqueue)
            # The message is durable whatever a listener does: never turn its 250 into an error.
            log.failure("on_queued listener failed for {queue_id}", queue_id=item.id)
        return item

    async def release(self, queue_id: str) -> QueueItem | None:
        """Release a quarantined message for delivery (None when there is no such quarantined message), as
        ``dcrouter quarantine release`` does (:func:`dcrouter.queue.quarantine.release`)."""
        try:
            released = await quarantine.release(self._queue, queue_id, self._now())
        except quarantine.NotQuarantined:
            return None
        log.info("{queue_id}: released from quarantine", queue_id=queue_id)
        if self.on_queued is not None:
            self._notify(released)
        return released


def _stage_name(transformation: ITransformation) -> str:
    return str(getattr(transformation, "name", None) or type(transformation).__name__)


def _copy_envelope(envelope: Envelope) -> Envelope:
    copy = Envelope.from_dict(dict(envelope.to_dict()))
    copy.recipients = list(envelope.recipients)
    copy.mail_params = dict(envelope.mail_params)
    return copy


def _failed(error: Exception) -> Deferred:
    d: Deferred = Deferred()
    d.errback(Failure(error))
    return d


def _safe(text: str, limit: int = 100) -> str:
    """Printable ASCII only, bounded: scanner findings go into SMTP replies."""
    cleaned = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    return cleaned[:limit]


def _rejection(result: ScanResult) -> Reply:
    reason = _safe(result.reason)
    if result.verdict is Verdict.VIRUS:
        return Reply(554, "5.7.1", f"Message refused: virus found ({reason})")
    if result.verdict is Verdict.SPAM:
        score = f"score {result.score:.1f}" if result.score is not None else reason
        return Reply(550, "5.7.1", f"Message refused as spam ({score})")
    if result.verdict is Verdict.UNSCANNABLE:
        return Reply(554, "5.7.1", f"Message refused: it cannot be scanned ({reason})")
    return Reply(550, "5.7.1", f"Message refused by policy ({reason})")


def _one_line(value: str) -> str:
    """A value safe to write into a header: CR, LF and NUL (which a plugin's finding or a received Subject
    may hold) become spaces rather than failing the message."""
    return _UNSAFE.sub(" ", value)


_UNSAFE = re.compile(r"[\r\n\x00]")


def _stale(keep: Callable[[str, str], bool], name: str, value: str) -> bool:
    return not keep(name, value)


def _tag(draft: Draft, result: ScanResult, subject_prefix: str | None) -> None:
    keep = result.keep
    for name in {name.lower() for name, _ in result.headers}:
        if keep is None:
            draft.headers.remove(name)
        else:
            draft.headers.remove_if(name, partial(_stale, keep, name))
    for name, value in reversed(result.headers) if result.on_top else result.headers:
        draft.headers.add(name, _one_line(value), top=result.on_top)
    if subject_prefix and result.hit:
        subject = draft.headers.get("Subject") or ""
        if not subject.startswith(subject_prefix.strip()):
            draft.headers.set("Subject", _one_line(subject_prefix + subject))

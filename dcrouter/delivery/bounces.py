"""Bouncer: builds the DSNs of queued messages (bounces and delay warnings) and queues them to the sender.

What a caller may rely on:

- **Ids.** A message's bounce is queued as ``<id>B`` and its delay warning as ``<id>W``
  (:func:`dsn_queue_id`), both with ``priority=BOUNCE``, from the null sender to the envelope sender, as
  local mail (no scanning or transformations). Queueing a DSN a second time (after a crash) finds the first
  one under the same id and counts as queued: at most one bounce and one warning per message.
- **Content.** A DSN (:mod:`dcrouter.delivery.dsn`) carries the original's header block only, as it is
  relayed (the header block processing wrote, if any), bounded by ``dsn.HEADERS_LIMIT``; when the body cannot
  be read it goes out without them. A delay warning says ``Will-Retry-Until`` (queued at + ``queueLifetime``).
- **Warnings.** :meth:`Bouncer.warning_due` is the rule: ``delayWarningAfter`` > 0, not warned yet, queued at
  least that long ago, and not from the null sender (which never gets a DSN).
- **What a DSN lists.** A :class:`DsnRequest` names the recipients and the reply to report for each; which
  DSN a message gets is decided by :mod:`dcrouter.delivery.transitions`, queued here by :meth:`Bouncer.send`.
- **Errors.** :meth:`Bouncer.send` raises when the DSN cannot be queued; counting and retrying are the
  caller's (:class:`dcrouter.delivery.manager.DeliveryManager`). After a DSN is newly queued the ``wake``
  callback runs, so delivery looks for it at once.

:func:`open_message` (a queued message as it is relayed) lives here because both delivery and a DSN's
original headers read a message that way.

Log events use the namespace ``dcrouter.delivery`` (as the manager's) and carry the message's ``queue_id``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from twisted.internet.defer import Deferred

from dcrouter.delivery.dsn import Action, build_dsn, read_header_block
from dcrouter.delivery.retry import RetryPolicy
from dcrouter.interfaces import DuplicateItem, IDeliveryQueue
from dcrouter.log import logger
from dcrouter.mail.envelope import Envelope
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.queue.files import message_reader
from dcrouter.queue.item import Priority, QueueItem

log = logger(__name__)

#: Queue ids are at most 64 characters; a DSN id adds one.
_MAX_BASE_ID = 63


def dsn_queue_id(item_id: str, action: Action) -> str:
    """The queue id of the bounce (``<id>B``) or the delay warning (``<id>W``) of message ``item_id``. An id
    too long for the suffix is replaced by a digest of it (ids are at most 64 characters)."""
    base = item_id
    if len(item_id) > _MAX_BASE_ID:
        base = hashlib.sha256(item_id.encode()).hexdigest()[:40].upper()
    return base + ("B" if action == "failed" else "W")


@dataclass(frozen=True)
class DsnRequest:
    """A DSN to queue for a message: ``action`` is "failed" (the bounce) or "delayed" (the delay warning);
    ``rows`` list its recipients, each ``(recipient, reply, target)``: the reply that decided (or the last
    error) and ``host:port`` of the server that gave it ("" when none did)."""

    action: Action
    rows: tuple[tuple[str, str, str], ...]


def open_message(queue: IDeliveryQueue, item: QueueItem) -> Deferred[BinaryIO]:
    """The message as it is relayed: the stored body, behind the header block processing wrote if any."""
    opened: Deferred[BinaryIO] = queue.open_body(item.id)
    if item.head is not None or item.body_offset:
        opened.addCallback(lambda stream: message_reader(item.head, stream, item.body_offset))
    return opened


class SubmitLocal(Protocol):
    """How a DSN is queued: ``EmailProcessor.submit_local`` (no scanning; the envelope changes that apply to
    the gateway's own mail, such as an SRS reversal). Fails with DuplicateItem when ``queue_id`` is queued."""

    def __call__(
        self, envelope: Envelope, message: SpooledMessage, queue_id: str, *, priority: int
    ) -> Deferred[QueueItem]: ...


class Bouncer:
    """Builds and queues the DSNs of one gateway; see the module docstring. ``delay_warning_after`` is in
    seconds (0: never warn); ``wake`` runs after a DSN is newly queued."""

    def __init__(
        self,
        *,
        queue: IDeliveryQueue,
        submit: SubmitLocal,
        hostname: str,
        policy: RetryPolicy,
        delay_warning_after: float,
        wake: Callable[[], None],
    ) -> None:
        self._queue = queue
        self._submit = submit
        self._hostname = hostname
        self.policy = policy
        self._delay_warning_after = delay_warning_after
        self._wake = wake

    def warning_due(self, item: QueueItem, now: float) -> bool:
        """Whether a deferral of ``item`` at ``now`` should warn its sender of the delay."""
        after = self._delay_warning_after
        if after <= 0 or item.warned_at is not None or now - item.created_at < after:
            return False
        return bool(item.envelope.mail_from)  # never a DSN to the null sender

    async def send(self, item: QueueItem, request: DsnRequest, now: float) -> str:
        """Queue the DSN ``request`` for ``item`` from the null sender to its sender; returns the DSN's queue
        id. Its id is derived from ``item.id``, so queueing it twice (after a crash) finds the first one."""
        action = request.action
        dsn_id = dsn_queue_id(item.id, action)
        headers = await self._original_headers(item)
        data = build_dsn(
            reporting_mta=self._hostname,
            original=item,
            failed=list(request.rows),
            action=action,
            headers_of_original=headers,
            arrival_date=item.envelope.received_at or item.created_at,
            message_id=f"{dsn_id}@{self._hostname}",
            now=now,
            will_retry_until=item.created_at + self.policy.lifetime if action == "delayed" else None,
        )
        envelope = Envelope(
            mail_from="", recipients=[item.envelope.mail_from], helo=self._hostname, received_at=now
        )
        try:
            await self._submit(
                envelope, SpooledMessage(len(data), data=data), dsn_id, priority=Priority.BOUNCE
            )
        except DuplicateItem:
            # Queued before a crash, under the same derived id: that one is the DSN.
            log.info("{queue_id}: DSN {dsn_id} was already queued", queue_id=item.id, dsn_id=dsn_id)
            return dsn_id
        log.info(
            "{queue_id}: DSN ({action}) queued as {dsn_id}", queue_id=item.id, action=action, dsn_id=dsn_id
        )
        self._wake()
        return dsn_id

    async def _original_headers(self, item: QueueItem) -> bytes:
        """The original's header block, bounded (``dsn.HEADERS_LIMIT``); b"" if the body cannot be read."""
        item_id = item.id
        try:
            stream = await open_message(self._queue, item)
        except Exception:  # noqa: BLE001 (a DSN without the headers is better than none)
            log.failure("cannot read the headers of {queue_id} for its DSN", queue_id=item_id)
            return b""
        try:
            # A bounded read (64 KiB at most) of a file the queue just opened: cheap enough for the reactor.
            return read_header_block(stream)
        finally:
            stream.close()

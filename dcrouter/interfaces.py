"""The extension points of dcrouter. Built-ins implement the same interfaces as third-party plugins."""

from __future__ import annotations

from dataclasses import dataclass

from zope.interface import Attribute, Interface


class QueueError(Exception):
    """A queue operation failed. ``temporary`` errors become 4xx replies at ingress, never 5xx."""

    temporary = True


class QueueFull(QueueError):
    """``maxQueueSize`` is reached (ingress answers ``452 4.3.1``)."""


class QueueUnavailable(QueueError):
    """The store cannot take the item now: disk full, I/O error, Redis down (ingress answers
    ``451 4.3.0``)."""


class ClaimLost(QueueUnavailable):
    """``open_body`` of an item this process claimed, when the queue can no longer vouch that the claim is
    still this process's (the Redis queue: its lease may have expired while Redis was unreachable, or was
    taken over). The caller must not deliver the item and should end the attempt without recording
    anything: the queue has let go of the claim, and the item returns to ready for whichever process
    claims it next."""


class DuplicateItem(ValueError):
    """``enqueue`` of an id the queue already holds. Callers that derive ids (bounces) rely on it to make
    queueing idempotent across crashes."""


class StatusMismatch(Exception):
    """``update_if`` or ``dequeue_if`` found the item in another status than the caller's guard; nothing was
    changed. ``item`` is the item as it is stored."""

    def __init__(self, item: object) -> None:
        status = getattr(item, "status", None)
        super().__init__(f"queue item {getattr(item, 'id', '?')} is {getattr(status, 'value', status)}")
        self.item = item


class HeldByOtherWorker(Exception):
    """A change only the process holding the item's part of the queue may make (a claim, a final status: a
    bounce) was asked of another process (the disk queue with workers: :mod:`dcrouter.queue.partitions`);
    nothing was changed. The API answers it with 409 ``held_by_other_worker``."""

    def __init__(self, item_id: str, partition: int, change: str) -> None:
        super().__init__(
            f"message {item_id} is in the queue partition of another worker (partition {partition}); "
            f"{change} is done only by the worker that holds it (claims and final outcomes are recorded by "
            "the worker that delivers the message). Hold or delete the message instead; with workers = 1 "
            "the one worker holds every partition"
        )
        self.item_id = item_id
        self.partition = partition


class IDeliveryQueue(Interface):
    """Durable storage of queued messages and their delivery state (the seed's DeliveryQueue, Python naming).

    Every method returning a Deferred may fail with :class:`QueueError`. ``enqueue``'s Deferred fires only
    once the message body and its envelope are durable (fsynced, or acknowledged by Redis): that is what
    allows ingress to answer 250.
    """

    def enqueue(item, message):
        """Store ``item`` (a QueueItem) with its body ``message`` (a SpooledMessage, consumed: the queue takes
        ownership of the spool file). Returns a Deferred firing with the stored QueueItem once durable; fails
        with DuplicateItem when the id is already queued."""

    def dequeue(item_id):
        """Remove the item and its body. Deferred firing with the removed QueueItem, or None if unknown."""

    def update(item_id, **changes):
        """Change fields of a stored item durably. Deferred firing with the updated QueueItem."""

    def update_if(item_id, expected, /, **changes):
        """``update``, only while the item's status is ``expected`` (a QueueItemStatus; positional, as
        ``status`` may be one of the ``changes``). The check and the change are one atomic step: no other
        writer, another process on the same store included, comes between them. Deferred firing with the
        updated QueueItem; fails with KeyError when the item is unknown and with StatusMismatch (nothing
        changed) when it is in another status."""

    def dequeue_if(item_id, expected):
        """``dequeue``, only while the item's status is ``expected``, in one atomic step. Deferred firing with
        the removed QueueItem, or None if unknown; fails with StatusMismatch (nothing removed) when the item
        is in another status."""

    def get_next(count=1, schedule=None):
        """Claim up to ``count`` due items (ready status, ``next_attempt_at <= now``), by priority then age,
        marking them DELIVERING. Deferred firing with a list of QueueItem. Returns [] while paused. With
        ``schedule`` (a :class:`dcrouter.queue.contract.ClaimSchedule`), the claim is shared between
        destinations: round robin over the destinations with due mail, each up to its limit."""

    def open_body(item_id):
        """Deferred firing with a readable binary file object over the stored body (caller closes it). The
        message as relayed is that body behind the item's ``head`` from ``body_offset`` on, when processing
        changed the header block (``dcrouter.queue.files.message_reader`` composes it). Fails with
        ClaimLost when the item was claimed by this process and that claim may no longer be valid."""

    def get(item_id):
        """Deferred firing with the QueueItem, or None."""

    def get_by_status(status):
        """Deferred firing with the list of items having ``status``."""

    def get_by_destination(destination):
        """Deferred firing with the list of items whose ``destination`` equals ``destination``."""

    def list_items(filter, limit, cursor=None):
        """One page of items matching ``filter`` (a :class:`dcrouter.queue.contract.QueueFilter`), newest
        first by arrival in the queue: a Deferred firing with an ``ItemPage`` (up to ``limit`` items, 1 to
        ``MAX_PAGE``, and ``next_cursor``: a string to pass as ``cursor`` for the next page, or None after
        the last). A backend may bound the work of one page (sender and recipient filters scan): the page is
        then short, even empty, while ``next_cursor`` is not None. Fails with ValueError for a bad limit or
        cursor (``contract.check_page``). Never holds the reactor: the stores page in the database on their
        reader thread or in bounded script calls."""

    def count_by_status():
        """Deferred firing with a dict: status value (``"queued"``, ``"held"``, ...) → number of items, every
        status present (0 when none)."""

    def count_by_destination():
        """Deferred firing with a :class:`dcrouter.queue.contract.DestinationCounts`: per destination, how
        many items are ``queued`` and ``deferred`` (``contract.DESTINATION_COUNT_STATUSES``), for the
        ``DESTINATION_COUNT_TOP`` destinations with most, the rest summed. Never holds the reactor: memory
        counts in Python, disk in one GROUP BY on its reader thread, Redis in bounded script calls (past
        their budget the counts are a lower bound, ``complete`` False)."""

    def get_item_count():
        """Deferred firing with the number of items not yet delivered, bounced or failed."""

    def status_summary():
        """Deferred firing with ``{status value: (count, oldest created_at or None)}`` for every status that
        has items (an index look-up, never a read of the items: metrics scrape it)."""

    def purge_expired(max_age):
        """Remove items older than ``max_age`` seconds in a final status. Deferred firing with the count."""

    def purge_all():
        """Remove every item. Deferred firing with the count removed."""

    def load():
        """Open the store and recover after a crash (claims in flight return to ready; half-written items are
        discarded; damaged ones set aside). Deferred firing with a dict of counts."""

    def save():
        """Flush anything pending and close. Deferred."""

    def pause():
        """Stop handing out items from ``get_next`` (enqueue still works)."""

    def resume():
        """Undo ``pause``."""

    def is_processing():
        """True unless paused."""

    max_size = Attribute("maxQueueSize: the item count at which enqueue fails with QueueFull (0: unlimited).")
    spool_directory = Attribute(
        "Where ingress writes messages that outgrow memory: a directory on the queue's file system, so that "
        "enqueue can link the file into place instead of copying it."
    )


@dataclass(frozen=True)
class Suppression:
    """A recipient mail is refused for (``550 5.1.1`` at RCPT) until ``expires_at`` (seconds since the
    epoch): ``reason`` is the hard bounce that put it there, or an operator's note."""

    address: str
    reason: str
    created_at: float
    expires_at: float


class ISuppressionList(Interface):
    """Recipients that hard-bounced (5.1.x), kept with the queue (memory, SQLite beside the disk queue, Redis
    keys with a TTL) for a while, so that mail to them is refused at RCPT instead of queued to bounce again.
    Addresses are compared case-insensitively. Every method returns a Deferred; the disk and Redis lists
    fail with QueueUnavailable when their store cannot be reached."""

    def add(address, reason, ttl):
        """Suppress ``address`` for ``ttl`` seconds from now (again: the newer entry replaces the older);
        fires with the Suppression."""

    def get(address):
        """Fires with the Suppression of ``address`` if it has one that has not expired, else None."""

    def remove(address):
        """Forget ``address``; fires with True when it was suppressed."""

    def entries(limit):
        """Fires with up to ``limit`` unexpired Suppressions, the soonest to expire first."""

    def close():
        """Release the store (the process stops); fires when done."""


class IMessageAcceptor(Interface):
    """Takes a complete received message from ingress (the processing chain and the queue behind it).

    Ingress knows nothing else of what happens to the message: it answers 250 when the Deferred fires and the
    refusal's reply when it fails with :class:`dcrouter.mail.acceptance.Refusal`. Any other failure is a bug;
    ingress logs it and answers ``451 4.3.0``."""

    def accept(envelope, message, queue_id):
        """Take ``message`` (a :class:`dcrouter.mail.spooled.SpooledMessage`, consumed) received with
        ``envelope`` under ``queue_id``. Returns a Deferred firing with an
        :class:`dcrouter.mail.acceptance.Accepted` once the message is durable (or dropped on purpose), or
        failing with a Refusal carrying the SMTP reply."""


class IRoutingRule(Interface):
    """A rule that routes some recipients before the per-domain rules (``smtpConfig.routingRules`` or a
    plugin). Rules are evaluated in ascending ``priority``; the first that returns a Route wins."""

    name = Attribute("A short name, used in logs and as the Route name (``rule:<name>``).")
    priority = Attribute("An int; lower values are evaluated first.")

    def route(sender, recipient):
        """The Route for ``recipient`` (str) of a message from ``sender`` (str, "" for the null sender), or
        None when this rule does not apply."""


class IDeliveryTransport(Interface):
    """How a message leaves dcrouter (the built-in one speaks ESMTP to the route's servers)."""

    def deliver(item, route, recipients, open_body):
        """Deliver ``item`` (QueueItem) to ``recipients`` (list[str], all sharing ``route``). ``open_body()``
        returns a Deferred firing with a readable binary file over the message; the transport closes it.
        Returns a Deferred firing with a DeliveryReport holding one RecipientResult per recipient. Remote and
        network failures are results (TEMPORARY/PERMANENT), not errbacks; an errback means a local bug."""


class IScanner(Interface):
    """Looks at a received message before it is accepted (``smtpConfig.scanners`` or a plugin).

    A scanner only reports; what happens on a hit (``tag``, ``reject``, ``quarantine``, ``discard``) is the
    processor's decision from the scanner's configuration. Scanners run between the end of DATA and the reply,
    so a slow one delays the client: ``processingTimeout`` bounds the whole chain.
    """

    name = Attribute("A short name for logs, headers and SMTP replies (``spam``, ``virus``, a plugin's).")

    def scan(message):
        """Scan ``message`` (a :class:`dcrouter.processing.message.Draft`: envelope, header block, MIME
        metadata ``info`` and ``open_message()``, the bytes as received). Returns a ScanResult, or a
        Deferred firing with one. Fails with ScannerUnavailable when the verdict cannot be had for now (a
        daemon down or timing out): the message is then refused with a 4xx unless configured to pass. Work
        that reads a big message must not run on the reactor thread (``message.run_in_thread``)."""


class ITransformation(Interface):
    """Changes a message before it is queued (``smtpConfig.transformations`` or a plugin), in configured
    order, after scanning and before DKIM signing."""

    name = Attribute("A short name for logs.")

    def apply(message):
        """Change ``message`` (a :class:`dcrouter.processing.message.Draft`): its ``headers``, its envelope
        (``message.envelope``), or its body through ``message.rewrite_body``. Returns None or a Deferred.
        Raising :class:`dcrouter.mail.acceptance.Refusal` refuses the message with its reply."""


class IIngressLimits(Interface):
    """Rate limits, quotas and per-domain client rules applied to SMTP sessions (docs/limits.md); the SMTP
    session policy asks it at each phase. Built-in: :class:`dcrouter.limits.ingress.IngressLimits`.

    ``session`` is the SMTP session (``peer_host``, ``local_port``, ``auth_user``); addresses are
    :class:`dcrouter.mail.address.Address`. Each check returns None to go on, the Reply refusing, or a
    Deferred firing with either (counters in Redis, a tarpit delay); those Deferreds never fail. A check that
    allows also counts: call each once per event."""

    def connection_opened(session):
        """A connection was accepted: check concurrency and connection rate. A refusal is a ``421 4.7.0``
        and the session ends. Whatever the answer, :meth:`connection_closed` must follow once."""

    def connection_closed(session):
        """The connection :meth:`connection_opened` allowed has ended."""

    def check_auth(session):
        """Before an AUTH exchange: a ``421 4.7.0`` when the client's failed attempts are over a limit."""

    def auth_failed(session):
        """An AUTH attempt failed: count it."""

    def check_mail(session, sender, size):
        """MAIL FROM ``sender`` declaring ``size`` octets (0 when not declared): message and byte limits."""

    def check_recipient_rules(session, recipient, accepted):
        """Before RCPT TO ``recipient`` is verified, with ``accepted`` (list of str) the transaction's
        recipients so far: the domain's ``allowedIPs`` (``550 5.7.1``) and ``maxRecipientsPerMessage``
        (``452 4.5.3``). Synchronous: None or a Reply."""

    def check_recipient(session, sender, recipient, accepted):
        """RCPT TO ``recipient`` about to be accepted: recipient limits, and message limits per recipient
        domain at its first recipient in the transaction (``451 4.7.1``)."""

    def message_accepted(session, sender, size):
        """A message of ``size`` octets from ``sender`` was accepted: count its bytes."""


class IOAuthBearerToken(Interface):
    """Credentials of SASL XOAUTH2 and OAUTHBEARER (RFC 7628): an OAuth 2.0 bearer token, and the user name
    the client says it belongs to (None when it named none). A twisted.cred checker that takes them
    (``credentialInterfaces``) fires with the user the token was issued to."""

    username = Attribute("The user the client claims (str), or None.")
    token = Attribute("The bearer token (str).")


class ProviderUnavailable(Exception):
    """An authentication provider cannot decide now (its directory or token endpoint is down or too slow).

    Raised (as a Deferred's failure) by a twisted.cred checker, it becomes ``454 4.7.0`` — a temporary
    failure the client retries — never ``535``: an outage says nothing about the password. The message is
    logged without a traceback."""

"""One mail transaction, from MAIL FROM to the end of its DATA: :class:`Transaction` (what MAIL and RCPT
gathered), the check of MAIL's parameters, the ``Received:`` field that goes first into the spool, and
:func:`hand_off`, which gives the complete message to the :class:`~dcrouter.interfaces.IMessageAcceptor`.

What the protocol may rely on from :func:`hand_off`:

- ``250 2.0.0 Ok: queued as ID`` only once the acceptor's Deferred has fired (the message is durable), with
  one log line per accepted message; a discarded message is answered as if queued, so the sender learns
  nothing.
- A refusal (:class:`~dcrouter.mail.acceptance.Refusal`) is answered with its own reply and logged as a
  warning, or as an error when storage failed; a spool that could not hold the message (``OSError``:
  ENOSPC, EIO, ...) is ``451 4.3.0`` and one error line without a traceback; anything else raised behind the
  acceptor is ``451 4.3.0`` too, logged with its traceback. Storage failures are 4xx, never 5xx. A message
  not accepted is discarded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from dcrouter.interfaces import IMessageAcceptor
from dcrouter.mail.acceptance import LOCAL_ERROR, Disposition, Refusal
from dcrouter.mail.address import Address
from dcrouter.mail.envelope import Envelope
from dcrouter.mail.reply import Reply
from dcrouter.smtp.datastream import MESSAGE_TOO_BIG
from dcrouter.smtp.received import received_header, with_protocol
from dcrouter.smtp.session import Session
from dcrouter.smtp.spool import SpoolWriter


@dataclass
class Transaction:
    """One mail transaction, from MAIL FROM to the end of DATA or RSET."""

    queue_id: str
    sender: Address
    params: dict[str, str]
    utf8: bool
    recipients: list[str] = field(default_factory=list)


class SessionLog(Protocol):
    """Logs one line about the session (its fields added), as ``ESMTPServerProtocol._log`` does."""

    def __call__(self, level: str, fmt: str, *, failure: Failure | None = None, **fields: Any) -> None: ...


def check_mail_params(params: dict[str, str], *, esmtp: bool, max_message_size: int) -> Reply | None:
    """The reply refusing MAIL FROM's ``params`` (SIZE, BODY and SMTPUTF8, only after EHLO), or None."""
    if params and not esmtp:
        return Reply(555, "5.5.4", "Error: parameters need EHLO")
    for key, value in params.items():
        if key == "SIZE":
            if not value.isdigit() or len(value) > 20:
                return Reply(501, "5.5.4", "Syntax: SIZE=<number>")
            if int(value) > max_message_size:
                return MESSAGE_TOO_BIG
        elif key == "BODY":
            if value.upper() not in ("7BIT", "8BITMIME"):
                return Reply(501, "5.5.4", "Syntax: BODY=7BIT or BODY=8BITMIME")
        elif key == "SMTPUTF8":
            if value:
                return Reply(501, "5.5.4", "Syntax: SMTPUTF8 takes no value")
        else:
            return Reply(555, "5.5.4", f"Unsupported parameter {key[:20]}")
    return None


def received_field(txn: Transaction, session: Session, *, hostname: str, tls: bool, when: float) -> bytes:
    """The ``Received:`` field this transaction's message gets, as of ``when`` (``tls``: the session is
    encrypted)."""
    protocol = with_protocol(
        esmtp=session.esmtp,
        tls=tls,
        authenticated=session.auth_user is not None,
        utf8=txn.utf8,
    )
    return received_header(
        helo=session.helo or "",
        peer_ip=session.peer_host,
        hostname=hostname,
        protocol=protocol,
        queue_id=txn.queue_id,
        tls=session.tls,
        recipients=txn.recipients,
        when=when,
    )


async def hand_off(
    acceptor: IMessageAcceptor,
    txn: Transaction,
    spool: SpoolWriter,
    size: int,
    *,
    session: Session,
    clock: IReactorTime,
    log: SessionLog,
) -> tuple[Reply, bool]:
    """Finish ``spool`` (``size`` octets of message text) and give it to ``acceptor``: the reply to the final
    dot, and whether the message was accepted. See the module docstring."""
    try:
        message = spool.finish()
    except OSError as error:
        # The file system failed (ENOSPC, EIO, ...): the spool already removed its file.
        return _refused(
            txn, Refusal(LOCAL_ERROR, str(error) or type(error).__name__, storage=True), log
        ), False
    envelope = Envelope(
        mail_from=str(txn.sender),
        recipients=list(txn.recipients),
        mail_params=dict(txn.params),
        helo=session.helo or "",
        peer_host=session.peer_host,
        peer_port=session.peer_port,
        tls=session.tls,
        auth_user=session.auth_user,
        received_at=clock.seconds(),
    )
    try:
        accepted = await acceptor.accept(envelope, message, txn.queue_id)
    except Refusal as refusal:
        message.discard()
        return _refused(txn, refusal, log), False
    except Exception as error:  # noqa: BLE001 (a bug behind the acceptor is logged and answered, not dropped)
        message.discard()
        log(
            "failure",
            "Message from {peer} not queued: {reply} ({error})",
            failure=Failure(error),
            queue_id=txn.queue_id,
            reply=LOCAL_ERROR.code,
            error=str(error) or type(error).__name__,
        )
        return LOCAL_ERROR, False
    # The one line per accepted message (MAIL and RCPT are not logged one by one: at thousands of messages a
    # second, formatting log lines is a measurable share of the work).
    log(
        "info",
        "{queue_id}: {status} from=<{sender}> size={size} nrcpt={recipients} peer={peer}{why}",
        status=accepted.disposition.value,
        queue_id=accepted.queue_id,
        sender=envelope.mail_from,
        size=size,
        recipients=len(txn.recipients),
        why=f": {accepted.reason}" if accepted.disposition is Disposition.DISCARDED else "",
    )
    return Reply(250, "2.0.0", f"Ok: queued as {accepted.queue_id}"), True


def _refused(txn: Transaction, refusal: Refusal, log: SessionLog) -> Reply:
    log(
        "error" if refusal.storage else "warn",
        "Message from {peer} not queued: {reply} ({error})",
        queue_id=txn.queue_id,
        reply=refusal.reply.code,
        error=refusal.reason or refusal.reply.text,
    )
    return refusal.reply

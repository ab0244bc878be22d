"""Delivery status notifications: the bounce and the delay warning sent to a message's envelope sender.

The message is an RFC 3464 DSN in an RFC 6522 (formerly RFC 3462) ``multipart/report; report-type=
delivery-status`` with three parts: a human-readable ``text/plain`` explanation, the machine-readable
``message/delivery-status``, and ``text/rfc822-headers`` with the original message's header block (never its
body: a bounce must not carry a copy of the content back, and must stay small).

What a caller may rely on (for :func:`build_dsn`):

- The result is a complete message: CRLF line endings only, no line longer than 998 octets, 7-bit clean
  (a non-ASCII explanation is quoted-printable UTF-8; original headers with 8-bit bytes are quoted-printable;
  a non-ASCII recipient is written as an RFC 6533 ``utf-8`` address with ``\\x{HEX}`` escapes).
- It says ``Auto-Submitted: auto-replied`` (RFC 3834) so that autoresponders do not answer it; it must be
  sent from the null reverse path (``MAIL FROM:<>``), which is the caller's part.
- The output is a function of the arguments only (no clock, no randomness): the boundary is derived from
  them, which keeps a re-sent DSN byte-identical after a crash.
"""

from __future__ import annotations

import email.utils
import hashlib
import quopri
import re
import textwrap
from collections.abc import Sequence
from typing import BinaryIO, Literal

from dcrouter.queue.item import QueueItem

#: Largest header block copied into a DSN; a longer one is cut at its last complete line before this.
HEADERS_LIMIT = 64 * 1024

#: Longest value of one delivery-status field before it is cut (folded lines stay far below 998 octets).
_FIELD_LIMIT = 900

_ENHANCED = re.compile(r"^(\d{3})[ -]+([245]\.\d{1,3}\.\d{1,3})\b")
_BASIC = re.compile(r"^([245])\d\d\b")

Action = Literal["failed", "delayed"]


def read_header_block(stream: BinaryIO, limit: int = HEADERS_LIMIT) -> bytes:
    """The header block at the start of ``stream``: the lines before the first empty line, at most ``limit``
    octets (cut after the last complete line that fits), with CRLF line endings. Reads at most ``limit + 2``
    octets: never the body."""
    lines: list[bytes] = []
    total = 0
    while total < limit:
        line = stream.readline(limit - total + 2)
        if not line or line in (b"\r\n", b"\n"):
            break
        if not line.endswith(b"\n"):
            break  # longer than what is left of the limit, or unterminated: stop before it
        total += len(line)
        if total > limit:
            break
        lines.append(line.rstrip(b"\r\n") + b"\r\n")
    return b"".join(lines)


def status_of(reply: str, action: Action) -> str:
    """The RFC 3463 status code for a reply such as ``550 5.1.1 No such user``: its enhanced code, else one
    derived from its class (``5.0.0``/``4.0.0``), else the class the action implies."""
    found = _ENHANCED.match(reply)
    if found:
        return found.group(2)
    basic = _BASIC.match(reply)
    if basic and basic.group(1) in "45":
        return f"{basic.group(1)}.0.0"
    return "5.0.0" if action == "failed" else "4.0.0"


def remote_host(target: str) -> str:
    """The host part of a ``host:port`` target (``[v6]:port`` too); "" stays ""."""
    if target.startswith("["):
        return target[1 : target.find("]")] if "]" in target else target[1:]
    if target.count(":") == 1:
        return target.split(":", 1)[0]
    return target


def build_dsn(
    *,
    reporting_mta: str,
    original: QueueItem,
    failed: Sequence[tuple[str, str, str]],
    action: Action,
    headers_of_original: bytes,
    arrival_date: float,
    message_id: str,
    now: float,
    will_retry_until: float | None = None,
) -> bytes:
    """The DSN for ``original``, as bytes ready to queue.

    ``failed``: ``(recipient, reply, remote_mta)`` per recipient reported (``reply`` is the SMTP reply or
    dcrouter's own description, ``remote_mta`` the ``host:port`` that answered or ""). ``action``: "failed"
    (a bounce) or "delayed" (a warning). ``message_id`` is the Message-ID without angle brackets.
    ``will_retry_until`` (delayed only): when dcrouter gives up, for the Will-Retry-Until field.
    """
    if action not in ("failed", "delayed"):
        raise ValueError(f"DSN action must be 'failed' or 'delayed', not {action!r}")
    if not failed:
        raise ValueError("a DSN reports at least one recipient")
    sender = original.envelope.mail_from
    if not sender:
        raise ValueError("no DSN is ever sent to the null sender")
    human = _human_part(reporting_mta, original, failed, action, arrival_date, will_retry_until)
    status = _status_part(reporting_mta, original, failed, action, arrival_date, now, will_retry_until)
    headers = _headers_part(headers_of_original)
    boundary = _boundary(message_id, human + status + headers)
    subject = (
        "Undelivered Mail Returned to Sender" if action == "failed" else "Delayed Mail (still being retried)"
    )
    top = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{sender}>" if sender.isascii() else "To: undisclosed-recipients:;",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: <{message_id}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]
    out = ("\r\n".join(top) + "\r\n").encode("ascii")
    for part in (human, status, headers):
        out += f"--{boundary}\r\n".encode("ascii") + part + b"\r\n"
    return out + f"--{boundary}--\r\n".encode("ascii")


# -- the parts --------------------------------------------------------------------------------------------


def _human_part(
    reporting_mta: str,
    original: QueueItem,
    failed: Sequence[tuple[str, str, str]],
    action: Action,
    arrival_date: float,
    will_retry_until: float | None,
) -> bytes:
    lines = [f"This is the mail system at host {reporting_mta}.", ""]
    if action == "failed":
        lines += [
            "Your message could not be delivered to one or more recipients.",
            "The reasons are given below; the headers of your message are attached.",
        ]
    else:
        lines += [
            "THIS IS A WARNING ONLY. YOU DO NOT NEED TO RESEND YOUR MESSAGE.",
            "",
            "Your message has not yet been delivered to the recipients below.",
            "The mail system will keep trying"
            + (f" until {_date(will_retry_until)}." if will_retry_until is not None else "."),
        ]
    lines += [
        "",
        f"Queue id: {original.id}",
        f"Received: {_date(arrival_date)}",
        "",
    ]
    for rcpt, reply, _remote in failed:
        # Wrapped for reading; the reply is cut like a field value, so no single word can reach 998 octets.
        reason = f"<{rcpt}>: {_one_line(reply)[:_FIELD_LIMIT]}"
        lines.append(textwrap.fill(reason, width=76, subsequent_indent="    ", break_long_words=False))
    text = "\n".join(lines) + "\n"
    if text.isascii():
        head = "Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n"
        body = text.replace("\n", "\r\n").encode("ascii")
    else:
        head = "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n"
        body = _quoted_printable(text.encode("utf-8"))
    return f"Content-Description: Notification\r\n{head}\r\n".encode("ascii") + body


def _status_part(
    reporting_mta: str,
    original: QueueItem,
    failed: Sequence[tuple[str, str, str]],
    action: Action,
    arrival_date: float,
    now: float,
    will_retry_until: float | None,
) -> bytes:
    blocks = [
        [
            _field("Reporting-MTA", f"dns; {reporting_mta}"),
            _field("X-Dcrouter-Queue-ID", original.id),
            _field("Arrival-Date", _date(arrival_date)),
        ]
    ]
    for rcpt, reply, remote in failed:
        block = [
            _field("Final-Recipient", _address_type(rcpt)),
            _field("Action", action),
            _field("Status", status_of(reply, action)),
        ]
        host = remote_host(remote)
        if host:
            block.append(_field("Remote-MTA", f"dns; {_ascii(host)}"))
        block.append(_field("Diagnostic-Code", f"smtp; {_ascii(_one_line(reply))}"))
        block.append(_field("Last-Attempt-Date", _date(now)))
        if action == "delayed" and will_retry_until is not None:
            block.append(_field("Will-Retry-Until", _date(will_retry_until)))
        blocks.append(block)
    text = "\r\n".join("\r\n".join(block) + "\r\n" for block in blocks)
    head = "Content-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n"
    return (head + text).encode("ascii")


def _headers_part(headers_of_original: bytes) -> bytes:
    lines = headers_of_original.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    clean = all(line.isascii() and len(line) < 998 and b"\r" not in line for line in lines)
    if clean:
        head = "Content-Transfer-Encoding: 7bit\r\n"
        body = b"".join(line + b"\r\n" for line in lines)
    else:
        head = "Content-Transfer-Encoding: quoted-printable\r\n"
        body = _quoted_printable(b"".join(line + b"\n" for line in lines))
    return (
        "Content-Description: Undelivered Message Headers\r\nContent-Type: text/rfc822-headers\r\n"
        + head
        + "\r\n"
    ).encode("ascii") + body


# -- encoding helpers -------------------------------------------------------------------------------------


def _quoted_printable(data: bytes) -> bytes:
    """``data`` (LF line endings) as quoted-printable with CRLF line endings; lines of at most 76 octets."""
    encoded = quopri.encodestring(data)
    return encoded.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _field(name: str, value: str) -> str:
    """``name: value`` folded at spaces before 78 columns where possible; the value cut at _FIELD_LIMIT."""
    value = value[:_FIELD_LIMIT]
    words = value.split(" ")
    lines: list[str] = []
    current = f"{name}: {words[0]}"
    for word in words[1:]:
        if len(current) + 1 + len(word) > 78 and current.strip():
            lines.append(current)
            current = " " + word
        else:
            current += " " + word
    lines.append(current)
    return "\r\n".join(lines)


def _one_line(text: str) -> str:
    # Multi-line SMTP replies and stray control characters must not break the field syntax.
    return re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()


def _ascii(text: str) -> str:
    """Non-ASCII replaced by ``?``: delivery-status fields are 7-bit (RFC 3464 section 2)."""
    return text.encode("ascii", "replace").decode("ascii")


def _address_type(address: str) -> str:
    """``rfc822; addr``, or RFC 6533 ``utf-8; addr`` with ``\\x{HEX}`` for each non-ASCII character."""
    if address.isascii():
        return f"rfc822; {_one_line(address)}"
    escaped = "".join(c if c.isascii() and c.isprintable() else f"\\x{{{ord(c):X}}}" for c in address)
    return f"utf-8; {escaped}"


def _date(when: float) -> str:
    return email.utils.formatdate(when, usegmt=True)


def _boundary(message_id: str, content: bytes) -> str:
    """A boundary that does not occur in ``content`` (RFC 2046 section 5.1.1), the same for the same input."""
    for salt in range(1000):
        digest = hashlib.sha256(f"{message_id}/{salt}".encode()).hexdigest()[:24]
        boundary = f"=_dcrouter-dsn-{digest}"
        if boundary.encode("ascii") not in content:
            return boundary
    raise ValueError("no boundary found that is absent from the content")  # pragma: no cover

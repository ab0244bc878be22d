"""The DATA line machine: turns the bytes a client sends after ``354`` into message text, chunk by chunk.

What a caller may rely on:

- Only ``<CRLF>.<CRLF>`` ends the data (and ``.<CRLF>`` as the very first line). A bare CR or a bare LF
  never starts or ends a line as far as the terminator and dot-unstuffing are concerned, so smuggling
  sequences such as ``\\n.\\r\\n``, ``\\r\\n.\\n``, ``\\n.\\n`` or ``\\r.\\r`` can neither end the data
  early nor split it into two messages. Any bare CR or LF marks the message ``bare_line_ending`` and the
  protocol refuses it: dcrouter rejects rather than normalises, so nothing ambiguous is passed downstream.
- A NUL octet anywhere marks the message ``nul`` and the protocol refuses it too. NUL has no place in 7bit or
  8bit text (RFC 2045 §2.7, §2.8; only BINARYMIME, not offered, allows it), and a server downstream that drops
  NULs would read ``<CRLF>NUL.<CRLF>`` as the end of the data and run what follows as commands.
- A leading dot of a line is removed (RFC 5321 §4.5.2); everything else is passed on byte for byte.
- Limits do not stop the reading: a line over ``max_line_length`` (CRLF included) sets ``line_too_long`` (and
  ``long_header_line`` when it is in the header section), more text than ``max_message_size`` sets
  ``too_big``; from the first violation on nothing more is written to the sink, but the stream keeps looking
  for the terminator so the session stays in sync with the client.
- ``Received:`` fields in the header section (up to the first empty line) are counted in ``received_count``.
- Memory: besides the caller's chunk, the stream keeps at most one partial header line (< ``max_line_length``)
  or four bytes of a possible terminator between calls.

Work is done per chunk with ``bytes`` methods (``find``, ``rfind``, ``count``, ``replace``) for the body: one
search for ``<CRLF>.`` (the terminator and dot-stuffed lines), three counts (line endings), a NUL test and a
few ``rfind`` calls (line lengths); the text is copied once, by ``replace``, only when a line was
dot-stuffed. The header section, which is small, is checked line by line and passed on as one run.
"""

from __future__ import annotations

from collections.abc import Callable

from dcrouter.mail.reply import Reply

MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
BARE_LINE_ENDING = Reply(
    550, "5.6.0", "Message refused: bare CR or LF in message text (RFC 5321 section 2.3.8)"
)
NUL_IN_TEXT = Reply(550, "5.6.0", "Message refused: NUL character in message text")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops (mail loop)")
TERMINATOR = b"\r\n.\r\n"
#: Proper prefixes of the terminator, longest first: a chunk ending in one of them is held back until the next
#: chunk shows whether the terminator is complete (or a dot to unstuff follows).
_TERMINATOR_PREFIXES = (TERMINATOR[:4], TERMINATOR[:3], TERMINATOR[:2], TERMINATOR[:1])
_LONE_DOT = b".\r\n"


class DataStream:
    """One DATA transfer. Feed it chunks with :meth:`feed` until that returns an offset (the end of data)."""

    def __init__(
        self,
        sink: Callable[[bytes], object],
        *,
        max_line_length: int,
        max_message_size: int,
    ) -> None:
        self._sink = sink
        self._max_line = max_line_length
        self._max_size = max_message_size
        self._carry = b""
        self._in_headers = True
        # True when the next byte starts a line that follows a CRLF (or the start of data).
        self._at_bol = True
        # Octets of the current, unfinished line seen so far (body section only).
        self._line_len = 0
        #: Octets of message text after dot-unstuffing, counted even after writing stopped.
        self.size = 0
        self.received_count = 0
        self.bare_line_ending = False
        self.nul = False
        self.line_too_long = False
        self.long_header_line = False
        self.too_big = False
        self.done = False

    @property
    def damaged(self) -> bool:
        """True once anything was found that makes the message unacceptable (and writing stopped)."""
        return self.bare_line_ending or self.nul or self.line_too_long or self.too_big

    def refusal(self, *, max_received_headers: int) -> Reply | None:
        """After the end: the reply refusing the message, or None when it may be queued. The size is reported
        first (the client may retry elsewhere), then the framing, the line length, and a mail loop."""
        if self.too_big:
            return MESSAGE_TOO_BIG
        if self.bare_line_ending:
            return BARE_LINE_ENDING
        if self.nul:
            return NUL_IN_TEXT
        if self.line_too_long:
            return self._line_too_long()
        if self.received_count > max_received_headers:
            return TOO_MANY_HOPS
        return None

    def _line_too_long(self) -> Reply:
        """554 5.6.0 saying which part of the message holds the line and what the limit is. A content problem
        found at the end of the data: 554 is RFC 5321's reply for a failed transaction there, X.6.0 the
        enhanced code for message content (5.5.2 would mean a command's syntax)."""
        where = "header" if self.long_header_line else "body"
        octets = self._max_line - 2
        source = "RFC 5322 section 2.1.1" if octets == 998 else "maxLineLength"
        return Reply(554, "5.6.0", f"Message refused: a {where} line exceeds {octets} octets ({source})")

    def feed(self, data: bytes) -> int:
        """Consume ``data``. Returns -1 while the data continues, else the offset in ``data`` just after the
        terminating ``<CRLF>.<CRLF>``; the bytes from there on are the client's next commands."""
        if self.done:
            raise RuntimeError("DataStream.feed after the end of data")
        carried = len(self._carry)
        buf = self._carry + data if carried else data
        self._carry = b""
        pos = 0
        if self._in_headers:
            pos = self._headers(buf)
        if not self.done and pos < len(buf) and not self._carry:
            pos = self._body(buf, pos)
        if self.done:
            return pos - carried
        return -1

    def _headers(self, buf: bytes) -> int:
        """Check complete header lines one at a time, and pass them on as one run (less the leading dots of
        dot-stuffed lines); returns where it stopped."""
        pos, end = 0, len(buf)
        start = 0  # the first octet of buf not yet passed on
        max_line = self._max_line
        while pos < end:
            lf = buf.find(b"\n", pos)
            if lf < 0:
                self._emit_run(buf, start, pos)
                if end - pos < max_line:
                    self._carry = buf[pos:]
                    return end
                # An unfinished header line already over the limit: the body machinery tracks it from here.
                self.line_too_long = self.long_header_line = True
                self._in_headers = False
                return pos
            after = lf + 1
            if self._at_bol and lf - pos == 2 and buf[pos] == 0x2E and buf[pos + 1] == 0x0D:  # ".\r\n"
                self._emit_run(buf, start, pos)
                self.done = True
                return after
            if after - pos > max_line:
                self.line_too_long = self.long_header_line = True
            well_ended = lf > pos and buf[lf - 1] == 0x0D
            if not well_ended or buf.count(b"\r", pos, lf) != 1:
                self.bare_line_ending = True
            if buf.find(b"\x00", pos, after) >= 0:
                self.nul = True
            if self._at_bol:
                if well_ended and lf - pos == 1:
                    self._in_headers = False
                elif buf[pos : pos + 9].lower() == b"received:":
                    self.received_count += 1
                elif buf[pos] == 0x2E:
                    # A dot-stuffed line: pass on what came before it, then the line without its dot.
                    self._emit_run(buf, start, pos)
                    start = pos + 1
            self._at_bol = well_ended
            pos = after
            if not self._in_headers:
                break
        self._emit_run(buf, start, pos)
        return pos

    def _emit_run(self, buf: bytes, start: int, stop: int) -> None:
        if stop > start:
            self._emit(buf if start == 0 and stop == len(buf) else buf[start:stop])

    def _body(self, buf: bytes, pos: int) -> int:
        """Handle the body part of ``buf`` from ``pos`` as whole segments; returns where it stopped.

        One search for ``<CRLF>.`` finds both the terminator and the lines to unstuff."""
        end = len(buf)
        if self._at_bol:
            head = buf[pos : pos + 3]
            if head == _LONE_DOT:
                self.done = True
                return pos + 3
            if len(head) < 3 and _LONE_DOT.startswith(head):
                self._carry = buf[pos:]
                return end
        dots = False  # a dot-stuffed line may be in the segment
        found = buf.find(b"\r\n.", pos)
        while found >= 0:
            after = found + 3
            if after + 2 <= end:
                if buf[after] == 0x0D and buf[after + 1] == 0x0A:
                    # The CRLF before the dot belongs to the message's last line.
                    self._segment(buf[pos : found + 2], dots)
                    self.done = True
                    return found + len(TERMINATOR)
            elif TERMINATOR.startswith(buf[found:]):
                break  # maybe the terminator: held back below until the next chunk shows
            dots = True
            found = buf.find(b"\r\n.", after)
        stop = end
        for prefix in _TERMINATOR_PREFIXES:
            if end - pos >= len(prefix) and buf.endswith(prefix):
                stop = end - len(prefix)
                break
        if stop > pos:
            self._segment(buf if pos == 0 and stop == end else buf[pos:stop], dots)
        self._carry = buf[stop:]
        return end

    def _segment(self, seg: bytes, dots: bool) -> None:
        """Check and pass on a run of body text that holds no terminator and no held-back prefix of one;
        ``dots``: it may hold ``<CRLF>.`` (False only when it does not)."""
        if not seg:
            return
        # Counted by what a replace() removes: it runs on memchr(), bytes.count() of one octet does not.
        newlines = len(seg) - len(seg.replace(b"\n", b""))
        if not self.bare_line_ending and (
            len(seg) - len(seg.replace(b"\r", b"")) != newlines
            or (newlines and seg.count(b"\r\n") != newlines)
        ):
            self.bare_line_ending = True
        if not self.nul and b"\x00" in seg:
            self.nul = True
        if not self.line_too_long:
            self._measure(seg, newlines)
        at_bol = self._at_bol
        self._at_bol = seg.endswith(b"\r\n")
        if self.damaged:
            # Nothing of this message will be kept; only its (unstuffed) size still matters.
            self.size += len(seg) - seg.count(b"\r\n.") - (at_bol and seg[:1] == b".")
            self.too_big = self.too_big or self.size > self._max_size
            return
        if at_bol and seg[:1] == b".":
            seg = seg[1:]
        if dots:
            seg = seg.replace(b"\r\n.", b"\r\n")
        self._emit(seg)

    def _measure(self, seg: bytes, newlines: int) -> None:
        limit = self._max_line
        if newlines == 0:
            self._line_len += len(seg)
        else:
            # Each line (LF included) must end within ``limit`` octets of its start: from a line's start, the
            # last LF in the next ``limit`` octets ends it or a later line, and the next line to check starts
            # after it; no LF there means a line too long. A few rfind() calls per segment, no per-line work.
            end = len(seg)
            start = -self._line_len  # where the current line began, relative to seg
            while start + limit < end:
                lf = seg.rfind(b"\n", max(start, 0), start + limit)
                if lf < 0:
                    self.line_too_long = True
                    break
                start = lf + 1
            self._line_len = end - seg.rfind(b"\n") - 1
        # An unfinished line never ends in CR here (a trailing CR is held back), so it still needs its CRLF.
        if self._line_len + 2 > limit:
            self.line_too_long = True

    def _emit(self, text: bytes) -> None:
        self.size += len(text)
        if self.size > self._max_size:
            self.too_big = True
        if not self.damaged:
            self._sink(text)

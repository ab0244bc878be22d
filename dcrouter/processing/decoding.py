"""Body content as it was before its Content-Transfer-Encoding, and declared charsets as text codecs.

:class:`Base64Decoder` and :class:`QuotedPrintableDecoder` take an encoded body in pieces cut anywhere and
give the same decoded bytes whatever the cuts; they never raise on hostile input and note what was odd in
``defects``. :func:`charset_codec` turns a declared charset into a text codec, falling back to UTF-8. The
inspector (:mod:`dcrouter.processing.mime`) and the rewriter
(:mod:`dcrouter.processing.transforms.mimerewrite`) decode with these, so both see the same content.
"""

from __future__ import annotations

import binascii
import codecs

#: Transfer encodings under which the body is the content as it is.
IDENTITY_ENCODINGS = frozenset({"7bit", "8bit", "binary"})


def charset_codec(charset: str | None) -> codecs.CodecInfo:
    """A text codec for a declared charset: unknown, non-text (rot13, base64) or ASCII read as UTF-8."""
    try:
        info = codecs.lookup((charset or "utf-8").strip())
    except (LookupError, ValueError):
        return codecs.lookup("utf-8")
    if not getattr(info, "_is_text_encoding", True) or info.name == "ascii":
        return codecs.lookup("utf-8")
    return info


def decode_charset(data: bytes, charset: str | None) -> str:
    """``data`` in a declared charset as text (see :func:`charset_codec`); undecodable bytes are U+FFFD."""
    try:
        return data.decode(charset_codec(charset).name, "replace")
    except (LookupError, UnicodeError, ValueError, TypeError):
        return data.decode("utf-8", "replace")


_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_DROP = bytes(b for b in range(256) if b not in _B64_ALPHABET + b"=")
_B64_VALID = _B64_ALPHABET + b"= \t\r\n"


class Base64Decoder:
    """Lenient like mail readers (non-alphabet bytes skipped), noting every irregularity as a defect. Its
    state is a position in the stream (characters since the last padding), so any split of the input decodes
    the same."""

    def __init__(self) -> None:
        self._carry = b""
        self._segment = 0
        self._after_pad = False
        self.defects: set[str] = set()

    def feed(self, data: bytes) -> bytes:
        if data.translate(None, _B64_VALID):
            self.defects.add("characters outside the base64 alphabet ignored")
        out = []
        for index, piece in enumerate(data.translate(None, _B64_DROP).split(b"=")):
            if index:
                out.append(self._pad())
            if piece:
                if self._after_pad:
                    self.defects.add("base64 data after padding")
                    self._after_pad = False
                self._segment += len(piece)
                pending = self._carry + piece
                whole = len(pending) - len(pending) % 4
                out.append(binascii.a2b_base64(pending[:whole]))
                self._carry = pending[whole:]
        return b"".join(out)

    def _pad(self) -> bytes:
        carry, self._carry = self._carry, b""
        segment, self._segment = self._segment, 0
        after_pad, self._after_pad = self._after_pad, True
        if segment == 0 and after_pad:
            return b""  # the second "=" of "=="
        if not carry:
            self.defects.add("base64 padding where none belongs")
            return b""
        if len(carry) == 1:
            self.defects.add("truncated base64 quantum")
            return b""
        return binascii.a2b_base64(carry + b"=" * (4 - len(carry)))

    def flush(self) -> bytes:
        carry, self._carry = self._carry, b""
        if not carry:
            return b""
        self.defects.add("base64 not padded to a whole quantum")
        if len(carry) == 1:
            return b""
        return binascii.a2b_base64(carry + b"=" * (4 - len(carry)))


#: Octets of one quoted-printable line held back at most (SMTP lines are at most 1000): past it, decoded.
QP_MAX_LINE = 64 * 1024


class QuotedPrintableDecoder:
    """``binascii.a2b_qp`` over pieces: whole lines are decoded, the line begun is carried to the next piece.
    After a line feed ``a2b_qp`` starts afresh (a soft break "=\\r...\\n" ends there too), so the decoded
    bytes are those of the whole body whatever the cuts; carrying less (an "=" alone) is not enough, since
    runs of "=" pair up from their start. A line longer than :data:`QP_MAX_LINE` is decoded in pieces (memory
    stays bounded) and noted as a defect."""

    def __init__(self) -> None:
        self._carry = b""
        self.defects: set[str] = set()

    def feed(self, data: bytes) -> bytes:
        data = self._carry + data
        cut = data.rfind(b"\n") + 1
        if len(data) - cut > QP_MAX_LINE:
            self.defects.add(f"quoted-printable line longer than {QP_MAX_LINE} octets")
            # The rest of the line goes now, less the last two or three octets, which may be a cut escape.
            cut = len(data) - 3 if data[-3:-2] == b"=" else len(data) - 2
        data, self._carry = data[:cut], data[cut:]
        return binascii.a2b_qp(data)

    def flush(self) -> bytes:
        carry, self._carry = self._carry, b""
        return binascii.a2b_qp(carry)


TransferDecoder = Base64Decoder | QuotedPrintableDecoder


def transfer_decoder(transfer_encoding: str) -> TransferDecoder | None:
    """A decoder for a body in ``transfer_encoding`` (lower-case); None when the body is read as it is."""
    if transfer_encoding == "base64":
        return Base64Decoder()
    if transfer_encoding == "quoted-printable":
        return QuotedPrintableDecoder()
    return None

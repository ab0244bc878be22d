"""The footer of a text body part: how the part must change to carry it, and the sink its body goes through.

:func:`plan_footer` decides, from the part's type, charset and transfer encoding, whether the footer can go in
and how: in the part's own charset and transfer encoding when these can carry it; otherwise re-encoded as
quoted-printable, or transcoded to UTF-8 (the part's Content-Type then changes). :func:`changed_header` and
:func:`header_change` make those changes to a part's header block or the message's own. :class:`FooterSink`
decodes the body, holds its end where the footer goes (before the last ``</body>`` of HTML, else after the
text), and re-encodes it. A part to transcode is first spooled, up to a limit beyond which it is copied
unchanged without a footer.
"""

from __future__ import annotations

import codecs
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from dcrouter.mail.headers import HeaderBlock, encode_field
from dcrouter.processing.decoding import IDENTITY_ENCODINGS, TransferDecoder, transfer_decoder
from dcrouter.processing.mime import CHUNK_SIZE
from dcrouter.processing.transforms.bodywriter import (
    CRLF,
    Base64Encoder,
    BodyWriter,
    Encoder,
    IdentityEncoder,
    QuotedPrintableEncoder,
)

_TAIL = 16 * 1024  # decoded bytes held at the end of a footer part: where "</body>" is looked for
_SPOOL_MEMORY = 1024 * 1024  # a part being transcoded goes to disk beyond this
_BODY_END = re.compile(rb"</body\s*>", re.IGNORECASE)
#: Content-Type parameters of a text body kept when its charset is changed (names make a part an attachment).
_KEPT_PARAMS = ("format", "delsp", "reply-type")


@dataclass(frozen=True)
class Recoding:
    """How a part's body is re-encoded to carry a footer, and what changes in its header fields."""

    in_cte: str
    out_cte: str
    transcode: str | None  # the codec the part is decoded from, to be re-encoded as UTF-8
    footer: bytes  # in the output charset, CRLF line breaks
    html: bool
    new_type: str | None  # the part's new Content-Type (charset UTF-8); None when it stays
    new_cte: str | None  # the part's new Content-Transfer-Encoding; None when it stays


def _text_codec(charset: str) -> str | None:
    """The codec name of a declared charset; None when unknown or not a text encoding."""
    try:
        info = codecs.lookup(charset.strip())
    except (LookupError, ValueError):
        return None
    if not getattr(info, "_is_text_encoding", True):
        return None
    return info.name


def _ascii_compatible(codec: str) -> bool:
    """Line breaks, markup and ASCII letters are their ASCII bytes (not UTF-16, UTF-7, EBCDIC...)."""
    probe = "\r\n-</body>= azAZ09"
    try:
        return probe.encode(codec) == probe.encode("ascii")
    except (UnicodeError, LookupError):
        return False


def _content_type(kind: str, params: dict[str, list[str]], charset: str) -> str:
    value = f"{kind}; charset={charset}"
    for name in _KEPT_PARAMS:
        found = params.get(name)
        if found and re.fullmatch(r"[A-Za-z0-9._-]{1,40}", found[0]):
            value += f"; {name}={found[0]}"
    return value


def plan_footer(
    kind: str,
    cte: str,
    params: dict[str, list[str]],
    footer: str,
    collides: Callable[[list[bytes]], bool],
) -> Recoding | None:
    """How ``footer`` goes into a text part of type ``kind`` (``text/plain``, ``text/html``), transfer
    encoding ``cte`` and Content-Type ``params``; None when it cannot (an unknown charset or transfer
    encoding). ``collides`` tells whether lines written as they are could be read as a delimiter."""
    if cte not in IDENTITY_ENCODINGS and cte not in ("quoted-printable", "base64"):
        return None
    charsets = params.get("charset")
    charset = charsets[0] if charsets else None
    codec = _text_codec(charset or "us-ascii")
    if codec is None:
        return None
    text = footer.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")
    out_charset, transcode = charset, None
    if codec == "ascii":
        if not text.isascii():
            out_charset = "utf-8"  # a superset: the content stays as it is
    elif _ascii_compatible(codec):
        try:
            text.encode(codec)
        except UnicodeError:
            out_charset, transcode = "utf-8", codec
    else:
        out_charset, transcode = "utf-8", codec
    encoded = text.encode(codec if out_charset == charset else "utf-8")
    out_cte = cte
    if cte in IDENTITY_ENCODINGS and (
        transcode is not None or (cte == "7bit" and not encoded.isascii()) or collides(encoded.split(CRLF))
    ):
        out_cte = "quoted-printable"
    new_type = _content_type(kind, params, "utf-8") if out_charset != charset else None
    new_cte = out_cte if out_cte != cte else None
    return Recoding(cte, out_cte, transcode, encoded, kind == "text/html", new_type, new_cte)


def header_change(content_type: str | None, cte: str | None) -> Callable[[HeaderBlock], None]:
    """The change to the message's own header fields when the message itself is the part."""

    def change(headers: HeaderBlock) -> None:
        if content_type is not None:
            headers.set("Content-Type", content_type)
        if cte is not None:
            headers.set("Content-Transfer-Encoding", cte)
        if headers.get("MIME-Version") is None:
            headers.add("MIME-Version", "1.0")

    return change


def changed_header(
    fields: Iterable[tuple[bytes | None, bytes | bytearray]], content_type: str | None, cte: str | None
) -> bytes:
    """A part's header block, given as its ``fields`` (lower-case name or None for a stray line, the field as
    written out), with new Content-Type and/or Content-Transfer-Encoding values."""
    out: list[bytes] = []
    wanted = {
        b"content-type": ("Content-Type", content_type),
        b"content-transfer-encoding": ("Content-Transfer-Encoding", cte),
    }
    done: set[bytes] = set()
    for name, raw in fields:
        if name in wanted and wanted[name][1] is not None:
            if name not in done:
                title, value = wanted[name]
                assert value is not None
                out.append(encode_field(title, value))
                done.add(name)
            continue
        out.append(bytes(raw))
    for name, (title, value) in wanted.items():
        if value is not None and name not in done:
            out.append(encode_field(title, value))
    return b"".join(out) + CRLF


class FooterSink:
    """A body that gets a footer: decoded, maybe transcoded, held at its end, re-encoded to ``out``. When the
    part is rewritten, ``begin`` is called first (it records the change and writes the part's new header
    block). A part to transcode is first spooled, up to ``max_recode_bytes``; a larger one is copied to
    ``out`` as it was, without a footer, after ``keep_header`` has written its original header block."""

    def __init__(
        self,
        out: BodyWriter,
        recoding: Recoding,
        max_recode_bytes: int,
        begin: Callable[[], None],
        keep_header: Callable[[], None],
    ) -> None:
        self._out = out
        self._recoding = recoding
        self._max_recode_bytes = max_recode_bytes
        self._begin = begin
        self._keep_header = keep_header
        self._qp = recoding.in_cte == "quoted-printable"
        self._passthrough = False
        self._size = 0
        self._spool: tempfile.SpooledTemporaryFile[bytes] | None = None
        self._pipeline: _Pipeline | None = None
        if recoding.transcode is not None:
            self._spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY)  # noqa: SIM115
        else:
            self._start()

    def _start(self) -> None:
        self._begin()
        self._pipeline = _Pipeline(self._out, self._recoding)

    def feed(self, data: bytes) -> None:
        if self._passthrough:
            self._out.write(data, self._qp)
        elif self._spool is not None:
            self._size += len(data)
            if self._size > self._max_recode_bytes:
                self._give_up(data)
            else:
                self._spool.write(data)
        else:
            assert self._pipeline is not None
            self._pipeline.feed(data)

    def _give_up(self, data: bytes) -> None:
        """Too large to transcode: the part as it was, without a footer."""
        assert self._spool is not None
        self._keep_header()
        for chunk in _spooled(self._spool):
            self._out.write(chunk, self._qp)
        self._out.write(data, self._qp)
        self._spool.close()
        self._spool = None
        self._passthrough = True

    def finish(self) -> None:
        if self._passthrough:
            return
        if self._spool is not None:
            self._start()
            assert self._pipeline is not None
            for chunk in _spooled(self._spool):
                self._pipeline.feed(chunk)
            self._spool.close()
            self._spool = None
        assert self._pipeline is not None
        self._pipeline.finish()


def _spooled(spool: tempfile.SpooledTemporaryFile[bytes]) -> Iterator[bytes]:
    """The spooled bytes in chunks that do not split a CRLF."""
    spool.seek(0)
    while chunk := spool.read(CHUNK_SIZE):
        if chunk.endswith(b"\r"):
            chunk += spool.read(1)
        yield chunk


class _Pipeline:
    """Decoder, transcoder, the held tail where the footer goes, encoder."""

    def __init__(self, out: BodyWriter, recoding: Recoding) -> None:
        self._recoding = recoding
        self._decoder: TransferDecoder | None = transfer_decoder(recoding.in_cte)
        self._transcoder = None
        if recoding.transcode is not None:
            self._transcoder = codecs.getincrementaldecoder(recoding.transcode)("replace")
        self._encoder: Encoder
        if recoding.out_cte == "base64":
            self._encoder = Base64Encoder(out)
        elif recoding.out_cte == "quoted-printable":
            self._encoder = QuotedPrintableEncoder(out)
        else:
            self._encoder = IdentityEncoder(out)
        self._tail = bytearray()

    def feed(self, data: bytes) -> None:
        if self._decoder is not None:
            data = self._decoder.feed(data)
        self._hold(self._transcoded(data, False))

    def _transcoded(self, data: bytes, final: bool) -> bytes:
        if self._transcoder is None:
            return data
        return self._transcoder.decode(data, final).encode("utf-8", "replace")

    def _hold(self, data: bytes) -> None:
        self._tail += data
        if len(self._tail) > 2 * _TAIL:
            cut = len(self._tail) - _TAIL
            self._encoder.feed(bytes(self._tail[:cut]))
            del self._tail[:cut]

    def finish(self) -> None:
        rest = self._decoder.flush() if self._decoder is not None else b""
        self._hold(self._transcoded(rest, True))
        self._encoder.feed(_with_footer(bytes(self._tail), self._recoding.footer, self._recoding.html))
        self._encoder.finish()


def _with_footer(tail: bytes, footer: bytes, html: bool) -> bytes:
    """The end of a decoded body with the footer: before the last ``</body>`` of HTML, else on lines of its
    own after the text (a final line break stays last)."""
    if html:
        ends = [match.start() for match in _BODY_END.finditer(tail)]
        if ends:
            before, after = tail[: ends[-1]], tail[ends[-1] :]
            gap = b"" if not before or before.endswith(b"\n") else CRLF
            return before + gap + footer + CRLF + after
    if not tail:
        return footer
    if tail.endswith(b"\n"):
        return tail + footer + CRLF
    return tail + CRLF + footer

"""Fuzzing the MIME walker through its two readers, the inspector (dcrouter.processing.mime) and the rewriter
(dcrouter.processing.transforms.mimerewrite), on random and structured-random messages (nested multiparts
with tricky boundaries, encapsulated messages, every transfer encoding, broken encodings and line endings).

Whatever the bytes: the inspector describes the message (a broken one as unscannable, a value) and never
raises; the rewriter rewrites or leaves the message unchanged, and never raises; neither depends on how the
input was chunked; the rewriter's output is CRLF-only with lines of at most 998 octets. Memory: the
inspector's documented bound is checked on megabytes by test_processing_mime's BigMessageTests; here the
chunk independence shows no reader keeps more than its state between chunks."""

from __future__ import annotations

import base64
import binascii
import io
import quopri
from typing import cast

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dcrouter.mail.headers import HeaderBlock, HeaderError, HeaderTooLarge, read_header_block
from dcrouter.processing.mime import MessageInfo, MimeLimits, inspect_message
from dcrouter.processing.transforms.mimerewrite import PartView, RewriteLimits, rewrite_mime
from tests.fuzzing import examples, mutated
from tests.mime_samples import MAGIC_SAMPLES

TIGHT = MimeLimits(
    max_header_bytes=400,
    max_depth=3,
    max_parts=6,
    max_decoded_bytes=2000,
    max_text_bytes=60,
    max_archive_bytes=1000,
)
LIMITS = st.sampled_from([MimeLimits(), TIGHT])

_eol = st.sampled_from([b"\r\n"] * 12 + [b"\n", b"\r", b"\r\r\n"])
_boundaries = st.sampled_from(
    [
        b"b",
        b"bb",
        b"b--",
        b"=_x",
        b"a b",
        b"",
        b"x" * 70,
        b"x" * 71,
        b"\xff",
        b'b"',
        b"b'()+_,-./:=?",
        b"--",
        b"b ",
    ]
)
_types = st.sampled_from(
    [
        b"text/plain",
        b"text/html",
        b"application/octet-stream",
        b"image/png",
        b"application/zip",
        b"TEXT/PLAIN",
        b"text/plain; charset=iso-8859-1",
        b"text/plain; charset=utf-8",
        b"text/plain; charset=x-unknown",
        b"text/",
        b"",
        b'application/x-msdownload; name="a.exe"',
        b"text/plain; name*=utf-8''%E2%82%AC.exe",
        b"text/plain; name*0=a; name*1=.e; name*2=xe",
    ]
)
_encodings = st.sampled_from(
    [
        None,
        b"7bit",
        b"8bit",
        b"binary",
        b"base64",
        b"quoted-printable",
        b"BASE64",
        b"x-uuencode",
        b"bogus",
        b"",
    ]
)
_dispositions = st.sampled_from(
    [
        None,
        b"inline",
        b"attachment",
        b'attachment; filename="inv.pdf.exe"',
        b"attachment; filename==?utf-8?q?a=2Eexe?=",
        b"attachment; filename*=''x.exe",
        b"ATTACHMENT",
        b'attachment; filename=""',
    ]
)
_contents = st.one_of(
    st.binary(max_size=120),
    st.sampled_from(list(MAGIC_SAMPLES.values())),
    st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"--b", b"--b--", b".\r\n", b"=\r\n", b"=4", b"====", b"PK\x03\x04"]),
)


def _encode(content: bytes, encoding: bytes | None, broken: bool) -> bytes:
    if broken or encoding is None:
        return content
    if encoding.lower() == b"base64":
        return base64.encodebytes(content).replace(b"\n", b"\r\n")
    if encoding.lower() == b"quoted-printable":
        return quopri.encodestring(content).replace(b"\n", b"\r\n")
    if encoding == b"x-uuencode":
        return binascii.b2a_uu(content[:45])
    return content


@st.composite
def leaf(draw: st.DrawFn) -> bytes:
    fields = []
    ctype = draw(_types)
    if ctype or draw(st.booleans()):
        fields.append(b"Content-Type: " + ctype)
    encoding = draw(_encodings)
    if encoding is not None:
        fields.append(b"Content-Transfer-Encoding: " + encoding)
    disposition = draw(_dispositions)
    if disposition is not None:
        fields.append(b"Content-Disposition: " + disposition)
    if draw(st.integers(0, 9)) == 0:
        fields.append(
            draw(
                st.sampled_from(
                    [
                        b"Content-Type: text/html",
                        b" folded",
                        b"bad line",
                        b"X: \x00",
                        b"Content-Type: multipart/mixed; boundary=b",
                    ]
                )
            )
        )
    eol = draw(_eol)
    body = _encode(draw(_contents), encoding, draw(st.integers(0, 5)) == 0)
    return eol.join(fields) + (eol if fields else b"") + eol + body


def _multipart(draw: st.DrawFn, children: st.SearchStrategy[bytes]) -> bytes:
    boundary = draw(_boundaries)
    subtype = draw(st.sampled_from([b"mixed", b"alternative", b"digest", b"related", b"MIXED"]))
    quoted = draw(st.booleans())
    value = b'"' + boundary + b'"' if quoted else boundary
    head = b"Content-Type: multipart/" + subtype + b"; boundary=" + value
    if draw(st.integers(0, 9)) == 0:
        head += draw(
            st.sampled_from([b"; boundary=other", b"\r\nContent-Type: text/plain", b"\r\n\tfolded=1"])
        )
    parts = draw(st.lists(children, max_size=4))
    eol = draw(_eol)
    out = head + eol + eol + draw(st.sampled_from([b"", b"preamble" + eol, b"--" + boundary + b"x" + eol]))
    for part in parts:
        out += b"--" + boundary + draw(st.sampled_from([b"", b"", b"  ", b"\t", b"--"])) + eol + part + eol
    ending = draw(
        st.sampled_from([b"--" + boundary + b"--", b"--" + boundary + b"--" + eol + b"epilogue", b""])
    )
    return out + ending


def _encapsulated(draw: st.DrawFn, children: st.SearchStrategy[bytes]) -> bytes:
    eol = draw(_eol)
    return b"Content-Type: message/rfc822" + eol + eol + b"Subject: inner" + eol + draw(children)


entities = st.recursive(
    leaf(),
    lambda children: st.one_of(
        st.composite(lambda draw: _multipart(draw, children))(),
        st.composite(lambda draw: _encapsulated(draw, children))(),
    ),
    max_leaves=8,
)
_top_fields = st.lists(
    st.sampled_from(
        [
            b"From: Alice <alice@example.org>",
            b"From: a@b, c@d",
            b"To: bob@example.net",
            b"Subject: =?utf-8?q?h=C3=A9?=",
            b"Subject: =?bogus?x?y?=",
            b"Message-ID: <x@y>",
            b"Date: nonsense",
            b"MIME-Version: 1.0",
            b"Received: x",
            b'From: "\xff" <x@y>',
            b"Cc: ;",
            b"To: <@a:b@c>",
            b"X-Long: " + b"y" * 1200,
        ]
    ),
    max_size=4,
)
#: Mostly a multipart at the top: that is where the walker's decisions are.
_top_entities = st.one_of(st.composite(lambda draw: _multipart(draw, entities))(), entities)
messages = st.one_of(
    st.builds(
        lambda top, body: b"\r\n".join(top) + (b"\r\n" if top else b"") + body, _top_fields, _top_entities
    ),
    st.builds(
        lambda top, body: b"\r\n".join(top) + (b"\r\n" if top else b"") + body, _top_fields, _top_entities
    ),
    mutated(st.builds(lambda top, body: b"\r\n".join(top) + b"\r\n" + body, _top_fields, entities)),
    st.binary(max_size=400),
)
chunkings = st.lists(st.integers(1, 300), min_size=1, max_size=5)


class ChunkedStream(io.RawIOBase):
    """Hands out ``data`` in the given chunk sizes (cycled), whatever size is asked for."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self._data, self._sizes, self._at, self._turn = data, sizes, 0, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self._data[self._at : self._at + self._sizes[self._turn % len(self._sizes)]]
        self._at += len(chunk)
        self._turn += 1
        return chunk


def inspect(data: bytes, limits: MimeLimits, sizes: list[int] | None = None) -> MessageInfo:
    stream = cast(io.BufferedIOBase, ChunkedStream(data, sizes)) if sizes else io.BytesIO(data)
    return inspect_message(stream, limits)  # type: ignore[arg-type]


def replace_executables(view: PartView) -> str | None:
    names = [n.lower() for n in view.names]
    if any(n.endswith(".exe") for n in names) or view.sniffed_type == "application/x-msdownload":
        return f"[{view.path} removed]"
    return None


def rewrite(
    data: bytes, limits: MimeLimits, sizes: list[int] | None, footer: bool
) -> tuple[bool, bytes] | str:
    try:
        block, offset = read_header_block(io.BytesIO(data), limits.max_header_bytes)
    except HeaderTooLarge:
        return "header too large"  # refused with 552 5.3.4 (EmailProcessor.extract_metadata)
    except HeaderError:
        block, offset = HeaderBlock([], True), 0  # not a header block: all body, as the processor reads it
    body = data[offset:]
    stream = ChunkedStream(body, sizes) if sizes else io.BytesIO(body)
    out = io.BytesIO()
    changed = rewrite_mime(
        block,
        stream,  # type: ignore[arg-type]
        out,
        replace=replace_executables,
        footer_text="-- \r\nfooter é" if footer else None,
        footer_html="<p>footer</p>" if footer else None,
        limits=RewriteLimits.from_mime(limits, max_recode_bytes=2000),
    )
    return changed, block.to_bytes() + out.getvalue() if changed else b""


class MimeFuzzTests(SynchronousTestCase):
    @examples(1)
    @given(messages, LIMITS, chunkings)
    def test_inspector(self, data: bytes, limits: MimeLimits, sizes: list[int]) -> None:
        whole = inspect(data, limits)
        self.assertEqual(whole.size, len(data))
        self.assertEqual(inspect(data, limits, sizes), whole)
        if whole.unscannable is not None:
            self.assertIn(whole.unscannable, whole.defects)
        self.assertLessEqual(len(whole.parts), limits.max_parts + 1)
        self.assertLessEqual(len(whole.text.encode()), limits.max_text_bytes + 4)

    @examples(1)
    @given(messages, LIMITS, chunkings, st.booleans())
    def test_rewriter(self, data: bytes, limits: MimeLimits, sizes: list[int], footer: bool) -> None:
        whole = rewrite(data, limits, None, footer)
        self.assertEqual(rewrite(data, limits, sizes, footer), whole)
        if not isinstance(whole, tuple) or not whole[0]:
            return
        output = whole[1]
        body = output[output.find(b"\r\n\r\n") + 4 :] if b"\r\n\r\n" in output else b""
        self.assertNotIn(b"\r", body.replace(b"\r\n", b""), "bare CR")
        self.assertNotIn(b"\n", body.replace(b"\r\n", b""), "bare LF")
        self.assertLessEqual(max(len(line) for line in body.split(b"\r\n")), 998)
        # What was rewritten reads back: the inspector finds no executable left where one was replaced.
        again = inspect(output, MimeLimits())
        for part in again.parts:
            self.assertFalse(
                any(n.lower().endswith(".exe") for n in part.names)
                and part.complete
                and again.unscannable is None
                and part.declared_type != "text/plain",
                part,
            )

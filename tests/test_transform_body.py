"""Tests for the body transformations: the streaming MIME rewriter (transforms.mimerewrite),
``removeAttachment``/``sanitizeAttachment`` and ``addFooter``. Results are checked byte for byte where bytes
must not change and with Python's own email parser where the structure must stay valid."""

from __future__ import annotations

import email
import email.policy
import hashlib
import io
import tempfile
import tracemalloc
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any, BinaryIO, cast

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from dcrouter.config.processing import TransformationConfig
from dcrouter.interfaces import ITransformation
from dcrouter.mail.envelope import Envelope
from dcrouter.mail.headers import HeaderBlock, read_header_block
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.processing.message import Draft
from dcrouter.processing.mime import inspect_message
from dcrouter.processing.transforms.attachments import RemoveAttachment, SanitizeAttachment
from dcrouter.processing.transforms.footer import AddFooter, html_footer
from dcrouter.processing.transforms.mimerewrite import PartView, RewriteLimits, rewrite_mime
from tests import mime_samples as samples
from tests.mime_samples import CRLF, attachment, entity, headers, message, multipart, text_part
from tests.test_processing_mime import TREES, Tree, render

EXE = samples.MAGIC_SAMPLES["application/x-msdownload"] + bytes(500)
EXE_PART = attachment("invoice.pdf.exe", EXE)
TEXT = text_part("Hello world\r\nsecond line")


class ChunkedStream(io.RawIOBase):
    """Hands out ``data`` in the given chunk sizes (cycled), whatever size is asked for."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self._data = data
        self._sizes = sizes
        self._at = 0
        self._turn = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self._data[self._at : self._at + self._sizes[self._turn % len(self._sizes)]]
        self._at += len(chunk)
        self._turn += 1
        return chunk


class CountingSink(io.RawIOBase):
    """Keeps only a hash and the size of what is written (the big-message tests must not hold it)."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0
        self.tail = b""

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        data = bytes(data)
        self.sha.update(data)
        self.size += len(data)
        self.tail = (self.tail + data)[-4096:]
        return len(data)


def mixed(*parts: bytes, boundary: bytes = b"b", kind: str = "mixed") -> bytes:
    ctype = f'multipart/{kind}; boundary="{boundary.decode()}"'
    return message(headers(("Content-Type", ctype)), multipart(boundary, list(parts)))


def split(data: bytes) -> tuple[HeaderBlock, bytes]:
    block, offset = read_header_block(io.BytesIO(data), 256 * 1024)
    return block, data[offset:]


def rewrite(data: bytes, sizes: list[int] | None = None, **options: Any) -> tuple[bool, bytes, HeaderBlock]:
    """(changed, the whole message as it then stands, the header block)."""
    block, body = split(data)
    before = block.to_bytes()
    stream = cast(BinaryIO, ChunkedStream(body, sizes)) if sizes else io.BytesIO(body)
    out = io.BytesIO()
    changed = rewrite_mime(block, stream, out, **options)
    if not changed:
        assert block.to_bytes() == before, "headers changed although the message was not"
        return False, data, block
    return True, block.to_bytes() + out.getvalue(), block


def parse(data: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def leaves(parsed: EmailMessage) -> list[EmailMessage]:
    return [p for p in parsed.walk() if not p.is_multipart()]


def replace_names(*suffixes: str) -> Callable[[PartView], str | None]:
    def replace(view: PartView) -> str | None:
        if view.filename and view.filename.lower().endswith(suffixes):
            return f"[attachment {view.filename} removed by policy]"
        return None

    return replace


class WireChecks:
    """What every output must be: CRLF only, lines of at most 998 octets."""

    def assertWireClean(self, data: bytes) -> None:
        tc: Any = self
        tc.assertNotIn(b"\r", data.replace(CRLF, b""), "bare CR")
        tc.assertNotIn(b"\n", data.replace(CRLF, b""), "bare LF")
        tc.assertLessEqual(max(len(line) for line in data.split(CRLF)), 998)


class ReplaceTests(SynchronousTestCase, WireChecks):
    def test_attachment_replaced_text_untouched(self) -> None:
        data = mixed(TEXT, EXE_PART)
        changed, result, _ = rewrite(data, replace=replace_names(".exe"))
        self.assertTrue(changed)
        self.assertWireClean(result)
        # Everything up to the attachment's delimiter is the original, byte for byte.
        cut = data.index(b"--b" + CRLF + b"Content-Type: application/octet-stream")
        self.assertEqual(result[:cut], data[:cut])
        self.assertTrue(result.endswith(b"--b--" + CRLF))
        parsed = parse(result)
        self.assertEqual(parsed.get_content_type(), "multipart/mixed")
        first, second = leaves(parsed)
        self.assertEqual(first.get_content(), "Hello world\r\nsecond line")
        self.assertEqual(second.get_content_type(), "text/plain")
        self.assertEqual(second.get_content_charset(), "utf-8")
        self.assertIsNone(second.get_content_disposition())
        self.assertEqual(second.get_content(), "[attachment invoice.pdf.exe removed by policy]")
        self.assertNotIn(b"TVqQ", result)  # the executable's base64
        info = inspect_message(io.BytesIO(result))
        self.assertIsNone(info.unscannable)
        self.assertEqual([p.path for p in info.parts], ["1", "2"])

    def test_nothing_to_replace_is_unchanged(self) -> None:
        changed = rewrite(mixed(TEXT, EXE_PART), replace=replace_names(".zip"))[0]
        self.assertFalse(changed)

    def test_non_ascii_replacement_text_is_quoted_printable(self) -> None:
        changed, result, _ = rewrite(
            mixed(TEXT, EXE_PART), replace=lambda v: "entfernt: ä" if v.names else None
        )
        self.assertTrue(changed)
        self.assertIn(b"Content-Transfer-Encoding: quoted-printable", result)
        self.assertEqual(leaves(parse(result))[1].get_content(), "entfernt: ä")

    def test_hostile_name_cannot_inject_a_delimiter(self) -> None:
        changed, result, _ = rewrite(
            mixed(TEXT, EXE_PART),
            replace=lambda v: "x\n--b--\n--b\nContent-Type: text/html" if v.names else None,
        )
        self.assertTrue(changed)
        self.assertWireClean(result)
        info = inspect_message(io.BytesIO(result))
        self.assertEqual(
            [(p.path, p.declared_type) for p in info.parts], [("1", "text/plain"), ("2", "text/plain")]
        )
        self.assertIsNone(info.unscannable)
        self.assertEqual(
            leaves(parse(result))[1].get_content(), "x\r\n--b--\r\n--b\r\nContent-Type: text/html"
        )

    def test_nested_multipart_alternative(self) -> None:
        alternative = entity(
            headers(("Content-Type", 'multipart/alternative; boundary="alt"')),
            multipart(b"alt", [TEXT, text_part("<p>Hello</p>", "text/html")]),
        )
        zipped = attachment("archive.zip", samples.MAGIC_SAMPLES["application/zip"])
        data = mixed(alternative, EXE_PART, zipped)
        seen: list[str] = []

        def replace(view: PartView) -> str | None:
            seen.append(view.path)
            return "gone" if view.sniffed_type == "application/x-msdownload" else None

        changed, result, _ = rewrite(data, replace=replace)
        self.assertTrue(changed)
        self.assertEqual(seen, ["1.1", "1.2", "2", "3"])
        cut = data.index(b"--b" + CRLF + b"Content-Type: application/octet-stream")
        self.assertEqual(result[:cut], data[:cut])
        self.assertIn(zipped, result)
        kinds = [p.get_content_type() for p in parse(result).walk()]
        self.assertEqual(
            kinds,
            [
                "multipart/mixed",
                "multipart/alternative",
                "text/plain",
                "text/html",
                "text/plain",
                "application/octet-stream",
            ],
        )

    def test_message_that_is_an_attachment(self) -> None:
        data = message(
            headers(
                ("Content-Type", 'application/x-msdownload; name="setup.exe"'),
                ("Content-Disposition", 'attachment; filename="setup.exe"'),
                ("Content-Transfer-Encoding", "base64"),
            ),
            samples.b64(EXE),
        )
        changed, result, block = rewrite(data, replace=replace_names(".exe"))
        self.assertTrue(changed)
        self.assertWireClean(result)
        self.assertEqual(block.get("Content-Type"), "text/plain; charset=utf-8")
        self.assertEqual(block.get("Content-Transfer-Encoding"), "7bit")
        self.assertIsNone(block.get("Content-Disposition"))
        self.assertEqual(block.get("Subject"), "sample")
        parsed = parse(result)
        self.assertEqual(parsed.get_content(), "[attachment setup.exe removed by policy]\r\n")

    def test_attachment_inside_a_forwarded_message(self) -> None:
        inner = message(
            headers(("Content-Type", 'multipart/mixed; boundary="in"')), multipart(b"in", [TEXT, EXE_PART])
        )
        forwarded = entity(headers(("Content-Type", "message/rfc822")), inner)
        data = mixed(text_part("see below"), forwarded)
        changed, result, _ = rewrite(data, replace=replace_names(".exe"), footer_text="FOOTER")
        self.assertTrue(changed)
        parsed = parse(result)
        texts = [p.get_content() for p in leaves(parsed)]
        self.assertEqual(texts[0], "see below\r\nFOOTER")
        self.assertEqual(texts[1], "Hello world\r\nsecond line")  # inside the forwarded message: no footer
        self.assertEqual(texts[2], "[attachment invoice.pdf.exe removed by policy]")
        self.assertEqual([p.path for p in inspect_message(io.BytesIO(result)).parts], ["1", "2.1", "2.2"])

    def test_forwarded_single_part_attachment_keeps_its_message_fields(self) -> None:
        inner = message(
            headers(
                ("Content-Type", 'application/octet-stream; name="x.exe"'),
                ("Content-Transfer-Encoding", "base64"),
            ),
            samples.b64(EXE),
        )
        data = mixed(TEXT, entity(headers(("Content-Type", "message/rfc822")), inner))
        changed, result, _ = rewrite(data, replace=replace_names(".exe"))
        self.assertTrue(changed)
        forwarded = leaves(parse(result))[1]
        self.assertEqual(forwarded["Subject"], "sample")
        self.assertEqual(forwarded.get_content_type(), "text/plain")
        self.assertEqual(forwarded.get_content(), "[attachment x.exe removed by policy]")

    def test_raw_eight_bit_byte_in_a_file_name(self) -> None:
        part = entity(b"Content-Disposition: attachment; filename*=utf-8''a\x84b.exe\r\n", EXE)
        changed, result, _ = rewrite(mixed(TEXT, part), replace=replace_names(".exe"))
        self.assertTrue(changed)
        self.assertEqual(
            leaves(parse(result))[1].get_content(), "[attachment a\ufffdb.exe removed by policy]"
        )

    def test_paths_and_views_agree_with_the_mime_walker(self) -> None:
        inner = message(
            headers(("Content-Type", 'multipart/mixed; boundary="in"')), multipart(b"in", [TEXT, EXE_PART])
        )
        single = message(b"", b"just text" + CRLF)
        digest = entity(
            headers(("Content-Type", 'multipart/digest; boundary="dg"')), multipart(b"dg", [single, single])
        )
        alternative = entity(
            headers(("Content-Type", 'multipart/alternative; boundary="alt"')),
            multipart(b"alt", [TEXT, text_part("<p>x</p>", "text/html")]),
        )
        data = mixed(
            alternative,
            entity(headers(("Content-Type", "message/rfc822")), inner),
            entity(headers(("Content-Type", "message/rfc822")), single),
            digest,
            attachment("=?utf-8?q?r=C3=A9sum=C3=A9?=.pdf", samples.MAGIC_SAMPLES["application/pdf"]),
            entity(headers(("Content-Type", "text/plain")), b""),
        )
        views: list[PartView] = []
        self.assertFalse(rewrite(data, replace=views.append)[0])
        parts = inspect_message(io.BytesIO(data)).parts
        self.assertEqual(
            [(v.path, v.declared_type, v.names, v.sniffed_type, v.is_attachment) for v in views],
            [(p.path, p.declared_type, p.names, p.sniffed_type, p.is_attachment) for p in parts],
        )
        self.assertEqual(
            [v.path for v in views], ["1.1", "1.2", "2.1", "2.2", "3.1", "4.1.1", "4.2.1", "5", "6"]
        )

    def test_part_without_header_or_content_replaced(self) -> None:
        top = b"From: a@example.org\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        data = top + b"--b\r\n--b\r\n" + TEXT + b"\r\n--b--\r\n"
        changed, result, _ = rewrite(data, replace=lambda view: "gone" if view.path == "1" else None)
        self.assertTrue(changed)
        self.assertIn(b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n", result)
        self.assertEqual(
            [p.get_content() for p in leaves(parse(result))], ["gone", "Hello world\r\nsecond line"]
        )

    def test_part_without_body_is_copied_exactly(self) -> None:
        data = mixed(b"Content-Type: text/plain", EXE_PART)
        changed, result, _ = rewrite(data, replace=replace_names(".exe"))
        self.assertTrue(changed)
        self.assertTrue(result.startswith(data[: data.index(b"Content-Type: text/plain") + 30]))
        self.assertIn(b"--b" + CRLF + b"Content-Type: text/plain" + CRLF + b"--b" + CRLF, result)


class BrokenStructureTests(SynchronousTestCase):
    def assertUnchanged(self, data: bytes) -> None:
        changed = rewrite(data, replace=lambda v: "x", footer_text="F")[0]
        self.assertFalse(changed)

    def test_bare_cr_in_a_header_block(self) -> None:
        # Found by fuzzing (tests/test_fuzz_mime.py): dropping the bare CRs of "message/rfc822\r\r\n\r\r\n"
        # made an empty line of "\r\r\n", so the output held an encapsulated message with an .exe (2.1)
        # that the walker had read as a text/plain leaf, and that was never replaced.
        forwarded = (
            b"Content-Type: message/rfc822\r\r\n\r\r\nSubject: inner\r\r\n"
            b'Content-Type: application/x-msdownload; name="a.exe"\r\n\r\n'
        )
        self.assertUnchanged(mixed(EXE_PART, forwarded))

    def test_unclosed_boundary(self) -> None:
        self.assertUnchanged(samples.unclosed_boundary())

    def test_inner_closed_by_outer_boundary(self) -> None:
        inner = entity(headers(("Content-Type", "multipart/alternative; boundary=in")), b"--in" + CRLF + TEXT)
        self.assertUnchanged(mixed(inner, EXE_PART))

    def test_conflicting_content_type(self) -> None:
        part = entity(
            headers(("Content-Type", "text/plain"), ("Content-Type", "application/x-msdownload")), b"MZ"
        )
        self.assertUnchanged(mixed(part))

    def test_multipart_without_boundary(self) -> None:
        self.assertUnchanged(message(headers(("Content-Type", "multipart/mixed")), b"--x" + CRLF + TEXT))

    def test_too_deep(self) -> None:
        self.assertUnchanged(samples.deep_nesting(30))

    def test_huge_part_header(self) -> None:
        self.assertUnchanged(samples.huge_part_header(300 * 1024))

    def test_limits(self) -> None:
        data = mixed(TEXT, TEXT, TEXT)
        changed, _, _ = rewrite(data, footer_text="F", limits=RewriteLimits(max_parts=2))
        self.assertFalse(changed)


class FooterTests(SynchronousTestCase, WireChecks):
    def footer(
        self, data: bytes, text: str | None = "-- \nSent by ACME", html: str | None = None
    ) -> EmailMessage:
        changed, result, _ = rewrite(data, footer_text=text, footer_html=html)
        self.assertTrue(changed)
        self.assertWireClean(result)
        self.assertIsNone(inspect_message(io.BytesIO(result)).unscannable)
        return parse(result)

    def part(self, fields: tuple[tuple[str, str], ...], body: bytes) -> bytes:
        return mixed(entity(headers(*fields), body), EXE_PART)

    def test_eight_bit(self) -> None:
        parsed = self.footer(mixed(text_part("Grüße"), EXE_PART), text="Grüße, ACME")
        first = leaves(parsed)[0]
        self.assertEqual(first["Content-Transfer-Encoding"], "8bit")
        self.assertEqual(first.get_content(), "Grüße\r\nGrüße, ACME")

    def test_footer_in_a_part_without_content(self) -> None:
        """The footer becomes the content of a text part that had none, whether its header block ended with
        its empty line, was cut short by the next delimiter or was not there at all; the delimiter after it
        stays on a line of its own, so the message keeps its parts."""
        top = b"From: a@example.org\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        for first in (b"Content-Type: text/plain\r\n\r\n", b"Content-Type: text/plain\r\n", b""):
            data = top + b"--b\r\n" + first + b"--b\r\n" + EXE_PART + b"\r\n--b--\r\n"
            before = inspect_message(io.BytesIO(data)).parts
            parsed = self.footer(data, text="Sent by ACME")
            self.assertEqual(
                [p.get_content_type() for p in leaves(parsed)], ["text/plain", before[1].declared_type]
            )
            self.assertEqual(leaves(parsed)[0].get_content(), "Sent by ACME", first)

    def test_seven_bit_ascii_footer_keeps_the_part_fields(self) -> None:
        data = self.part((("Content-Type", "text/plain; charset=us-ascii"),), b"Hello")
        changed, result, _ = rewrite(data, footer_text="-- \nSent by ACME")
        self.assertTrue(changed)
        part = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nHello\r\n-- \r\nSent by ACME\r\n"
        self.assertIn(b"--b\r\n" + part + b"--b\r\n", result)
        self.assertIn(EXE_PART, result)

    def test_seven_bit_with_non_ascii_footer_becomes_quoted_printable(self) -> None:
        data = self.part((("Content-Type", "text/plain"), ("Content-Transfer-Encoding", "7bit")), b"Hello")
        first = leaves(self.footer(data, text="Gesendet über ACME"))[0]
        self.assertEqual(first["Content-Transfer-Encoding"], "quoted-printable")
        self.assertEqual(first.get_content_charset(), "utf-8")
        self.assertEqual(first.get_content(), "Hello\r\nGesendet über ACME")

    def test_quoted_printable_ending_in_a_soft_break(self) -> None:
        body = b"caf=E9 au lait, a line long enough to need its soft=\r\n break and then=\r\n"
        fields = (
            ("Content-Type", "text/plain; charset=iso-8859-1"),
            ("Content-Transfer-Encoding", "quoted-printable"),
        )
        first = leaves(self.footer(self.part(fields, body), text="Envoyé par ACME"))[0]
        self.assertEqual(first.get_content_charset(), "iso-8859-1")
        self.assertEqual(
            first.get_content(),
            "café au lait, a line long enough to need its soft break and then\r\nEnvoyé par ACME",
        )

    def test_base64(self) -> None:
        text = ("Zeile mit Umlauten äöü\r\n" * 40).encode("utf-8")
        fields = (("Content-Type", "text/plain; charset=utf-8"), ("Content-Transfer-Encoding", "base64"))
        changed, result, _ = rewrite(self.part(fields, samples.b64(text)), footer_text="Fußzeile")
        self.assertTrue(changed)
        self.assertWireClean(result)
        first = leaves(parse(result))[0]
        self.assertEqual(first["Content-Transfer-Encoding"], "base64")
        self.assertEqual(first.get_content(), text.decode() + "Fußzeile\r\n")
        lines = result[result.index(b"base64\r\n\r\n") + 10 : result.index(b"\r\n--b")].split(CRLF)
        self.assertTrue(all(len(line) == 76 for line in lines[:-1]))

    def test_latin1_part_transcoded_for_a_footer_it_cannot_carry(self) -> None:
        fields = (
            ("Content-Type", "text/plain; charset=iso-8859-1; format=flowed"),
            ("Content-Transfer-Encoding", "8bit"),
        )
        first = leaves(
            self.footer(
                self.part(fields, "Ça coûte 5 €?".encode("cp1252").replace(b"\x80", b"E")), text="Prix en €"
            )
        )[0]
        self.assertEqual(first.get_content_charset(), "utf-8")
        self.assertEqual(first.get_param("format"), "flowed")
        self.assertEqual(first["Content-Transfer-Encoding"], "quoted-printable")
        self.assertEqual(first.get_content(), "Ça coûte 5 E?\r\nPrix en €")

    def test_transcoding_is_capped(self) -> None:
        fields = (("Content-Type", "text/plain; charset=iso-8859-1"), ("Content-Transfer-Encoding", "8bit"))
        data = self.part(fields, b"\xe9t\xe9" * 1000)
        changed, result, _ = rewrite(data, footer_text="€", limits=RewriteLimits(max_recode_bytes=1000))
        self.assertFalse(changed)
        changed, result, _ = rewrite(data, footer_text="€", limits=RewriteLimits(max_recode_bytes=4000))
        self.assertTrue(changed)
        self.assertEqual(leaves(parse(result))[0].get_content(), "été" * 1000 + "\r\n€")

    def test_html_footer_before_body_end(self) -> None:
        html = b"<html><body><p>Hi</p>\r\n</BODY>\r\n</html>"
        alternative = entity(
            headers(("Content-Type", 'multipart/alternative; boundary="alt"')),
            multipart(b"alt", [TEXT, entity(headers(("Content-Type", "text/html; charset=utf-8")), html)]),
        )
        parsed = self.footer(mixed(alternative, EXE_PART), text="ACME", html="<p>ACME</p>")
        plain, markup, _ = leaves(parsed)
        self.assertEqual(plain.get_content(), "Hello world\r\nsecond line\r\nACME")
        self.assertEqual(markup.get_content(), "<html><body><p>Hi</p>\r\n<p>ACME</p>\r\n</BODY>\r\n</html>")

    def test_html_without_body_end_gets_it_appended(self) -> None:
        data = self.part((("Content-Type", "text/html"),), b"<p>Hi</p>")
        parsed = self.footer(data, text=None, html="<p>ACME</p>")
        self.assertEqual(leaves(parsed)[0].get_content(), "<p>Hi</p>\r\n<p>ACME</p>")

    def test_only_the_first_text_parts_and_never_attachments(self) -> None:
        named = entity(
            headers(
                ("Content-Type", "text/plain"), ("Content-Disposition", 'attachment; filename="notes.txt"')
            ),
            b"notes",
        )
        data = mixed(named, TEXT, text_part("second text"))
        texts = [p.get_content() for p in leaves(self.footer(data, text="F"))]
        self.assertEqual(texts, ["notes", "Hello world\r\nsecond line\r\nF", "second text"])

    def test_single_part_text_message(self) -> None:
        data = message(headers(("Content-Type", "text/plain; charset=utf-8")), b"Hello\r\nthere\r\n")
        changed, result, block = rewrite(data, footer_text="-- \nACME")
        self.assertTrue(changed)
        self.assertEqual(result, data + b"-- \r\nACME\r\n")
        self.assertFalse(block.changed)

    def test_single_part_message_needing_new_fields(self) -> None:
        data = message(b"", b"Hello")  # no Content-Type: us-ascii text
        changed, result, block = rewrite(data, footer_text="Grüße")
        self.assertTrue(changed)
        self.assertEqual(block.get("Content-Type"), "text/plain; charset=utf-8")
        self.assertEqual(block.get("Content-Transfer-Encoding"), "quoted-printable")
        self.assertEqual(parse(result).get_content(), "Hello\r\nGrüße")

    def test_footer_line_like_a_delimiter_is_encoded(self) -> None:
        data = self.part((("Content-Type", "text/plain"),), b"Hello")
        first = leaves(self.footer(data, text="--b--"))[0]
        self.assertEqual(first["Content-Transfer-Encoding"], "quoted-printable")
        self.assertEqual(first.get_content(), "Hello\r\n--b--")

    def test_unknown_charset_gets_no_footer(self) -> None:
        data = self.part((("Content-Type", "text/plain; charset=x-unknown"),), b"Hello")
        self.assertFalse(rewrite(data, footer_text="F")[0])

    def test_utf16_part_is_transcoded(self) -> None:
        fields = (("Content-Type", "text/plain; charset=utf-16"), ("Content-Transfer-Encoding", "base64"))
        first = leaves(self.footer(self.part(fields, samples.b64("Hällo".encode("utf-16"))), text="F"))[0]
        self.assertEqual(first.get_content_charset(), "utf-8")
        self.assertEqual(first.get_content(), "Hällo\r\nF")


class WireTests(SynchronousTestCase, WireChecks):
    def test_chunking_does_not_change_the_result(self) -> None:
        alternative = entity(
            headers(("Content-Type", 'multipart/alternative; boundary="alt"')),
            multipart(b"alt", [TEXT, text_part("<html><body>x</body></html>", "text/html", "iso-8859-1")]),
        )
        qp = entity(
            headers(
                ("Content-Type", "text/plain; charset=iso-8859-1"),
                ("Content-Transfer-Encoding", "quoted-printable"),
            ),
            b"soft=\r\nbreak =E9" + b"x" * 3000,
        )
        data = mixed(alternative, EXE_PART, qp, b"Content-Type: text/plain\r\n\r\n" + b"y" * 200_000)
        options: dict[str, Any] = {
            "replace": replace_names(".exe"),
            "footer_text": "Fußzeile €",
            "footer_html": "<i>€</i>",
        }
        expected = rewrite(data, **options)[1]
        for sizes in ([1], [2, 3, 5, 7], [4096], [65_537, 1]):
            self.assertEqual(rewrite(data, sizes, **options)[1], expected, sizes)

    def test_output_is_clean_even_when_the_input_is_not(self) -> None:
        long_line = b"a" * 997 + b"--b--" + b"c" * 3000
        qp_long = b"=E9" * 400 + b"-" * 1200
        data = (
            b"From: a@example.org\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
            b"--b\nContent-Type: text/plain\n\nbare LF\nand bare\rCR\r\n" + long_line + b"\r\n"
            b"--b\r\nContent-Type: text/plain\r\nX-Long: " + b"h" * 2000 + b"\r\n\r\n" + long_line + b"\r\n"
            b"--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n"
            b"Content-Disposition: attachment\r\n\r\n" + qp_long + b"\r\n"
            b"--b\r\n" + EXE_PART + b"\r\n--b--\r\n"
        )
        before = inspect_message(io.BytesIO(data))
        self.assertIsNone(before.unscannable)
        changed, result, _ = rewrite(data, replace=replace_names(".exe"), footer_text="F")
        self.assertTrue(changed)
        self.assertWireClean(result)
        after = inspect_message(io.BytesIO(result))
        self.assertIsNone(after.unscannable)
        self.assertEqual([p.path for p in after.parts], [p.path for p in before.parts])
        parsed = leaves(parse(result))
        # The long line is broken by CRLF SP (white space, never a delimiter).
        self.assertEqual(
            parsed[0].get_content().replace("\r\n ", ""),
            f"bare LF\r\nand bareCR\r\n{long_line.decode()}\r\nF",
        )
        self.assertEqual(parsed[2].get_payload(decode=True), b"\xe9" * 400 + b"-" * 1200)


class WalkerTests(SynchronousTestCase):
    """The rewriter reads messages with the inspector's walker: the same parts, whatever the chunks."""

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(TREES, st.lists(st.integers(1, 300), min_size=1, max_size=20), st.booleans())
    def test_same_parts_as_the_inspector_and_output_independent_of_chunks(
        self, tree: Tree, sizes: list[int], bare_lf: bool
    ) -> None:
        data = headers(("From", "a@example.org")) + render(tree, [0])
        if bare_lf:  # in the body: the message's own header block reaches processing with CRLF (the spool's)
            head, _, body = data.partition(CRLF + CRLF)
            data = head + CRLF + CRLF + body.replace(CRLF, b"\n")
        views: list[PartView] = []

        def replace(view: PartView) -> str | None:
            views.append(view)
            return "gone" if view.transfer_encoding == "base64" else None

        changed, whole, _ = rewrite(data, replace=replace, footer_text="F")
        parts = inspect_message(io.BytesIO(data)).parts
        self.assertEqual(
            [(v.path, v.declared_type, v.names, v.sniffed_type, v.is_attachment) for v in views],
            [(p.path, p.declared_type, p.names, p.sniffed_type, p.is_attachment) for p in parts],
        )
        self.assertEqual(rewrite(data, sizes, replace=replace, footer_text="F")[:2], (changed, whole))
        if changed:
            self.assertEqual(
                [p.path for p in inspect_message(io.BytesIO(whole)).parts], [p.path for p in parts]
            )


class BigMessageTests(SynchronousTestCase):
    def big(self) -> tuple[HeaderBlock, Any]:
        spool = tempfile.TemporaryFile()  # noqa: SIM115 (closed by the cleanup)
        self.addCleanup(spool.close)
        samples.write_big_message(spool, 5)
        spool.seek(0)
        block, offset = read_header_block(spool, 256 * 1024)
        spool.seek(offset)
        return block, spool

    def run_bounded(self, **options: Any) -> tuple[bool, CountingSink]:
        block, body = self.big()
        out = CountingSink()
        tracemalloc.start()
        try:
            changed = rewrite_mime(block, body, cast(BinaryIO, out), **options)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 4 * 1024 * 1024)
        return changed, out

    def test_footer_on_a_big_message(self) -> None:
        changed, out = self.run_bounded(footer_text="ACME")
        self.assertTrue(changed)
        self.assertGreater(out.size, 5 * 1024 * 1024)
        self.assertTrue(out.tail.endswith(b"--big--" + CRLF))

    def test_big_attachment_replaced(self) -> None:
        changed, out = self.run_bounded(replace=lambda v: "gone" if v.names else None)
        self.assertTrue(changed)
        self.assertLess(out.size, 4096)
        self.assertIn(b"\r\n\r\ngone\r\n--big--\r\n", out.tail)


# -- the transformations --


def make_draft(
    data: bytes, recipients: tuple[str, ...] = ("bob@example.com",), inspect: bool = True
) -> Draft:
    block, offset = read_header_block(io.BytesIO(data), 256 * 1024)
    return Draft(
        queue_id="Q1",
        envelope=Envelope("alice@example.org", list(recipients)),
        source=SpooledMessage(len(data), data=data),
        headers=block,
        body_offset=offset,
        run_in_thread=defer.maybeDeferred,
        info=inspect_message(io.BytesIO(data)) if inspect else None,
    )


def no_threads(work: Callable[[], Any]) -> Any:
    raise AssertionError("the body was copied although nothing matched")


def config(kind: str, **keys: Any) -> TransformationConfig:
    return TransformationConfig(type=kind, **keys)


class Applying(SynchronousTestCase):
    def apply(self, transformation: Any, draft: Draft) -> bytes:
        result = transformation.apply(draft)
        if result is not None:
            self.successResultOf(result)
        with draft.open_message() as stream:
            return bytes(stream.read())


class AttachmentTransformTests(Applying):
    def test_interfaces(self) -> None:
        for transformation in (
            RemoveAttachment(config("removeAttachment", extensions=[".exe"])),
            SanitizeAttachment(config("sanitizeAttachment", extensions=[".exe"])),
            AddFooter(config("addFooter", text="F")),
        ):
            self.assertTrue(verifyObject(ITransformation, transformation))

    def test_remove_by_double_extension_any_case(self) -> None:
        data = mixed(TEXT, attachment("Invoice.PDF.Exe", b"not really an exe"))
        draft = make_draft(data)
        result = self.apply(RemoveAttachment(config("removeAttachment", extensions=["EXE"])), draft)
        self.assertTrue(draft.body_changed)
        self.assertEqual(
            leaves(parse(result))[1].get_content(), "[attachment Invoice.PDF.Exe removed by policy]"
        )

    def test_remove_by_sniffed_type(self) -> None:
        data = mixed(TEXT, attachment("photo.jpg", EXE, "image/jpeg"))
        draft = make_draft(data)
        self.apply(RemoveAttachment(config("removeAttachment", types=["application/x-dosexec"])), draft)
        self.assertTrue(draft.body_changed)

    def test_remove_by_type_wildcard_with_own_text(self) -> None:
        data = mixed(TEXT, attachment("a.png", samples.MAGIC_SAMPLES["image/png"], "image/png"))
        draft = make_draft(data)
        transformation = RemoveAttachment(
            config("removeAttachment", types=["image/*"], text="{name} was {type}")
        )
        result = self.apply(transformation, draft)
        self.assertEqual(leaves(parse(result))[1].get_content(), "a.png was image/png")

    def test_sanitize_names_file_and_type(self) -> None:
        data = mixed(TEXT, attachment("photo.jpg", EXE, "image/jpeg"))
        draft = make_draft(data)
        result = self.apply(SanitizeAttachment(config("sanitizeAttachment", extensions=[".exe"])), draft)
        text = leaves(parse(result))[1].get_content()
        self.assertIn("photo.jpg", text)
        self.assertIn("image/jpeg, content application/x-msdownload", text)
        self.assertIn("removed", text)

    def test_no_match_no_copy(self) -> None:
        draft = make_draft(mixed(TEXT, attachment("a.pdf", samples.MAGIC_SAMPLES["application/pdf"])))
        draft.run_in_thread = no_threads
        self.assertIsNone(RemoveAttachment(config("removeAttachment", extensions=[".exe"])).apply(draft))
        self.assertFalse(draft.changed)

    def test_text_bodies_are_never_removed(self) -> None:
        draft = make_draft(mixed(TEXT))
        draft.run_in_thread = no_threads
        self.assertIsNone(RemoveAttachment(config("removeAttachment", types=["text/plain"])).apply(draft))

    def test_without_inspection_the_rewriter_decides(self) -> None:
        draft = make_draft(mixed(TEXT, EXE_PART), inspect=False)
        self.apply(RemoveAttachment(config("removeAttachment", extensions=[".exe"])), draft)
        self.assertTrue(draft.body_changed)

    def test_broken_structure_left_unchanged(self) -> None:
        draft = make_draft(samples.unclosed_boundary())
        result = self.apply(RemoveAttachment(config("removeAttachment", extensions=[".exe"])), draft)
        self.assertFalse(draft.changed)
        self.assertEqual(result, samples.unclosed_boundary())


class FooterTransformTests(Applying):
    def test_footer_for_matching_domains_only(self) -> None:
        transformation = AddFooter(config("addFooter", text="ACME", domains=["*.example.net"]))
        draft = make_draft(mixed(TEXT), recipients=("bob@example.com",))
        draft.run_in_thread = no_threads
        self.assertIsNone(transformation.apply(draft))
        draft = make_draft(mixed(TEXT), recipients=("bob@example.com", "eve@mx.example.net"))
        result = self.apply(transformation, draft)
        self.assertEqual(leaves(parse(result))[0].get_content(), "Hello world\r\nsecond line\r\nACME")

    def test_html_defaults_to_escaped_text(self) -> None:
        self.assertEqual(html_footer("A & B\n<c>"), "A &amp; B<br>\n&lt;c&gt;")
        data = mixed(text_part("<html><body>x</body></html>", "text/html"))
        result = self.apply(AddFooter(config("addFooter", text="A & B")), make_draft(data))
        self.assertEqual(
            leaves(parse(result))[0].get_content(), "<html><body>x\r\nA &amp; B\r\n</body></html>"
        )

    def test_no_text_body_no_copy(self) -> None:
        draft = make_draft(mixed(EXE_PART))
        draft.run_in_thread = no_threads
        self.assertIsNone(AddFooter(config("addFooter", text="F")).apply(draft))

    def test_unscannable_message_is_skipped(self) -> None:
        draft = make_draft(samples.unclosed_boundary())
        draft.run_in_thread = no_threads
        self.assertIsNone(AddFooter(config("addFooter", text="F")).apply(draft))

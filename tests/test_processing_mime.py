"""Tests for dcrouter.processing.mime (and .sniff): structure, headers, addresses, limits, hostile input,
and a result that does not depend on how the stream is chunked."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import itertools
import time
import tracemalloc
import zipfile
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dcrouter.processing import archive, archiveformats, decoding, mime, mimetext
from dcrouter.processing.filetype import sniff_type
from dcrouter.processing.mime import MessageInfo, MimeLimits, inspect_in_thread, inspect_message
from tests import mime_samples as samples
from tests.archive_samples import (
    EXE,
    make_bz2,
    make_gzip,
    make_tar,
    make_xz,
    make_zip,
    nested_zips,
    rar4,
    rar5,
    v7_tar,
    zip_bomb,
)
from tests.mime_samples import CRLF, attachment, entity, headers, message, multipart, text_part


class ChunkedStream(io.RawIOBase):
    """Hands out ``data`` in the given chunk sizes (cycled), whatever size is asked for."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self._data = data
        self._sizes = sizes or [1]
        self._at = 0
        self._turn = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self._data[self._at : self._at + max(1, self._sizes[self._turn % len(self._sizes)])]
        self._at += len(chunk)
        self._turn += 1
        return chunk


DEFAULT_LIMITS = MimeLimits()
TIGHT_LIMITS = MimeLimits(
    max_header_bytes=300, max_depth=3, max_parts=6, max_decoded_bytes=500, max_text_bytes=40
)


def inspect(data: bytes, limits: MimeLimits = DEFAULT_LIMITS) -> MessageInfo:
    return inspect_message(io.BytesIO(data), limits)


def mixed(*parts: bytes, boundary: bytes = b"b") -> bytes:
    kind = f'multipart/mixed; boundary="{boundary.decode()}"'
    return message(headers(("Content-Type", kind)), multipart(boundary, list(parts)))


class StructureTests(SynchronousTestCase):
    def test_simple_mixed(self) -> None:
        info = inspect(samples.simple_mixed())
        self.assertIsNone(info.unscannable)
        self.assertEqual(info.defects, ())
        self.assertEqual([p.path for p in info.parts], ["1", "2"])
        body, pdf = info.parts
        self.assertEqual((body.declared_type, body.size, body.depth), ("text/plain", 11, 1))
        self.assertFalse(body.is_attachment)
        self.assertEqual(pdf.names, ("invoice.pdf",))
        self.assertEqual(pdf.filename, "invoice.pdf")
        self.assertEqual(pdf.disposition, "attachment")
        self.assertEqual(pdf.sniffed_type, "application/pdf")
        self.assertEqual(pdf.sha256, hashlib.sha256(b"%PDF-1.4\n" + bytes(100)).hexdigest())
        self.assertEqual(info.attachments, (pdf,))
        self.assertEqual(info.text, "Hello world")
        self.assertEqual(info.size, len(samples.simple_mixed()))

    def test_single_part_message(self) -> None:
        info = inspect(message(b"", b"just text\r\n"))
        self.assertEqual([(p.path, p.depth, p.declared_type) for p in info.parts], [("1", 0, "text/plain")])
        self.assertEqual(info.text, "just text\r\n")

    def test_headers_only_message(self) -> None:
        info = inspect(b"From: a@example.org\r\nSubject: x")
        self.assertEqual(info.subject, "x")
        self.assertEqual(len(info.parts), 1)
        self.assertEqual(info.parts[0].size, 0)

    def test_delimiter_rules(self) -> None:
        body = (
            b"preamble --b is not a delimiter\r\n"
            b"--b \t\r\n" + text_part("one") + b"\r\n--bx\r\nstill one\r\n"
            b"--b\r\n" + text_part("two") + b"\r\n--b-- \r\n"
            b"epilogue\r\n--b\r\nnot a part\r\n"
        )
        info = inspect(message(headers(("Content-Type", "multipart/mixed; boundary=b")), body))
        self.assertIsNone(info.unscannable)
        self.assertEqual([p.size for p in info.parts], [len(b"one\r\n--bx\r\nstill one"), 3])
        self.assertEqual(info.text, "one\r\n--bx\r\nstill one\ntwo")

    def test_line_break_before_delimiter_belongs_to_it(self) -> None:
        part = entity(headers(("Content-Type", "application/octet-stream")), b"abc\r\n")
        info = inspect(mixed(part))
        self.assertEqual(
            info.parts[0].size, 5
        )  # "abc\r\n": only the CRLF in front of "--b" is the delimiter's

    def test_nested_and_encapsulated(self) -> None:
        inner_message = message(
            headers(("Content-Type", "multipart/alternative; boundary=alt")),
            multipart(b"alt", [text_part("plain"), text_part("<b>bold</b>", "text/html")]),
        )
        forwarded = entity(headers(("Content-Type", "message/rfc822")), inner_message)
        related = entity(
            headers(("Content-Type", "multipart/related; boundary=rel")),
            multipart(b"rel", [attachment("a.png", b"\x89PNG\r\n\x1a\n" + bytes(10), "image/png")]),
        )
        info = inspect(mixed(text_part("top"), forwarded, related))
        self.assertIsNone(info.unscannable)
        self.assertEqual(
            [(p.path, p.depth, p.declared_type) for p in info.parts],
            [
                ("1", 1, "text/plain"),
                ("2.1", 3, "text/plain"),
                ("2.2", 3, "text/html"),
                ("3.1", 2, "image/png"),
            ],
        )
        self.assertEqual(info.text, "top\nplain\nbold")
        self.assertEqual(info.parts[3].sniffed_type, "image/png")
        self.assertEqual(info.from_addresses, ("alice@example.org",))  # the outer From, not the forwarded one

    def test_encapsulated_single_part_is_numbered_inside(self) -> None:
        forwarded = entity(headers(("Content-Type", "message/rfc822")), message(b"", b"inner"))
        info = inspect(mixed(forwarded))
        self.assertEqual([(p.path, p.depth) for p in info.parts], [("1.1", 2)])

    def test_digest_parts_default_to_messages(self) -> None:
        digest = message(
            headers(("Content-Type", "multipart/digest; boundary=d")),
            multipart(b"d", [b"\r\n" + message(b"", b"first"), b"\r\n" + message(b"", b"second")]),
        )
        info = inspect(digest)
        self.assertEqual([p.path for p in info.parts], ["1.1", "2.1"])
        self.assertEqual(info.text, "first\nsecond")

    def test_quoted_printable_and_charsets(self) -> None:
        part = entity(
            headers(
                ("Content-Type", "text/plain; charset=iso-8859-1"),
                ("Content-Transfer-Encoding", "quoted-printable"),
            ),
            b"caf=E9 soft=\r\nbreak =3D equal=",
        )
        info = inspect(mixed(part))
        self.assertEqual(info.text, "café softbreak = equal")
        self.assertEqual(info.parts[0].size, len("café softbreak = equal"))

    def test_unknown_and_hostile_charsets_do_not_raise(self) -> None:
        for charset in ("x-unknown", "rot13", "base64", "utf-16", "idna", "utf-7", '"'):
            info = inspect(mixed(text_part("hello", charset="utf-8").replace(b"utf-8", charset.encode())))
            self.assertEqual(len(info.parts), 1, charset)

    def test_html_text_extraction(self) -> None:
        html = (
            "<html><head><title>T</title><style>p {color: red}</style></head><body>"
            "<p>Fr<b></b>ee &amp; cheap&nbsp;pills</p><!-- hidden --><script>if (a < b) x()</script>"
            "<div>bye &#x41;</div></body></html>"
        )
        info = inspect(mixed(text_part(html, "text/html")))
        self.assertEqual(info.text, "\nT\n\nFree & cheap\xa0pills\n\nbye A\n")

    def test_missing_blank_line_after_part_headers(self) -> None:
        info = inspect(mixed(b"Content-Type: text/plain\r\nthis line is no header\r\nmore"))
        self.assertIn("header block not ended by a blank line", info.defects)
        self.assertEqual(info.text, "this line is no header\r\nmore")


class HeaderTests(SynchronousTestCase):
    def test_unfolding_and_encoded_words(self) -> None:
        data = (
            b"From: a@example.org\r\n"
            b"Subject: =?utf-8?q?caf=C3?=\r\n =?utf-8?q?=A9?= and\r\n\t=?iso-8859-1?b?6Q==?= x\r\n"
            b"X-Note: =?utf-8?q?n=C3=B6te?=\r\nReferences: =?utf-8?q?kept?=\r\n\r\nbody"
        )
        info = inspect(data)
        self.assertEqual(info.subject, "café and\té x")
        self.assertEqual(info.get_all("x-note"), ["nöte"])
        self.assertEqual(info.get_all("References"), ["=?utf-8?q?kept?="])  # structured: left as written
        self.assertEqual([name for name, _ in info.headers], ["From", "Subject", "X-Note", "References"])

    def test_encoded_word_edge_cases(self) -> None:
        decode = mime.decode_encoded_words
        self.assertEqual(decode("=?utf-8?q?a?= =?utf-8?q?b?="), "ab")
        self.assertEqual(decode("=?utf-8?q?a?= x =?utf-8?q?b?="), "a x b")
        self.assertEqual(decode("=?utf-8*en?Q?hi_there?="), "hi there")
        self.assertEqual(decode("=?x-nope?q?abc?="), "abc")
        self.assertEqual(decode("=?utf-8?b?!!!?="), "=?utf-8?b?!!!?=")
        self.assertEqual(decode("plain =? not a word ?="), "plain =? not a word ?=")

    def test_rfc2231_parameters(self) -> None:
        part = entity(
            b'Content-Type: application/pdf; name="other.exe"\r\n'
            b"Content-Disposition: attachment;\r\n"
            b" filename*0*=utf-8'en'na%C3%AFve;\r\n filename*1=\".pdf\"\r\n",
            b"%PDF-1.4",
        )
        part_info = inspect(mixed(part)).parts[0]
        self.assertEqual(part_info.filename, "naïve.pdf")
        self.assertEqual(part_info.names, ("naïve.pdf", "other.exe"))
        self.assertTrue(part_info.is_attachment)

    def test_raw_eight_bit_byte_in_an_extended_parameter(self) -> None:
        """A byte left un-%-encoded in an RFC 2231 value (sloppy or hostile mail) is read, never raised on."""
        part = entity(b"Content-Disposition: attachment; filename*=utf-8''a\x84b%C3%A9.exe\r\n", b"MZ")
        info = inspect(mixed(part))
        self.assertEqual(info.parts[0].names, ("a\ufffdbé.exe",))
        self.assertIsNone(info.unscannable)

    def test_parameter_parsing(self) -> None:
        kind, params, defects = mime.parse_structured(
            'Text/Plain (comment); charset="a\\"b"; x; f=evil(.exe)'
        )
        self.assertEqual(kind, "text/plain")
        self.assertEqual(params, {"charset": ['a"b'], "f": ["evil(.exe)"]})
        self.assertEqual(defects, ["parameter 'x' without a value"])
        _, params, defects = mime.parse_structured("a/b; n*1=B; n*0=A; n*3=D")
        self.assertEqual(params["n"], ["AB"])
        self.assertIn("parameter 'n' has a gap in its continuations", defects)

    def test_encoded_word_filename_and_nul(self) -> None:
        part = entity(
            b'Content-Disposition: attachment; filename="=?utf-8?q?r=C3=A9sum=C3=A9.pdf?="\r\n', b"x"
        )
        self.assertEqual(inspect(mixed(part)).parts[0].names, ("résumé.pdf",))
        part = entity(b'Content-Disposition: attachment; filename="invoice.pdf\x00.exe"\r\n', b"x")
        self.assertEqual(inspect(mixed(part)).parts[0].names, ("invoice.pdf\ufffd.exe",))


class AddressTests(SynchronousTestCase):
    def from_of(self, *values: str) -> MessageInfo:
        fields = b"".join(b"From: " + value.encode() + CRLF for value in values)
        return inspect(fields + b"To: b@example.com\r\n\r\nbody")

    def test_one_clear_sender(self) -> None:
        for value, expected in [
            ("alice@example.org", "alice@example.org"),
            ("Alice <alice@example.org>", "alice@example.org"),
            ('"Doe, Alice" <alice@example.org>', "alice@example.org"),
            ("=?utf-8?q?Al=C3=AFce?= <alice@example.org>", "alice@example.org"),
            (
                '"alice@example.org" <bob@evil.example>',
                "bob@evil.example",
            ),  # a display name: policy's business
        ]:
            info = self.from_of(value)
            self.assertEqual((info.from_addresses, info.from_ambiguous), ((expected,), False), value)

    def test_ambiguous_senders(self) -> None:
        for values in [
            ("alice@example.org)<bob@example.org>",),  # CVE-2023-27043
            ("alice@example.org <bob@example.org>",),
            ("<alice@example.org> <bob@example.org>",),
            ("alice@example.org, bob@example.org",),
            ("=?utf-8?q?ceo@bank.example=2C?= <x@evil.example>",),
            ("alice",),
            ("",),
            ("alice@example.org", "bob@example.org"),
            ("(" * 5000 + "a@b.example",),
        ]:
            info = self.from_of(*values)
            self.assertTrue(info.from_ambiguous, values)
        self.assertTrue(inspect(b"To: b@example.com\r\n\r\nx").from_ambiguous)
        self.assertEqual(self.from_of("alice@example.org)<bob@example.org>").from_addresses, ())

    def test_internationalised_senders(self) -> None:
        # RFC 6532: a UTF-8 local part and a U-label domain are an address, not a defect.
        for value, expected in [
            ("Jürgen <jürgen@sender.test>", "jürgen@sender.test"),
            ("jürgen@sender.test", "jürgen@sender.test"),
            ("用户 <用户@例子.test>", "用户@例子.test"),
            ("user@bücher.test", "user@bücher.test"),
            ('"jü rgen"@sender.test', '"jü rgen"@sender.test'),
        ]:
            info = self.from_of(value)
            self.assertEqual((info.from_addresses, info.from_ambiguous), ((expected,), False), value)

    def test_ambiguous_internationalised_senders(self) -> None:
        for values in [
            ("jürgen@sender.test", "bob@example.org"),  # two fields
            ("jürgen@sender.test, bob@example.org",),  # two mailboxes
            ("jürgen@sender.test <bob@example.org>",),  # parsers disagree
            ("jü@sender.test)<bob@example.org>",),
            ("j\u00a0rgen@sender.test",),  # shows as white space
            ("ad\u202emin@sender.test",),  # a bidi override: shows reversed
            ("jü\u200brgen@sender.test",),  # zero width
        ]:
            info = self.from_of(*values)
            self.assertTrue(info.from_ambiguous, values)

    def test_recipients(self) -> None:
        data = (
            b'To: "Smith, J" <j@example.com>, team: a@example.com, b@example.com;, bad)<x@y>\r\n'
            b"Cc: c@example.net\r\nTo: d@example.org\r\nFrom: a@example.org\r\n\r\n"
        )
        info = inspect(data)
        self.assertEqual(info.to, ("j@example.com", "a@example.com", "b@example.com", "d@example.org"))
        self.assertEqual(info.cc, ("c@example.net",))
        self.assertIn("to: an address not strictly parsable was left out", info.defects)


class LimitTests(SynchronousTestCase):
    def test_header_bytes(self) -> None:
        data = b"From: a@example.org\r\nSubject: hi\r\nX-Long: " + b"x" * 500 + b"\r\n\r\nbody"
        info = inspect(data, MimeLimits(max_header_bytes=200))
        self.assertEqual(info.unscannable, "header block larger than 200 bytes")
        self.assertEqual(info.subject, "hi")
        self.assertEqual(info.get_all("x-long"), [])
        self.assertEqual(info.size, len(data))
        self.assertIsNone(inspect(data, MimeLimits(max_header_bytes=len(data) - 4)).unscannable)

    def test_depth(self) -> None:
        data = samples.deep_nesting(3)
        self.assertIsNone(inspect(data, MimeLimits(max_depth=3)).unscannable)
        info = inspect(data, MimeLimits(max_depth=2))
        self.assertEqual(info.unscannable, "MIME nesting deeper than 2")
        self.assertEqual(info.parts, ())

    def test_parts(self) -> None:
        data = samples.many_parts(4)
        self.assertIsNone(inspect(data, MimeLimits(max_parts=4)).unscannable)
        info = inspect(data, MimeLimits(max_parts=3))
        self.assertEqual(info.unscannable, "more than 3 MIME parts")
        self.assertEqual(len(info.parts), 3)

    def test_decoded_bytes(self) -> None:
        data = mixed(attachment("a.bin", bytes(100)), attachment("b.bin", bytes(100)))
        self.assertIsNone(inspect(data, MimeLimits(max_decoded_bytes=200)).unscannable)
        info = inspect(data, MimeLimits(max_decoded_bytes=150))
        self.assertEqual(info.unscannable, "decoded content larger than 150 bytes")
        first, second = info.parts
        self.assertEqual((first.size, first.complete), (100, True))
        self.assertEqual((second.size, second.complete, second.sha256), (50, False, None))
        self.assertEqual(second.names, ("b.bin",))

    def test_markup_only_html_costs_a_bounded_amount(self) -> None:
        info = inspect(
            mixed(text_part("<a>" * 100 + "late text", "text/html")), MimeLimits(max_text_bytes=50)
        )
        self.assertEqual(info.text, "")
        self.assertTrue(info.text_truncated)
        self.assertIsNone(info.unscannable)

    def test_text_is_truncated_not_unscannable(self) -> None:
        info = inspect(mixed(text_part("é" * 100)), MimeLimits(max_text_bytes=51))
        self.assertEqual(info.text, "é" * 25)
        self.assertTrue(info.text_truncated)
        self.assertIsNone(info.unscannable)


class BrokenStructureTests(SynchronousTestCase):
    def test_unclosed_boundary(self) -> None:
        info = inspect(samples.unclosed_boundary())
        self.assertEqual(
            info.unscannable, "multipart not closed: the message ends before its close delimiter"
        )
        self.assertEqual(info.parts[1].sniffed_type, "application/x-msdownload")  # what was found is kept

    def test_inner_closed_by_outer_boundary(self) -> None:
        inner = entity(
            headers(("Content-Type", "multipart/mixed; boundary=in")), b"--in\r\n" + text_part("x")
        )
        info = inspect(mixed(inner, text_part("after")))
        self.assertEqual(info.unscannable, "multipart not closed before its enclosing multipart's boundary")
        self.assertEqual([p.path for p in info.parts], ["1.1", "2"])

    def test_multipart_without_boundary(self) -> None:
        info = inspect(
            message(headers(("Content-Type", "multipart/mixed")), b"--x\r\n\r\nhidden\r\n--x--\r\n")
        )
        self.assertEqual(info.unscannable, "part 1: multipart without a usable boundary")

    def test_conflicting_headers(self) -> None:
        part = entity(
            headers(("Content-Type", "text/plain"), ("Content-Type", "application/x-msdownload")), b"x"
        )
        self.assertEqual(inspect(mixed(part)).unscannable, "part 1: conflicting Content-Type fields")
        part = entity(b'Content-Type: multipart/mixed; boundary="a"; boundary="b"\r\n', b"")
        self.assertEqual(inspect(mixed(part)).unscannable, "part 1: conflicting multipart boundaries")

    def test_bare_cr_in_a_header_block(self) -> None:
        # Found by fuzzing (tests/test_fuzz_mime.py). "\r\r\n" is an empty line to readers that end a line
        # at a bare CR (Python's email, many MUAs): the encapsulated message below holds an .exe for them, and
        # was a text/plain leaf (2.1) to the walker, with no problem reported. Such a block reads two ways.
        forwarded = (
            b"Content-Type: message/rfc822\r\r\n\r\r\nSubject: inner\r\r\n"
            b'Content-Type: application/x-msdownload; name="a.exe"\r\n\r\n'
        )
        info = inspect(mixed(text_part("hi"), forwarded))
        self.assertEqual(info.unscannable, "part 2: bare CR in a header block")
        self.assertEqual(
            inspect(message(b"Subject: x\r\rX: y\r\n", b"")).unscannable,
            "part 1: bare CR in a header block",
        )

    def test_message_partial(self) -> None:
        part = entity(headers(("Content-Type", "message/partial; id=x; number=1; total=2")), b"x")
        self.assertIn("message/partial", inspect(mixed(part)).unscannable or "")

    def test_broken_base64_is_decoded_leniently_with_defects(self) -> None:
        info = inspect(samples.broken_base64())
        self.assertIsNone(info.unscannable)
        self.assertEqual(info.parts[0].sniffed_type, "application/x-msdownload")
        self.assertIn("part 1: characters outside the base64 alphabet ignored", info.defects)
        self.assertIn("part 1: base64 data after padding", info.defects)


class HostileTests(SynchronousTestCase):
    """Each finishes quickly with a bounded peak of memory, whatever it is."""

    def check(self, data: bytes, max_seconds: float = 5.0, max_peak: int = 8 * 1024 * 1024) -> MessageInfo:
        tracemalloc.start()
        started = time.perf_counter()
        try:
            info = inspect(data)
            elapsed = time.perf_counter() - started
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertLess(elapsed, max_seconds)
        self.assertLess(peak, max_peak)
        self.assertEqual(info.size, len(data))
        return info

    def test_deep_nesting(self) -> None:
        info = self.check(samples.deep_nesting(1000))
        self.assertEqual(info.unscannable, "MIME nesting deeper than 20")

    def test_many_parts(self) -> None:
        info = self.check(samples.many_parts(100_000))
        self.assertEqual(info.unscannable, "more than 1000 MIME parts")
        self.assertEqual(len(info.parts), 1000)

    def test_huge_header_line(self) -> None:
        info = self.check(samples.huge_header_line())
        self.assertEqual(info.unscannable, "header block larger than 262144 bytes")
        self.assertEqual(info.from_addresses, ("alice@example.org",))

    def test_huge_part_header(self) -> None:
        self.assertEqual(
            self.check(samples.huge_part_header()).unscannable, "header block larger than 262144 bytes"
        )

    def test_boundary_inside_base64(self) -> None:
        info = self.check(samples.boundary_inside_base64())
        self.assertIsNone(info.unscannable)
        # The "--bnd" inside a line is data; the line "--bnd" starts a new part, as RFC 2046 says.
        self.assertEqual([p.path for p in info.parts], ["1", "2"])
        self.assertEqual(info.parts[0].sniffed_type, "application/x-msdownload")

    def test_mixed_line_endings(self) -> None:
        info = self.check(samples.mixed_line_endings())
        self.assertIsNone(info.unscannable)
        self.assertEqual([p.declared_type for p in info.parts], ["text/plain", "text/html"])
        self.assertEqual(info.text, "line one\nline two\n\nhtml\rpart\n")

    def test_nul_bytes(self) -> None:
        info = self.check(samples.nul_bytes())
        self.assertIsNone(info.unscannable)
        self.assertEqual(info.subject, "nul\ufffdhere")
        self.assertTrue(info.from_ambiguous)
        self.assertEqual(info.from_addresses, ())
        self.assertEqual(len(info.parts), 1)
        self.assertIn("NUL byte in a header block", info.defects)

    def test_huge_rfc2231(self) -> None:
        info = self.check(samples.huge_rfc2231())
        self.assertEqual(info.parts[0].filename, "A" + "AB" * 999)
        self.assertIn("part 1: Content-Type parameter 'name' continued beyond 999 segments", info.defects)

    def test_many_encoded_words(self) -> None:
        info = self.check(samples.many_encoded_words())
        self.assertEqual(info.get_all("comments"), ["aé" * 3000])
        self.assertTrue(info.from_ambiguous)

    def test_broken_base64(self) -> None:
        self.check(samples.broken_base64())

    def test_unclosed_boundary(self) -> None:
        self.check(samples.unclosed_boundary())

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=2000), st.integers(0, 10_000))
    def test_garbage_never_raises(self, junk: bytes, seed: int) -> None:
        # Random bytes after a multipart header, and the samples with bytes overwritten: each read to its end.
        sample = bytearray(samples.simple_mixed())
        for offset, value in enumerate(junk[:50]):
            sample[(seed + offset * 97) % len(sample)] = value
        for data in (mixed(junk) + junk, bytes(sample)):
            info = inspect(data)
            self.assertEqual(info.size, len(data))


class BigMessageTests(SynchronousTestCase):
    def test_50_mb_with_bounded_memory(self) -> None:
        path = self.mktemp()
        with open(path, "wb") as out:
            samples.write_big_message(out, 50)
        tracemalloc.start()
        try:
            with open(path, "rb") as stream:
                info = inspect_message(stream)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 4 * 1024 * 1024)
        self.assertIsNone(info.unscannable)
        self.assertGreater(info.size, 50 * 1024 * 1024)
        big = info.parts[1]
        self.assertEqual((big.names, big.sniffed_type, big.complete), (("big.zip",), "application/zip", True))
        self.assertGreater(big.size, 36 * 1024 * 1024)


class SniffTests(SynchronousTestCase):
    def test_magic(self) -> None:
        for expected, head in samples.MAGIC_SAMPLES.items():
            self.assertEqual(sniff_type(head), expected)

    def test_unknown(self) -> None:
        for head in (b"", b"plain words", bytes(100), b"M", b"\xca\xfe\xba\xbe"):
            self.assertIsNone(sniff_type(head), head)

    def test_pdf_after_junk_and_mach_o_fat(self) -> None:
        self.assertEqual(sniff_type(b"junk" * 50 + b"%PDF-1.4"), "application/pdf")
        self.assertEqual(sniff_type(b"\xca\xfe\xba\xbe\x00\x00\x00\x02"), "application/x-mach-binary")

    def test_sniffed_inside_messages(self) -> None:
        for expected, head in samples.MAGIC_SAMPLES.items():
            info = inspect(mixed(attachment("file.txt", head, "text/plain")))
            self.assertEqual(info.parts[0].sniffed_type, expected)
            self.assertTrue(info.parts[0].is_attachment)


# -- chunking must not matter --


@dataclass
class Leaf:
    kind: str
    encoding: str
    payload: bytes


@dataclass
class Multi:
    subtype: str
    children: list[Leaf | Multi | Encapsulated]


@dataclass
class Encapsulated:
    inner: Leaf | Multi


Tree = Leaf | Multi | Encapsulated

_TEXT = st.text(st.sampled_from("abc xyz-.,é<>&;"), max_size=120)
_LEAVES = st.one_of(
    st.builds(Leaf, st.just("application/octet-stream"), st.just("base64"), st.binary(max_size=300)),
    st.builds(
        Leaf, st.just("application/octet-stream"), st.just("quoted-printable"), st.binary(max_size=200)
    ),
    st.builds(Leaf, st.sampled_from(["text/plain", "text/html"]), st.just("8bit"), _TEXT.map(str.encode)),
)
TREES: st.SearchStrategy[Tree] = st.recursive(
    _LEAVES,
    lambda inner: st.one_of(
        st.builds(Multi, st.sampled_from(["mixed", "alternative"]), st.lists(inner, min_size=1, max_size=4)),
        st.builds(Encapsulated, inner.filter(lambda t: not isinstance(t, Encapsulated))),
    ),
    max_leaves=12,
)


def render(tree: Tree, counter: list[int]) -> bytes:
    """An entity (header block and body) for ``tree``; boundaries unique within the message."""
    if isinstance(tree, Leaf):
        if tree.encoding == "base64":
            body = samples.b64(tree.payload)
        elif tree.encoding == "quoted-printable":
            body = binascii.b2a_qp(tree.payload, quotetabs=True, istext=False).replace(b"\n", CRLF)
        else:
            body = tree.payload
        fields = headers(
            ("Content-Type", f"{tree.kind}; charset=utf-8"), ("Content-Transfer-Encoding", tree.encoding)
        )
        return entity(fields, body)
    if isinstance(tree, Encapsulated):
        return entity(headers(("Content-Type", "message/rfc822")), render(tree.inner, counter))
    counter[0] += 1
    boundary = f"=_{counter[0]}_".encode()
    kind = f'multipart/{tree.subtype}; boundary="{boundary.decode()}"'
    return entity(
        headers(("Content-Type", kind)), multipart(boundary, [render(c, counter) for c in tree.children])
    )


def leaves(tree: Tree) -> list[Leaf]:
    if isinstance(tree, Leaf):
        return [tree]
    if isinstance(tree, Encapsulated):
        return leaves(tree.inner)
    return [leaf for child in tree.children for leaf in leaves(child)]


class ChunkingTests(SynchronousTestCase):
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(TREES, st.lists(st.integers(1, 300), min_size=1, max_size=20), st.booleans())
    def test_random_structures(self, tree: Tree, sizes: list[int], bare_lf: bool) -> None:
        data = headers(("From", "a@example.org"), ("Subject", "t")) + render(tree, [0])
        if bare_lf:
            data = data.replace(CRLF, b"\n")
        whole = inspect(data)
        self.assertIsNone(whole.unscannable)
        expected = leaves(tree)
        self.assertEqual(
            [p.sha256 for p in whole.parts], [hashlib.sha256(x.payload).hexdigest() for x in expected]
        )
        chunked = inspect_message(ChunkedStream(data, sizes))  # type: ignore[arg-type]
        self.assertEqual(chunked, whole)

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        st.sampled_from(
            [
                samples.simple_mixed,
                samples.unclosed_boundary,
                samples.broken_base64,
                samples.boundary_inside_base64,
                samples.mixed_line_endings,
                samples.nul_bytes,
                lambda: samples.deep_nesting(30),
                lambda: samples.many_parts(1200),
            ]
        ),
        st.lists(st.integers(1, 700), min_size=1, max_size=10),
        st.sampled_from([DEFAULT_LIMITS, TIGHT_LIMITS]),
    )
    def test_samples(self, build: object, sizes: list[int], limits: MimeLimits) -> None:
        data = build()  # type: ignore[operator]
        chunked = inspect_message(ChunkedStream(data, sizes), limits)  # type: ignore[arg-type]
        self.assertEqual(chunked, inspect(data, limits))

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(TREES, st.lists(st.integers(1, 300), min_size=1, max_size=20))
    def test_random_structures_at_the_limits(self, tree: Tree, sizes: list[int]) -> None:
        data = headers(("From", "a@example.org")) + render(tree, [0])
        chunked = inspect_message(ChunkedStream(data, sizes), TIGHT_LIMITS)  # type: ignore[arg-type]
        self.assertEqual(chunked, inspect(data, TIGHT_LIMITS))

    @given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=6))
    def test_base64_decoder(self, data: bytes, cuts: list[int]) -> None:
        encoded = base64.b64encode(data)
        self.assertEqual(self._decode(decoding.Base64Decoder(), encoded, cuts), data)
        junk = encoded[: len(encoded) // 2] + b"*=\r\n" + encoded[len(encoded) // 2 :]
        self.assertEqual(
            self._decode(decoding.Base64Decoder(), junk, cuts),
            self._decode(decoding.Base64Decoder(), junk, []),
        )

    @given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=6))
    def test_quoted_printable_decoder(self, data: bytes, cuts: list[int]) -> None:
        encoded = binascii.b2a_qp(data, quotetabs=True, istext=False)
        self.assertEqual(self._decode(decoding.QuotedPrintableDecoder(), encoded, cuts), data)

    def test_quoted_printable_decoder_on_broken_escapes(self) -> None:
        # Found by fuzzing (tests/test_fuzz_mime.py): "===" decoded to "=" whole but to "" when cut as
        # "=" "=" "=" (the carried "=" was split from the "=" it pairs with), so the inspector's size, hash
        # and sniffed type of a part depended on where the chunks fell.
        for encoded in [b"===", b"a==b", b"=\r==\r\n=", b"x=4=\r\n=41==", b"=\rjunk\n=4", b"==\n===\n=\n"]:
            whole = binascii.a2b_qp(encoded)
            for cuts in itertools.combinations(range(1, len(encoded)), 2):
                self.assertEqual(self._decode(decoding.QuotedPrintableDecoder(), encoded, list(cuts)), whole)
            bytewise = [*range(1, len(encoded))]
            self.assertEqual(
                self._decode(decoding.QuotedPrintableDecoder(), encoded, bytewise), whole, encoded
            )

    @given(
        st.binary(max_size=60).map(lambda b: b.replace(b"\x00", b"=")),
        st.lists(st.integers(0, 60), max_size=6),
    )
    def test_quoted_printable_decoder_any_bytes_any_cut(self, encoded: bytes, cuts: list[int]) -> None:
        self.assertEqual(
            self._decode(decoding.QuotedPrintableDecoder(), encoded, cuts), binascii.a2b_qp(encoded)
        )

    @given(
        st.text(st.sampled_from("<>!-&;#x41ampscriptyle/ p"), max_size=200),
        st.lists(st.integers(0, 200), max_size=6),
    )
    def test_html_text(self, text: str, cuts: list[int]) -> None:
        pieces = [text[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(text)], strict=True)]
        stripper = mimetext.HtmlText()
        split = "".join(stripper.feed(piece) for piece in pieces) + stripper.feed("", final=True)
        self.assertEqual(split, mimetext.HtmlText().feed(text, final=True))

    def _decode(
        self, decoder: decoding.Base64Decoder | decoding.QuotedPrintableDecoder, data: bytes, cuts: list[int]
    ) -> bytes:
        bounds = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
        out = b"".join(decoder.feed(data[a:b]) for a, b in itertools.pairwise(bounds))
        return out + decoder.flush()


class ThreadTests(TestCase):
    def test_inspect_in_thread(self) -> Deferred[None]:
        pool = ThreadPool(minthreads=1, maxthreads=1, name="mime-test")
        pool.start()
        self.addCleanup(pool.stop)
        d = inspect_in_thread(reactor, pool, lambda: io.BytesIO(samples.simple_mixed()))  # type: ignore[arg-type]

        def check(info: MessageInfo) -> None:
            self.assertEqual([p.path for p in info.parts], ["1", "2"])

        return d.addCallback(check)


# -- archives: listed from their directories; archives inside them decompressed and listed in turn --


def set_encrypted_flag(data: bytes) -> bytes:
    """Bit 0 of the general purpose flags set in every local and central header (nothing is encrypted)."""
    out = bytearray(data)
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = out.find(signature)
        while at >= 0:
            out[at + offset] |= 0x01
            at = out.find(signature, at + 4)
    return bytes(out)


def zip_message(data: bytes, name: str = "docs.zip") -> bytes:
    return mixed(text_part("see attached"), attachment(name, data, "application/zip"))


class ArchiveTests(SynchronousTestCase):
    def archive_part(
        self, data: bytes, limits: MimeLimits = DEFAULT_LIMITS, name: str = "docs.zip"
    ) -> mime.Part:
        info = inspect(zip_message(data, name), limits)
        self.assertEqual([p.path for p in info.parts], ["1", "2"])
        self.assertEqual(info.parts[0].archive_names, ())
        return info.parts[1]

    def test_names_listed_with_nested_archives(self) -> None:
        inner = make_zip({"deep/payload.exe": EXE})
        data = make_zip({"readme.txt": b"hello", "bin/setup.exe": b"MZ" + bytes(500), "inner.zip": inner})
        part = self.archive_part(data)
        self.assertEqual(part.sniffed_type, "application/zip")
        self.assertEqual(
            part.archive_names, ("readme.txt", "bin/setup.exe", "inner.zip", "inner.zip/deep/payload.exe")
        )
        self.assertIsNone(part.archive_problem)
        self.assertTrue(part.complete)

    def test_nested_archive_under_a_harmless_name(self) -> None:
        # Content decides, not the name: a zip called notes.txt is opened.
        data = make_zip({"notes.txt": make_zip({"run.exe": EXE})})
        self.assertEqual(self.archive_part(data).archive_names, ("notes.txt", "notes.txt/run.exe"))

    def test_not_an_archive_is_not_listed(self) -> None:
        info = inspect(
            mixed(
                attachment("a.zip", b"%PDF-1.4\n" + bytes(600)),
                attachment("b", b"PK"),
                attachment("c", b"BZh9 is not bzip2"),
            )
        )
        for part in info.parts:
            self.assertEqual((part.archive_names, part.archive_problem), ((), None))

    def test_depth_bomb(self) -> None:
        part = self.archive_part(nested_zips(10, {"evil.exe": EXE}))
        self.assertEqual(part.archive_problem, "archives nested deeper than 3 levels")
        self.assertEqual(
            part.archive_names, ("level2.zip", "level2.zip/level3.zip", "level2.zip/level3.zip/level4.zip")
        )
        # Three levels are opened.
        part = self.archive_part(nested_zips(3, {"evil.exe": EXE}))
        self.assertIsNone(part.archive_problem)
        self.assertEqual(part.archive_names[-1], "level2.zip/level3.zip/evil.exe")
        self.assertEqual(
            self.archive_part(nested_zips(3, {"a": b"x"}), MimeLimits(max_archive_depth=2)).archive_problem,
            "archives nested deeper than 2 levels",
        )

    def test_nested_zip_bomb_by_ratio(self) -> None:
        part = self.archive_part(make_zip({"readme.txt": b"hi", "data.zip": zip_bomb(20)}))
        assert part.archive_problem is not None
        self.assertRegex(part.archive_problem, r"^zip bomb: ratio \d{3,}:1 in a\.txt$")
        self.assertEqual(part.archive_names, ("readme.txt", "data.zip", "data.zip/a.txt"))
        limits = MimeLimits(max_archive_ratio=2000)
        self.assertIsNone(self.archive_part(make_zip({"data.zip": zip_bomb(20)}), limits).archive_problem)

    def test_entries_and_sizes_count_across_levels(self) -> None:
        inner = make_zip({f"in{i}.txt": b"x" for i in range(3)})
        data = make_zip({"a.txt": b"a", "b.txt": b"b", "inner.zip": inner})
        self.assertIsNone(self.archive_part(data, MimeLimits(max_archive_entries=6)).archive_problem)
        self.assertEqual(
            self.archive_part(data, MimeLimits(max_archive_entries=5)).archive_problem,
            "too many archive entries (over 5)",
        )
        block = bytes(range(256)) * 8
        inner = make_zip({"x.bin": block, "y.bin": block}, zipfile.ZIP_STORED)
        data = make_zip({"inner.zip": inner}, zipfile.ZIP_STORED)
        # The outer entry (the inner zip itself) and the two inside it.
        total = len(inner) + 2 * len(block)
        self.assertIsNone(self.archive_part(data, MimeLimits(max_archive_expanded=total)).archive_problem)
        self.assertEqual(
            self.archive_part(data, MimeLimits(max_archive_expanded=total - 1)).archive_problem,
            f"zip bomb: expands to {total} bytes",
        )

    def test_nested_archive_too_large(self) -> None:
        inner = make_zip({"a.bin": bytes(range(256)) * 64}, zipfile.ZIP_STORED)
        data = make_zip({"inner.zip": inner})  # deflated: the outer zip is far smaller than the inner one
        self.assertLess(len(data), len(inner))
        part = self.archive_part(data, MimeLimits(max_archive_bytes=len(inner) - 1))
        self.assertEqual((part.archive_names, part.archive_problem), (("inner.zip",), "archive too large"))
        self.assertIsNone(self.archive_part(data, MimeLimits(max_archive_bytes=len(inner))).archive_problem)

    def test_encrypted_nested_zip(self) -> None:
        inner = set_encrypted_flag(make_zip({"invoice.pdf": b"%PDF-1.4", "setup.exe": EXE}))
        part = self.archive_part(make_zip({"inner.zip": inner}))
        self.assertEqual(part.archive_problem, "encrypted archive")
        self.assertEqual(part.archive_names, ("inner.zip", "inner.zip/invoice.pdf", "inner.zip/setup.exe"))
        # An encrypted outer entry is not opened, whatever it holds.
        part = self.archive_part(set_encrypted_flag(make_zip({"inner.zip": make_zip({"x.exe": EXE})})))
        self.assertEqual((part.archive_names, part.archive_problem), (("inner.zip",), "encrypted archive"))

    def test_tar_and_compressed_tars(self) -> None:
        entries = {"readme.txt": b"hi", "bin/evil.exe": EXE}
        listed = ("readme.txt", "bin/evil.exe")
        cases = [
            ("x.tar", make_tar(entries), listed),
            ("old.tar", v7_tar(entries), listed),
            ("x.tar.gz", make_tar(entries, "gz"), ("x.tar", *listed)),
            ("x.tgz", make_tar(entries, "gz"), ("x.tar", *listed)),
            ("x.tar.bz2", make_tar(entries, "bz2"), ("x.tar", *listed)),
            ("x.txz", make_tar(entries, "xz"), ("x.tar", *listed)),
            ("unnamed", make_tar(entries, "xz"), listed),
        ]
        for name, data, names in cases:
            with self.subTest(name=name):
                part = self.archive_part(data, name=name)
                self.assertEqual((part.archive_names, part.archive_problem), (names, None))

    def test_compressed_files_are_named_after_the_attachment(self) -> None:
        cases = [
            ("x.exe.gz", make_gzip(EXE), ("x.exe",)),
            ("x.exe.GZ", make_gzip(EXE), ("x.exe",)),
            ("report.gz", make_gzip(EXE, "setup.exe"), ("setup.exe", "report")),  # the header's name too
            ("x.exe.bz2", make_bz2(EXE), ("x.exe",)),
            ("x.exe.xz", make_xz(EXE), ("x.exe",)),
            ("data", make_gzip(EXE), ()),
        ]
        for name, data, names in cases:
            with self.subTest(name=name):
                part = self.archive_part(data, name=name)
                self.assertEqual((part.archive_names, part.archive_problem), (names, None))

    def test_gzip_bombs(self) -> None:
        part = self.archive_part(make_gzip(bytes(50 * 1024 * 1024)), name="zeros.bin.gz")
        assert part.archive_problem is not None
        self.assertRegex(part.archive_problem, r"^zip bomb: ratio \d{3,}:1 in zeros\.bin$")
        # The declared size (ISIZE) made small: the expansion itself is measured as the content is opened.
        tarred = bytearray(make_tar({"zeros.bin": bytes(50 * 1024 * 1024)}, "gz"))
        tarred[-4:] = (100).to_bytes(4, "little")
        limits = MimeLimits(max_archive_bytes=64 * 1024 * 1024)
        part = self.archive_part(bytes(tarred), limits, name="x.tar.gz")
        self.assertEqual(part.archive_problem, "zip bomb: ratio over 100:1 in x.tar")

    def test_rar(self) -> None:
        entries = {"readme.txt": b"hi", "bin/evil.exe": EXE}
        for make in (rar4, rar5):
            with self.subTest(make=make.__name__):
                part = self.archive_part(make(entries), name="x.rar")
                self.assertEqual((part.archive_names, part.archive_problem), (tuple(entries), None))
        # Stored entries are read: a zip in a RAR is opened.
        part = self.archive_part(rar5({"inner.zip": make_zip({"run.exe": EXE})}), name="x.rar")
        self.assertEqual(part.archive_names, ("inner.zip", "inner.zip/run.exe"))
        # Compressed ones would need unrar: listed, and the archive is unscannable.
        part = self.archive_part(rar5(entries, method=3), name="x.rar")
        self.assertEqual(
            (part.archive_names, part.archive_problem),
            (tuple(entries), "compressed RAR content cannot be opened"),
        )
        part = self.archive_part(rar5({}, encrypted_headers=True), name="x.rar")
        self.assertEqual((part.archive_names, part.archive_problem), ((), "encrypted archive"))
        many = {f"f{i}.txt": b"x" for i in range(8)}
        for make in (rar4, rar5):
            with self.subTest(make=make.__name__):
                part = self.archive_part(make(many), MimeLimits(max_archive_entries=7), name="x.rar")
                self.assertEqual(part.archive_names, ())
                self.assertEqual(part.archive_problem, "too many archive entries (over 7)")
        part = self.archive_part(b"Rar!\x1a\x07\x01\x00" + bytes(40), name="x.rar")
        assert part.archive_problem is not None
        self.assertTrue(part.archive_problem.startswith("corrupt archive: "), part.archive_problem)

    def test_unlistable_kinds(self) -> None:
        for head, kind in [
            (b"7z\xbc\xaf\x27\x1c", "7z"),
            (b"MSCF\x00\x00\x00\x00", "cab"),
            (b"\x28\xb5\x2f\xfd", "zstd"),
        ]:
            with self.subTest(kind=kind):
                part = self.archive_part(head + bytes(600), name="x")
                self.assertEqual(part.archive_problem, f"{kind} archive: cannot be listed")
                part = self.archive_part(make_zip({"inner": head + bytes(600)}))
                self.assertEqual(part.archive_problem, f"{kind} archive inside an archive: cannot be listed")

    def test_empty_zip_and_zip_based_documents(self) -> None:
        self.assertEqual(self.archive_part(make_zip({})).archive_names, ())
        self.assertIsNone(self.archive_part(make_zip({})).archive_problem)
        docx = make_zip({"[Content_Types].xml": b"<Types/>", "word/document.xml": b"<w/>", "evil.exe": b"MZ"})
        part = self.archive_part(docx)
        self.assertEqual(
            part.sniffed_type, "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
        )
        self.assertIn("evil.exe", part.archive_names)

    def test_zip_bomb_by_ratio(self) -> None:
        bomb = zip_bomb(50)
        self.assertLess(len(bomb), 200 * 1024)
        part = self.archive_part(bomb)
        self.assertEqual(part.archive_names, ("a.txt",))
        assert part.archive_problem is not None
        self.assertRegex(part.archive_problem, r"^zip bomb: ratio \d{3,}:1 in a\.txt$")
        self.assertIsNone(inspect(zip_message(bomb)).unscannable)  # the part says it, not the message

    def test_high_ratio_small_entry_is_fine(self) -> None:
        part = self.archive_part(make_zip({"zeros.bin": bytes(512 * 1024)}))
        self.assertIsNone(part.archive_problem)

    def test_zip_bomb_by_total_size(self) -> None:
        data = make_zip({f"f{i}.bin": bytes(range(256)) * 8 for i in range(5)}, zipfile.ZIP_STORED)
        limits = MimeLimits(max_archive_expanded=4 * 2048)
        self.assertEqual(self.archive_part(data, limits).archive_problem, "zip bomb: expands to 10240 bytes")
        self.assertIsNone(self.archive_part(data).archive_problem)

    def test_too_many_entries(self) -> None:
        data = make_zip({f"f{i}.txt": b"x" for i in range(6)})
        part = self.archive_part(data, MimeLimits(max_archive_entries=5))
        self.assertEqual(part.archive_problem, "too many archive entries (over 5)")
        self.assertIsNone(self.archive_part(data, MimeLimits(max_archive_entries=6)).archive_problem)
        # zipfile (an object per entry) is not asked to parse a directory with too many signatures.
        listing = archive.list_archive(io.BytesIO(data), "zip", limits=archive.ArchiveLimits(max_entries=4))
        self.assertEqual(listing, archive.ArchiveListing((), "too many archive entries (over 4)"))

    def test_encrypted_entry(self) -> None:
        data = set_encrypted_flag(make_zip({"invoice.pdf": b"%PDF-1.4", "setup.exe": b"MZ"}))
        part = self.archive_part(data)
        self.assertEqual(part.archive_problem, "encrypted archive")
        self.assertEqual(part.archive_names, ("invoice.pdf", "setup.exe"))

    def test_corrupt_archive(self) -> None:
        for data in (b"PK\x03\x04" + bytes(100), make_zip({"a.txt": b"abc"})[:-10], b"PK\x05\x06\xff"):
            part = self.archive_part(data)
            assert part.archive_problem is not None
            self.assertTrue(part.archive_problem.startswith("corrupt archive: "), part.archive_problem)
            self.assertRegex(part.archive_problem, r"^[ -~]{1,100}$")

    def test_too_large_and_disabled(self) -> None:
        data = make_zip({"a.txt": b"abc" * 100}, zipfile.ZIP_STORED)
        part = self.archive_part(data, MimeLimits(max_archive_bytes=len(data) - 1))
        self.assertEqual((part.archive_names, part.archive_problem), ((), "archive too large"))
        self.assertEqual(
            self.archive_part(data, MimeLimits(max_archive_bytes=len(data))).archive_names, ("a.txt",)
        )
        part = self.archive_part(data, MimeLimits(max_archive_bytes=0))
        self.assertEqual((part.archive_names, part.archive_problem), ((), None))

    def test_cut_by_a_limit(self) -> None:
        data = make_zip({"a.txt": bytes(range(256)) * 10}, zipfile.ZIP_STORED)
        info = inspect(zip_message(data), MimeLimits(max_decoded_bytes=1000))
        self.assertIsNotNone(info.unscannable)
        self.assertEqual(info.parts[1].archive_problem, "archive incomplete")

    def test_unnamed_quoted_printable_zip(self) -> None:
        data = make_zip({"x.js": b"alert(1)"})
        encoded = binascii.b2a_qp(data, quotetabs=True, istext=False).replace(b"\n", CRLF)
        part = entity(headers(("Content-Transfer-Encoding", "quoted-printable")), encoded)
        info = inspect(mixed(part))
        self.assertEqual(info.parts[0].archive_names, ("x.js",))
        self.assertTrue(info.parts[0].is_attachment)

    def test_result_independent_of_chunking(self) -> None:
        messages = [
            zip_message(make_zip({"a.txt": b"a", "b/c.exe": b"MZ" * 300})),
            zip_message(set_encrypted_flag(make_zip({"a.txt": b"a"}))),
            zip_message(zip_bomb(2)),
            mixed(entity(b"", b"PK\x03\x04" + b"PK\x01\x02" * 9)),
        ]
        limits = [DEFAULT_LIMITS, MimeLimits(max_archive_entries=5, max_archive_bytes=1500)]
        for data, limit, sizes in itertools.product(messages, limits, ([1], [2, 3, 5], [7, 64, 1], [4096])):
            chunked = inspect_message(ChunkedStream(data, sizes), limit)  # type: ignore[arg-type]
            self.assertEqual(chunked, inspect(data, limit))

    def test_signatures_counted_across_chunks(self) -> None:
        data = b"PK\x03\x04" + b"PK\x01\x02" * 6
        for size in range(1, len(data) + 1):
            self.assertEqual(archiveformats.central_entries(io.BytesIO(data), chunk_size=size), 6)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(min_size=1, max_size=60), st.integers(0, 10_000))
    def test_damaged_zips_never_raise(self, junk: bytes, seed: int) -> None:
        data = bytearray(make_zip({"a.txt": b"hello", "dir/b.exe": b"MZ" * 50, "c.zip": b"PK\x05\x06"}))
        for offset, value in enumerate(junk):
            data[(seed + offset * 31) % len(data)] = value
        listing = archive.list_archive(io.BytesIO(bytes(data)), "zip")
        self.assertTrue(listing.problem is None or listing.problem.isascii())
        inspect(zip_message(bytes(data)))

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from(range(6)), st.binary(min_size=1, max_size=60), st.integers(0, 10_000))
    def test_damaged_archives_never_raise(self, which: int, junk: bytes, seed: int) -> None:
        entries = {"a.txt": b"hello", "dir/b.exe": EXE, "c.zip": make_zip({"d.exe": EXE})}
        kind, sound = [
            ("tar", make_tar(entries)),
            ("gzip", make_tar(entries, "gz")),
            ("bzip2", make_tar(entries, "bz2")),
            ("xz", make_tar(entries, "xz")),
            ("rar", rar4(entries)),
            ("rar", rar5(entries)),
        ][which]
        data = bytearray(sound)
        for offset, value in enumerate(junk):
            data[(seed + offset * 31) % len(data)] = value
        listing = archive.list_archive(io.BytesIO(bytes(data)), kind, ("x.tar.gz",))
        self.assertTrue(listing.problem is None or listing.problem.isascii())
        inspect(zip_message(bytes(data)))

    def test_big_zip_spools_to_disk_with_bounded_memory(self) -> None:
        block = hashlib.sha256(b"seed").digest() * 32768  # 1 MiB that deflate cannot squeeze much
        path = self.mktemp()
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
            for index in range(10):
                out.writestr(f"part{index}.bin", block)
        with open(path, "rb") as source:
            data = source.read()
        message_bytes = zip_message(data)
        del data, block
        tracemalloc.start()
        try:
            info = inspect_message(io.BytesIO(message_bytes))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 4 * 1024 * 1024)
        self.assertEqual(info.parts[1].archive_names, tuple(f"part{i}.bin" for i in range(10)))
        self.assertIsNone(info.parts[1].archive_problem)

"""The header block transformations edit (dcrouter.mail.headers) and the reader that puts a new block in
front of an unchanged body (dcrouter.queue.files).

What is held here: an untouched block serialises to the bytes it was read from, whatever the folding and
however the stream cuts its reads; nothing written through the block can carry CR, LF or NUL; written
fields are RFC 2047-encoded when not ASCII and folded to 78 columns where whitespace allows; the block read
is bounded.
"""

from __future__ import annotations

import io
import re
from email.header import decode_header, make_header

from twisted.trial.unittest import SynchronousTestCase

from dcrouter.mail.headers import (
    FOLD_WIDTH,
    HeaderBlock,
    HeaderError,
    HeaderTooLarge,
    check_name,
    check_value,
    encode_field,
    read_header_block,
)
from dcrouter.queue.files import ComposedReader, message_reader

LIMIT = 64 * 1024

FOLDED = (
    b"Received: from client.example.net (client.example.net [192.0.2.1])\r\n"
    b"\tby mx.example.com with ESMTP id 1234; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.org,\r\n"
    b"  carol@example.org\r\n"
    b"Subject:   spaced   out\t \r\n"
    b"X-Empty:\r\n"
    b"\r\n"
    b"Body line one\r\n"
    b"\r\n"
    b"From: not a header, in the body\r\n"
)


class Trickle(io.RawIOBase):
    """``data`` served at most ``size`` bytes per read; counts the bytes handed out. Not seekable, like a
    pipe or a socket."""

    def __init__(self, data: bytes, size: int = 1) -> None:
        super().__init__()
        self._data = data
        self._size = size
        self.served = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self._size, len(self._data) - self.served)
        buffer[:n] = self._data[self.served : self.served + n]
        self.served += n
        return n


class EndlessHeader(io.RawIOBase):
    """A header block that never ends (``X: y`` lines forever); counts the bytes handed out."""

    LINE = b"X-Filler: " + b"y" * 60 + b"\r\n"

    def __init__(self) -> None:
        super().__init__()
        self.served = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = len(buffer)
        start = self.served % len(self.LINE)
        data = (self.LINE * (n // len(self.LINE) + 2))[start : start + n]
        buffer[:n] = data
        self.served += n
        return n


def read(data: bytes, chunk: int | None = None, limit: int = LIMIT) -> tuple[HeaderBlock, int]:
    stream = io.BytesIO(data) if chunk is None else Trickle(data, chunk)
    return read_header_block(stream, limit)  # type: ignore[arg-type]


def unfold(field: bytes) -> bytes:
    """RFC 5322 unfolding: a CRLF followed by whitespace is removed, the final CRLF kept."""
    return re.sub(rb"\r\n(?=[ \t])", b"", field)


class RoundTripTests(SynchronousTestCase):
    """An untouched block gives back its bytes, and the offset is where the body starts."""

    MESSAGES = {
        "folded": FOLDED,
        "obsolete name": b"Subject : old style\r\nFrom\t: a@example.com\r\n\r\nbody\r\n",
        "8-bit": b"Subject: caf\xc3\xa9 \xff\r\nFrom: a@example.com\r\n\r\n\xff\xfe\r\n",
        "empty body": b"From: a@example.com\r\n\r\n",
        "starts with CRLF": b"\r\nFrom: in the body\r\n",
        "crlf only": b"\r\n",
    }

    def test_byte_exact_at_any_read_size(self) -> None:
        for label, data in self.MESSAGES.items():
            for chunk in (None, 1, 2, 3, 5, 64):
                with self.subTest(message=label, chunk=chunk):
                    block, offset = read(data, chunk)
                    self.assertTrue(block.terminated)
                    self.assertFalse(block.changed)
                    self.assertEqual(block.to_bytes() + data[offset:], data)
                    self.assertEqual(data[:offset], block.to_bytes())

    def test_folded_fields(self) -> None:
        block, offset = read(FOLDED)
        self.assertEqual(block.names(), ["Received", "From", "To", "Subject", "X-Empty"])
        self.assertEqual(block.get("to"), "bob@example.org,  carol@example.org")
        self.assertEqual(block.get("Subject"), "spaced   out")
        self.assertEqual(block.get("x-empty"), "")
        self.assertEqual(FOLDED[offset:], b"Body line one\r\n\r\nFrom: not a header, in the body\r\n")
        self.assertEqual(block.get_all("From"), ["Alice <alice@example.com>"])
        self.assertEqual(len(block), 5)

    def test_obsolete_space_before_colon(self) -> None:
        block, _ = read(self.MESSAGES["obsolete name"])
        self.assertEqual(block.names(), ["Subject", "From"])
        self.assertEqual(block.get("subject"), "old style")
        self.assertEqual(block.get("FROM"), "a@example.com")
        self.assertEqual(next(iter(block)).raw, b"Subject : old style\r\n")

    def test_invalid_utf8_value_is_replaced_not_raised(self) -> None:
        block, _ = read(self.MESSAGES["8-bit"])
        self.assertEqual(block.get("Subject"), "caf\xe9 \ufffd")

    def test_starts_with_crlf(self) -> None:
        for chunk in (None, 1):
            block, offset = read(b"\r\nFrom: in the body\r\n", chunk)
            self.assertEqual((len(block), offset, block.to_bytes()), (0, 2, b"\r\n"))

    def test_headers_only_without_empty_line(self) -> None:
        data = b"From: a@example.com\r\nSubject: no body\r\n"
        for chunk in (None, 1, 4):
            block, offset = read(data, chunk)
            self.assertFalse(block.terminated)
            self.assertEqual(offset, len(data))
            self.assertEqual(b"".join(f.raw for f in block), data)
            # The block is written with its empty line: a message that gains a field stays well-formed.
            self.assertEqual(block.to_bytes(), data + b"\r\n")

    def test_headers_only_without_final_crlf(self) -> None:
        block, offset = read(b"From: a@example.com\r\nSubject: cut")
        self.assertEqual(offset, len(b"From: a@example.com\r\nSubject: cut"))
        self.assertEqual(block.get("subject"), "cut")
        self.assertEqual(block.to_bytes(), b"From: a@example.com\r\nSubject: cut\r\n\r\n")

    def test_empty_message(self) -> None:
        block, offset = read(b"")
        self.assertEqual((len(block), offset, block.terminated), (0, 0, False))

    def test_not_a_header_block(self) -> None:
        for data in (
            b"Hello there\r\n\r\nbody\r\n",
            b" continuation first\r\nFrom: a@example.com\r\n\r\n",
            b"From: a@example.com\r\nno colon here\r\n\r\n",
            b": empty name\r\n\r\n",
            b"Bad\x7fName: x\r\n\r\n",
        ):
            with self.subTest(data=data):
                e = self.assertRaises(HeaderError, read, data)
                self.assertNotIsInstance(e, HeaderTooLarge)


class LimitTests(SynchronousTestCase):
    def test_over_the_limit(self) -> None:
        data = b"X-Big: " + b"x" * 200 + b"\r\n\r\nbody"
        for chunk in (None, 1, 7):
            with self.subTest(chunk=chunk):
                self.assertRaises(HeaderTooLarge, read, data, chunk, 100)

    def test_exactly_at_the_limit_whatever_the_reads(self) -> None:
        # The block (fields and their CRLFs, without the empty line) is exactly `limit` bytes: accepted, and
        # the answer must not depend on where the stream cuts its reads.
        block = b"X-Fit: " + b"x" * 91 + b"\r\n"
        self.assertEqual(len(block), 100)
        data = block + b"\r\nbody\r\n"
        for chunk in (None, 1, 2, 3, 99, 101, 102):
            with self.subTest(chunk=chunk):
                parsed, offset = read(data, chunk, 100)
                self.assertEqual(offset, 102)
                self.assertEqual(parsed.to_bytes(), block + b"\r\n")
        for chunk in (None, 1, 3):
            with self.subTest(chunk=chunk, over=1):
                self.assertRaises(HeaderTooLarge, read, b"X-Fit: y" + data, chunk, 100)

    def test_headers_only_over_the_limit(self) -> None:
        data = b"X-Big: " + b"x" * 200 + b"\r\n"
        for chunk in (None, 1):
            self.assertRaises(HeaderTooLarge, read, data, chunk, 100)
            self.assertRaises(HeaderTooLarge, read, data + b"X-Two: y", chunk, 100)

    def test_reads_are_bounded(self) -> None:
        stream = EndlessHeader()
        self.assertRaises(HeaderTooLarge, read_header_block, stream, 1000)
        # At most the limit plus one read (16 KiB) plus what was read before the limit was seen.
        self.assertLessEqual(stream.served, 1000 + 2 * 16 * 1024)


class EditTests(SynchronousTestCase):
    def block(self) -> HeaderBlock:
        return read(FOLDED)[0]

    def test_add_bottom_and_top(self) -> None:
        block = self.block()
        block.add("X-Added", "bottom")
        block.add("X-Trace", "top", top=True)
        self.assertTrue(block.changed)
        self.assertEqual(block.names()[0], "X-Trace")
        self.assertEqual(block.names()[-1], "X-Added")
        data = block.to_bytes()
        self.assertTrue(data.startswith(b"X-Trace: top\r\nReceived: from client"))
        self.assertTrue(data.endswith(b"X-Empty:\r\nX-Added: bottom\r\n\r\n"))
        # Untouched fields keep their exact bytes.
        self.assertIn(b"To: bob@example.org,\r\n  carol@example.org\r\n", data)

    def test_set_replaces_first_in_place_and_drops_the_others(self) -> None:
        block = HeaderBlock.parse(b"A: 1\r\nsubject: one\r\nB: 2\r\nSUBJECT: two\r\nC: 3\r\n")
        block.set("Subject", "new")
        self.assertEqual(block.to_bytes(), b"A: 1\r\nsubject: new\r\nB: 2\r\nC: 3\r\n\r\n")
        block.set("X-Missing", "added")
        self.assertEqual(block.names()[-1], "X-Missing")
        self.assertTrue(block.changed)

    def test_remove_any_case(self) -> None:
        block = HeaderBlock.parse(b"X-Spam: a\r\nFrom: f@example.com\r\nx-spam: b\r\n")
        self.assertEqual(block.remove("X-SPAM"), 2)
        self.assertEqual(block.to_bytes(), b"From: f@example.com\r\n\r\n")
        untouched = HeaderBlock.parse(b"From: f@example.com\r\n")
        self.assertEqual(untouched.remove("X-Spam"), 0)
        self.assertFalse(untouched.changed)

    def test_replace_values(self) -> None:
        block = HeaderBlock.parse(
            b"To: a@old.example,\r\n b@keep.example\r\nCc: c@keep.example\r\nTo: d@keep.example\r\n"
        )
        count = block.replace_values("to", lambda v: v.replace("@old.example", "@new.example"))
        self.assertEqual(count, 1)
        self.assertEqual(
            block.to_bytes(),
            b"To: a@new.example, b@keep.example\r\nCc: c@keep.example\r\nTo: d@keep.example\r\n\r\n",
        )
        same = HeaderBlock.parse(b"To: x@y.example\r\n")
        self.assertEqual(same.replace_values("To", lambda v: v), 0)
        self.assertFalse(same.changed)

    def test_iteration_is_a_snapshot(self) -> None:
        block = HeaderBlock.parse(b"A: 1\r\nB: 2\r\n")
        for field in block:
            block.remove(field.name)
        self.assertEqual(len(block), 0)


class InjectionTests(SynchronousTestCase):
    BAD_VALUES = (
        "x\r\nBcc: victim@example.org",
        "x\nBcc: victim@example.org",
        "x\rBcc: victim@example.org",
        "x\x00y",
        "\r\n",
        "trailing\r\n",
    )
    BAD_NAMES = ("", "Bad Name", "X:Y", "X\r\nBcc", "Ünïcode", "X\x00", "a" * 77, "Tab\tName")

    def test_values_refused_everywhere(self) -> None:
        for value in self.BAD_VALUES:
            with self.subTest(value=value):
                block = HeaderBlock.parse(b"Subject: s\r\n")
                self.assertRaises(HeaderError, check_value, value)
                self.assertRaises(HeaderError, encode_field, "X-Test", value)
                self.assertRaises(HeaderError, block.add, "X-Test", value)
                self.assertRaises(HeaderError, block.set, "Subject", value)
                self.assertRaises(HeaderError, block.set, "X-New", value)
                self.assertRaises(HeaderError, block.replace_values, "Subject", lambda v, bad=value: bad)
                self.assertEqual(block.to_bytes(), b"Subject: s\r\n\r\n")
                self.assertFalse(block.changed)

    def test_names_refused(self) -> None:
        for name in self.BAD_NAMES:
            with self.subTest(name=name):
                self.assertRaises(HeaderError, check_name, name)
                self.assertRaises(HeaderError, HeaderBlock([]).add, name, "v")

    def test_good_names(self) -> None:
        for name in ("X-Spam-Status", "a", "x" * 76, "!#$%&'*+-.^_`|~0"):
            self.assertEqual(check_name(name), name)

    def test_value_of_a_unicode_line_separator_is_encoded_not_split(self) -> None:
        # U+2028 and U+0085 are line breaks to str.splitlines, never to SMTP: they are RFC 2047 text.
        field = encode_field("Subject", "a\u2028b\x85c")
        self.assertEqual(field.count(b"\r\n"), 1 + field.count(b"\r\n "))
        self.assertTrue(field.isascii())


class EncodingTests(SynchronousTestCase):
    def test_ascii_short(self) -> None:
        self.assertEqual(encode_field("X-Test", "value"), b"X-Test: value\r\n")
        self.assertEqual(encode_field("X-Empty", ""), b"X-Empty: \r\n")

    def test_non_ascii_is_rfc2047(self) -> None:
        for value in ("Grüße aus Köln", "日本語の件名 " * 8, "café"):
            with self.subTest(value=value):
                field = encode_field("Subject", value)
                self.assertTrue(field.isascii())
                self.assertTrue(field.startswith(b"Subject: =?utf-8?"))
                self.assertTrue(field.endswith(b"\r\n"))
                lines = field[:-2].split(b"\r\n")
                self.assertTrue(all(len(line) <= FOLD_WIDTH for line in lines), lines)
                self.assertTrue(all(line[:1] == b" " for line in lines[1:]))
                encoded = unfold(field)[:-2].decode("ascii").partition(": ")[2]
                self.assertEqual(str(make_header(decode_header(encoded))), value)

    def test_fold_at_whitespace(self) -> None:
        value = " ".join(f"word{i:02}" for i in range(40))
        field = encode_field("X-Long", value)
        lines = field[:-2].split(b"\r\n")
        self.assertGreater(len(lines), 1)
        self.assertTrue(all(len(line) <= FOLD_WIDTH for line in lines), lines)
        self.assertTrue(all(line[:1] == b" " for line in lines[1:]))
        self.assertEqual(unfold(field), b"X-Long: " + value.encode() + b"\r\n")
        self.assertEqual(HeaderBlock.parse(field).get("X-Long"), value)

    def test_first_word_too_long_folds_after_the_name(self) -> None:
        value = "a" * 72 + " b"
        field = encode_field("X-Trail", value)
        self.assertEqual(field, b"X-Trail:\r\n " + value.encode() + b"\r\n")
        self.assertEqual(HeaderBlock.parse(field).get("X-Trail"), value)

    def test_unbreakable_word_is_left_long(self) -> None:
        word = "x" * 120
        field = encode_field("X-Token", word)
        self.assertEqual(unfold(field), b"X-Token: " + word.encode() + b"\r\n")
        self.assertIn(word.encode(), field)

    def test_folded_field_reparses_as_one(self) -> None:
        block = HeaderBlock.parse(b"From: a@example.com\r\n")
        block.add("X-Long", "v " * 100)
        reparsed = HeaderBlock.parse(block.to_bytes()[:-2])
        self.assertEqual(reparsed.names(), ["From", "X-Long"])


class AddRawTests(SynchronousTestCase):
    GOOD = b"DKIM-Signature: v=1; a=rsa-sha256;\r\n\td=example.com; s=sel;\r\n\tb=abc\r\n"

    def test_accepted_at_top(self) -> None:
        block = HeaderBlock.parse(b"From: a@example.com\r\n")
        block.add_raw(self.GOOD)
        self.assertEqual(block.to_bytes(), self.GOOD + b"From: a@example.com\r\n\r\n")
        self.assertTrue(block.changed)
        block.add_raw(b"X-Bottom: 1\r\n", top=False)
        self.assertEqual(block.names(), ["DKIM-Signature", "From", "X-Bottom"])

    def test_refused(self) -> None:
        for raw in (
            b"No colon\r\n",
            b"Bad Name: x\r\n",
            b": x\r\n",
            b"X-Test: no final crlf",
            b"X-Test: nul \x00\r\n",
            b"X-Test: bare\nlf\r\n",
            b"X-Test: bare\rcr\r\n",
            b"X-Test: a\r\nX-Other: two fields\r\n",
            b"X-Test: a\r\n\r\n",
            b"X-Test: a\r\nnot-continued\r\n",
            b"X-Test: lf ending\n",
        ):
            with self.subTest(raw=raw):
                block = HeaderBlock.parse(b"From: a@example.com\r\n")
                self.assertRaises(HeaderError, block.add_raw, raw)
                self.assertFalse(block.changed)
                self.assertEqual(len(block), 1)


class ComposedReaderTests(SynchronousTestCase):
    HEAD = b"X-New: 1\r\nFrom: a@example.com\r\n\r\n"
    SOURCE = b"From: old@example.com\r\n\r\nthe body\r\n\xff 8-bit\r\n"
    OFFSET = SOURCE.index(b"the body")
    EXPECTED = HEAD + SOURCE[OFFSET:]

    def test_no_head_no_offset_is_the_stream_itself(self) -> None:
        stream = io.BytesIO(self.SOURCE)
        self.assertIs(message_reader(None, stream, 0), stream)

    def test_read_all(self) -> None:
        with message_reader(self.HEAD, io.BytesIO(self.SOURCE), self.OFFSET) as reader:
            self.assertEqual(reader.read(), self.EXPECTED)
            self.assertEqual(reader.read(), b"")

    def test_small_reads(self) -> None:
        for size in (1, 2, 3, 7, len(self.HEAD) - 1, len(self.HEAD), len(self.HEAD) + 1):
            with self.subTest(size=size):
                raw = ComposedReader(self.HEAD, io.BytesIO(self.SOURCE), self.OFFSET)
                parts = []
                while chunk := raw.read(size):
                    self.assertLessEqual(len(chunk), size)
                    parts.append(chunk)
                self.assertEqual(b"".join(parts), self.EXPECTED)

    def test_readinto(self) -> None:
        raw = ComposedReader(self.HEAD, io.BytesIO(self.SOURCE), self.OFFSET)
        out = bytearray()
        buffer = bytearray(5)
        while n := raw.readinto(buffer):
            out += buffer[:n]
        self.assertEqual(bytes(out), self.EXPECTED)
        reader = message_reader(self.HEAD, io.BytesIO(self.SOURCE), self.OFFSET)
        big = bytearray(1000)
        total = 0
        while n := reader.readinto(memoryview(big)[total:]):
            total += n
        self.assertEqual(bytes(big[:total]), self.EXPECTED)

    def test_offset_without_head(self) -> None:
        reader = message_reader(None, io.BytesIO(self.SOURCE), self.OFFSET)
        self.assertEqual(reader.read(), self.SOURCE[self.OFFSET :])

    def test_offset_past_the_end(self) -> None:
        reader = message_reader(self.HEAD, io.BytesIO(self.SOURCE), len(self.SOURCE) + 10)
        self.assertEqual(reader.read(), self.HEAD)

    def test_offset_at_the_end(self) -> None:
        reader = message_reader(self.HEAD, io.BytesIO(self.SOURCE), len(self.SOURCE))
        self.assertEqual(reader.read(), self.HEAD)

    def test_unseekable_stream_with_short_reads(self) -> None:
        for size in (1, 3, 1000):
            with self.subTest(size=size):
                reader = message_reader(self.HEAD, Trickle(self.SOURCE, size), self.OFFSET)  # type: ignore[arg-type]
                self.assertEqual(reader.read(), self.EXPECTED)

    def test_unseekable_stream_long_skip(self) -> None:
        source = b"H: v\r\n\r\n" + bytes(range(256)) * 1000
        offset = 8 + 100_000
        reader = message_reader(b"N: 1\r\n\r\n", Trickle(source, 4096), offset)  # type: ignore[arg-type]
        self.assertEqual(reader.read(), b"N: 1\r\n\r\n" + source[offset:])

    def test_close_closes_the_inner_stream(self) -> None:
        inner = io.BytesIO(self.SOURCE)
        reader = message_reader(self.HEAD, inner, self.OFFSET)
        reader.read(3)
        reader.close()
        self.assertTrue(inner.closed)
        reader.close()  # twice is harmless
        inner2 = io.BytesIO(self.SOURCE)
        with message_reader(self.HEAD, inner2, self.OFFSET):
            pass
        self.assertTrue(inner2.closed)

    def test_readable_not_seekable(self) -> None:
        raw = ComposedReader(self.HEAD, io.BytesIO(self.SOURCE), self.OFFSET)
        self.assertTrue(raw.readable())
        self.assertFalse(raw.seekable())
        self.assertFalse(raw.writable())

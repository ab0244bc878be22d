"""Tests for dcrouter.proxy.clienthello: real ClientHellos from OpenSSL, re-framed, cut and mutated."""

from __future__ import annotations

import ssl
import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dcrouter.proxy.clienthello import (
    ClientHello,
    ClientHelloReader,
    MalformedClientHello,
    _parse_body,
    _parse_body_checked,
    parse_client_hello,
)
from tests.tls_hellos import (
    extensions_of,
    frame,
    handshake_of,
    real_client_hello,
    sni,
    with_extension,
    with_extensions,
)

TLS12, TLS13 = 0x0303, 0x0304
SNI, ALPN, SUPPORTED_VERSIONS = 0, 16, 43

# Made once: OpenSSL's hellos differ only in random bytes and key shares between runs.
HELLO_13 = real_client_hello("www.Example.com", alpn=["h2", "http/1.1"])
HELLO_12 = real_client_hello("api.example.net", maximum=ssl.TLSVersion.TLSv1_2)
HELLO_NO_SNI = real_client_hello(None)
HELLO_IDNA = real_client_hello("bücher.example")
HANDSHAKE_13 = handshake_of(HELLO_13)


def outcome(data: bytes, max_bytes: int = 16384) -> ClientHello | str | None:
    """The parser's answer, with MalformedClientHello as the string "malformed"; any other exception
    propagates and fails the test."""
    try:
        return parse_client_hello(data, max_bytes=max_bytes)
    except MalformedClientHello:
        return "malformed"


def hello_with_sni(data: bytes) -> ClientHello | None:
    return parse_client_hello(frame(with_extension(HANDSHAKE_13, SNI, data)))


class RealHelloTests(SynchronousTestCase):
    def test_tls13_with_sni_and_alpn(self) -> None:
        hello = parse_client_hello(HELLO_13)
        assert hello is not None
        self.assertEqual(hello.server_name, "www.example.com")
        self.assertEqual(hello.server_name_reason, "")
        self.assertEqual(hello.alpn, ("h2", "http/1.1"))
        self.assertEqual(hello.legacy_version, TLS12)
        self.assertIn(TLS13, hello.supported_versions)

    def test_tls12_client(self) -> None:
        hello = parse_client_hello(HELLO_12)
        assert hello is not None
        self.assertEqual(hello.server_name, "api.example.net")
        self.assertEqual(hello.legacy_version, TLS12)
        self.assertEqual(hello.supported_versions, ())
        self.assertEqual(hello.alpn, ())

    def test_without_sni(self) -> None:
        hello = parse_client_hello(HELLO_NO_SNI)
        assert hello is not None
        self.assertIsNone(hello.server_name)
        self.assertEqual(hello.server_name_reason, "no server_name extension")

    def test_idna_name_arrives_as_a_label(self) -> None:
        hello = parse_client_hello(HELLO_IDNA)
        assert hello is not None
        self.assertEqual(hello.server_name, "xn--bcher-kva.example")

    def test_bytes_after_the_hello_are_ignored(self) -> None:
        # A TLS 1.3 client may follow its hello with early data in a record of another type.
        hello = parse_client_hello(HELLO_13 + b"\x17\x03\x03\x00\x05hello")
        assert hello is not None
        self.assertEqual(hello.server_name, "www.example.com")

    def test_tls12_hello_without_extension_block(self) -> None:
        handshake = handshake_of(HELLO_12)
        prefix_length = len(with_extensions(handshake, [])) - 2  # drop the empty block's length field
        body = with_extensions(handshake, [])[4:prefix_length]
        hello = parse_client_hello(frame(b"\x01" + len(body).to_bytes(3, "big") + body))
        assert hello is not None
        self.assertIsNone(hello.server_name)
        self.assertEqual(hello.alpn, ())


class ReassemblyTests(SynchronousTestCase):
    def test_every_strict_prefix_needs_more(self) -> None:
        for hello in (HELLO_13, HELLO_12, HELLO_NO_SNI):
            for length in range(len(hello)):
                self.assertIsNone(parse_client_hello(hello[:length]), length)

    def test_byte_by_byte(self) -> None:
        reader = ClientHelloReader()
        for byte in HELLO_13[:-1]:
            self.assertIsNone(reader.feed(bytes([byte])))
        hello = reader.feed(HELLO_13[-1:])
        self.assertEqual(hello, parse_client_hello(HELLO_13))
        self.assertIs(reader.feed(b"more"), hello)

    def test_one_byte_records(self) -> None:
        data = frame(HANDSHAKE_13, [1] * (len(HANDSHAKE_13) - 1))
        self.assertEqual(len(data), 6 * len(HANDSHAKE_13))
        self.assertEqual(parse_client_hello(data), parse_client_hello(HELLO_13))

    def test_records_split_inside_handshake_header_and_extensions(self) -> None:
        data = frame(HANDSHAKE_13, [2, 3, 100, 7])
        reader = ClientHelloReader()
        for byte in data[:-1]:
            self.assertIsNone(reader.feed(bytes([byte])))
        self.assertEqual(reader.feed(data[-1:]), parse_client_hello(HELLO_13))

    @given(st.lists(st.integers(1, 600), max_size=8), st.lists(st.integers(1, 700), max_size=8))
    def test_any_records_any_segments(self, records: list[int], segments: list[int]) -> None:
        data = frame(HANDSHAKE_13, records)
        reader = ClientHelloReader()
        offset, result = 0, None
        for size in [*segments, len(data)]:
            result = reader.feed(data[offset : offset + size])
            offset += size
            if offset < len(data):
                self.assertIsNone(result)
        self.assertEqual(result, parse_client_hello(HELLO_13))


class RecordLayerTests(SynchronousTestCase):
    def assertMalformed(self, data: bytes, max_bytes: int = 16384) -> None:
        self.assertRaises(MalformedClientHello, parse_client_hello, data, max_bytes=max_bytes)

    def test_other_content_type(self) -> None:
        self.assertMalformed(b"\x17")
        self.assertMalformed(b"\x15\x03\x01\x00\x02\x02\x28")

    def test_record_versions(self) -> None:
        self.assertMalformed(b"\x16\x02")
        self.assertMalformed(b"\x16\x03\x00")
        self.assertMalformed(b"\x16\x03\x05")
        for minor in (1, 2, 3, 4):
            self.assertIsNone(parse_client_hello(bytes([0x16, 3, minor])))
            data = bytearray(HELLO_13)
            data[2] = minor
            self.assertEqual(parse_client_hello(bytes(data)), parse_client_hello(HELLO_13))

    def test_empty_record(self) -> None:
        self.assertMalformed(b"\x16\x03\x01\x00\x00")

    def test_oversized_record(self) -> None:
        self.assertMalformed(b"\x16\x03\x01\x40\x01")

    def test_other_handshake_type(self) -> None:
        self.assertMalformed(b"\x16\x03\x01\x00\x04\x02")

    def test_alert_between_handshake_records(self) -> None:
        first = frame(HANDSHAKE_13[:10])
        self.assertMalformed(first + b"\x15\x03\x01\x00\x02\x02\x28")

    def test_record_continues_past_hello(self) -> None:
        self.assertMalformed(frame(HANDSHAKE_13 + b"\x00"))

    def test_second_message_in_last_record_is_refused(self) -> None:
        self.assertMalformed(frame(HANDSHAKE_13 + HANDSHAKE_13))

    def test_trailing_bytes_inside_handshake(self) -> None:
        body = HANDSHAKE_13[4:] + b"\x00\x00"
        self.assertMalformed(frame(b"\x01" + len(body).to_bytes(3, "big") + body))


class ByteCapTests(SynchronousTestCase):
    def test_exact_cap_is_enough(self) -> None:
        self.assertIsNotNone(parse_client_hello(HELLO_13, max_bytes=len(HELLO_13)))

    def test_one_byte_short(self) -> None:
        self.assertRaises(MalformedClientHello, parse_client_hello, HELLO_13, max_bytes=len(HELLO_13) - 1)

    def test_refused_as_soon_as_the_header_tells(self) -> None:
        # Record header plus handshake header: the hello needs 517 bytes and 9 are enough to know it.
        self.assertRaises(MalformedClientHello, parse_client_hello, HELLO_13[:9], max_bytes=516)
        self.assertIsNone(parse_client_hello(HELLO_13[:9], max_bytes=517))

    def test_record_headers_count(self) -> None:
        data = frame(HANDSHAKE_13, [100])
        self.assertEqual(len(data), len(HELLO_13) + 5)
        self.assertIsNotNone(parse_client_hello(data, max_bytes=len(data)))
        # The second record header is still to come, but the first record proves it is needed.
        self.assertRaises(MalformedClientHello, parse_client_hello, data[:9], max_bytes=len(data) - 1)

    def test_handshake_bigger_than_any_cap(self) -> None:
        self.assertRaises(MalformedClientHello, parse_client_hello, b"\x16\x03\x01\x00\x04\x01\xff\xff\xff")


class ServerNameTests(SynchronousTestCase):
    def assertNoName(self, data: bytes, reason: str) -> None:
        hello = hello_with_sni(data)
        assert hello is not None
        self.assertIsNone(hello.server_name)
        self.assertIn(reason, hello.server_name_reason)

    def test_name_is_normalised(self) -> None:
        for raw in (b"WWW.Example.COM", b"www.example.com."):
            hello = hello_with_sni(sni(raw))
            assert hello is not None
            self.assertEqual(hello.server_name, "www.example.com")

    def test_ip_addresses_are_not_names(self) -> None:
        self.assertNoName(sni(b"192.0.2.1"), "IP address")
        self.assertNoName(sni(b"192.0.2.1."), "IP address")
        self.assertNoName(sni(b"127.1"), "address literal")
        self.assertNoName(sni(b"::1"), "IP address")
        self.assertNoName(sni(b"2001:db8::1"), "IP address")

    def test_several_host_names(self) -> None:
        self.assertNoName(sni(b"a.example", b"b.example"), "2 host_names")
        self.assertNoName(sni(b"a.example", b"a.example"), "2 host_names")

    def test_empty_name(self) -> None:
        self.assertNoName(sni(b""), "empty host name")

    def test_invalid_names(self) -> None:
        for raw in (b"under_score.example", b"a..example", b"-a.example", b"*.example.com", b"xn--zz-.ex"):
            self.assertNoName(sni(raw), "SNI host_name")
        self.assertNoName(sni(b"b\xc3\xbccher.example"), "not printable ASCII")
        self.assertNoName(sni(b"a b.example"), "not printable ASCII")
        self.assertNoName(sni(b"a\x00.example"), "not printable ASCII")

    def test_other_name_types_are_skipped(self) -> None:
        self.assertNoName(sni(b"a.example", name_type=1), "without a host_name")
        other = sni(b"junk", name_type=7)[2:]
        entries = sni(b"a.example")[2:] + other
        hello = hello_with_sni(struct.pack("!H", len(entries)) + entries)
        assert hello is not None
        self.assertEqual(hello.server_name, "a.example")

    def test_framing_errors_are_malformed(self) -> None:
        good = sni(b"a.example")
        for data in (
            b"",
            b"\x00",
            b"\x00\x00",
            good + b"\x00",
            good[:-1],
            b"\x00\x0d" + good[2:],
            b"\x00\x01\x00",
        ):
            self.assertRaises(MalformedClientHello, hello_with_sni, data)


class ExtensionTests(SynchronousTestCase):
    def assertMalformed(self, handshake: bytes) -> None:
        self.assertRaises(MalformedClientHello, parse_client_hello, frame(handshake))

    def test_duplicate_extension(self) -> None:
        extensions = extensions_of(HANDSHAKE_13)
        self.assertMalformed(with_extensions(HANDSHAKE_13, [*extensions, extensions[0]]))

    def test_alpn(self) -> None:
        names = b"\x02h2\x03\xffx\x00"
        hello = parse_client_hello(frame(with_extension(HANDSHAKE_13, ALPN, b"\x00\x07" + names)))
        assert hello is not None
        self.assertEqual(hello.alpn, ("h2", "\xffx\x00"))
        for data in (b"", b"\x00\x00", b"\x00\x01\x00", b"\x00\x04\x02h2", b"\x00\x03\x02h2\x00"):
            self.assertMalformed(with_extension(HANDSHAKE_13, ALPN, data))

    def test_supported_versions(self) -> None:
        hello = parse_client_hello(
            frame(with_extension(HANDSHAKE_13, SUPPORTED_VERSIONS, b"\x04\x7a\x7a\x03\x04"))
        )
        assert hello is not None
        self.assertEqual(hello.supported_versions, (0x7A7A, TLS13))
        for data in (b"", b"\x00", b"\x03\x03\x04\x03", b"\x02\x03\x04\x00", b"\x04\x03\x04"):
            self.assertMalformed(with_extension(HANDSHAKE_13, SUPPORTED_VERSIONS, data))

    def test_extension_block_length_off_by_one(self) -> None:
        for delta in (-1, 1):
            handshake = bytearray(HANDSHAKE_13)
            block_at = len(handshake) - sum(4 + len(data) for _k, data in extensions_of(HANDSHAKE_13)) - 2
            (length,) = struct.unpack_from("!H", handshake, block_at)
            struct.pack_into("!H", handshake, block_at, length + delta)
            self.assertMalformed(bytes(handshake))


class FixedFieldTests(SynchronousTestCase):
    def assertMalformed(self, body: bytes) -> None:
        data = frame(b"\x01" + len(body).to_bytes(3, "big") + body)
        self.assertRaises(MalformedClientHello, parse_client_hello, data)

    def test_fixed_fields(self) -> None:
        random = bytes(32)
        suite, null, no_extensions = b"\x00\x02\x13\x01", b"\x01\x00", b"\x00\x00"
        rest = suite + null + no_extensions
        self.assertIsNotNone(parse_client_hello(frame(_handshake(b"\x03\x03" + random + b"\x00" + rest))))
        self.assertMalformed(b"\x02\x00" + random + b"\x00" + rest)
        self.assertMalformed(b"\x03\x00" + random + b"\x00" + rest)
        self.assertMalformed(b"\x03\x03" + random + b"\x21" + bytes(33) + rest)
        self.assertMalformed(b"\x03\x03" + random + b"\x00" + b"\x00\x00" + null + no_extensions)
        self.assertMalformed(b"\x03\x03" + random + b"\x00" + b"\x00\x03\x13\x01\x01" + null + no_extensions)
        self.assertMalformed(b"\x03\x03" + random + b"\x00" + suite + b"\x00" + no_extensions)
        self.assertMalformed(b"\x03\x03" + random + b"\x00" + suite + null + b"\x00")
        self.assertMalformed(b"\x03\x03" + random[:5])


def _handshake(body: bytes) -> bytes:
    return b"\x01" + len(body).to_bytes(3, "big") + body


class TruncationTests(SynchronousTestCase):
    def test_body_cut_at_every_length(self) -> None:
        """A hello whose lengths claim a shorter body is malformed, or (cut right after the compression
        methods) a valid extension-less hello with no name; never another name."""
        body = HANDSHAKE_13[4:]
        for length in range(len(body)):
            result = outcome(frame(_handshake(body[:length])))
            if isinstance(result, ClientHello):
                self.assertIsNone(result.server_name, length)
            else:
                self.assertEqual(result, "malformed", length)


class FuzzTests(SynchronousTestCase):
    @settings(max_examples=500)
    @given(st.binary(max_size=600))
    def test_arbitrary_bytes(self, data: bytes) -> None:
        self.assertIn(type(outcome(data)), (ClientHello, type(None), str))

    @settings(max_examples=500)
    @given(st.binary(max_size=600))
    def test_arbitrary_handshake_in_valid_records(self, body: bytes) -> None:
        self.assertIn(type(outcome(frame(_handshake(b"\x03\x03" + body)))), (ClientHello, type(None), str))

    @settings(max_examples=500)
    @given(st.data())
    def test_mutated_real_hello(self, data: st.DataObject) -> None:
        wire = data.draw(st.sampled_from([HELLO_13, frame(HANDSHAKE_13, [50, 50])]))
        mutated = _mutate(data, wire)
        self.assertIn(type(outcome(mutated)), (ClientHello, type(None), str))

    @settings(max_examples=500)
    @given(st.data())
    def test_mutated_handshake_reframed(self, data: st.DataObject) -> None:
        """Mutations inside the handshake with valid records: the name is the real one, None, or comes from
        bytes the mutation touched inside the SNI extension."""
        handshake = _mutate(data, HANDSHAKE_13)
        result = outcome(frame(handshake))
        if isinstance(result, ClientHello) and result.server_name is not None:
            self.assertTrue(
                result.server_name == "www.example.com" or b"www.Example.com" not in handshake, result
            )

    @settings(max_examples=1000)
    @given(st.data())
    def test_the_read_by_index_agrees_with_the_checked_parse(self, data: st.DataObject) -> None:
        """_parse_body reads a well-formed hello by index and hands anything else to _parse_body_checked:
        for real hellos, mutated ones and the extension blocks, both give the same hello or error."""
        original = data.draw(st.sampled_from([HELLO_13, HELLO_12, HELLO_NO_SNI, HELLO_IDNA]))
        body = handshake_of(original)[4:]
        if data.draw(st.booleans()):
            body = _mutate(data, body)

        def result(parse: Any) -> ClientHello | str:
            try:
                return parse(body)  # type: ignore[no-any-return]
            except MalformedClientHello as exc:
                return f"malformed: {exc}"

        self.assertEqual(result(_parse_body), result(_parse_body_checked))


def _mutate(data: st.DataObject, original: bytes) -> bytes:
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(mutated)))
        action = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "insert":
            mutated[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        elif at < len(mutated):
            if action == "flip":
                mutated[at] ^= data.draw(st.integers(1, 255))
            else:
                del mutated[at]
    return bytes(mutated)

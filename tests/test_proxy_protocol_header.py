"""PROXY protocol headers: what the proxy writes to backends (v1, v2) and reads from trusted proxies."""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.trial.unittest import SynchronousTestCase

from dcrouter.net.proxyprotocol import (
    V2_SIGNATURE,
    IncomingHeader,
    ProxyHeaderError,
    client_address,
    encode,
    encode_v1,
    encode_v2,
    may_start_header,
)

CLIENT4 = IPv4Address("TCP", "192.0.2.7", 51000)
LOCAL4 = IPv4Address("TCP", "198.51.100.1", 443)
CLIENT6 = IPv6Address("TCP", "2001:db8::7", 51000)
LOCAL6 = IPv6Address("TCP", "2001:db8::1", 443)


class EncodeV1Tests(SynchronousTestCase):
    def test_ipv4(self) -> None:
        self.assertEqual(encode_v1(CLIENT4, LOCAL4), b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 443\r\n")

    def test_ipv6(self) -> None:
        self.assertEqual(encode_v1(CLIENT6, LOCAL6), b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 443\r\n")

    def test_ipv4_mapped_addresses_are_written_as_ipv4(self) -> None:
        """A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d; backends get the plain form."""
        client = IPv6Address("TCP", "::ffff:192.0.2.7", 51000)
        local = IPv6Address("TCP", "::ffff:198.51.100.1", 443)
        self.assertEqual(encode_v1(client, local), b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 443\r\n")

    def test_mixed_families_and_non_ip_addresses_are_unknown(self) -> None:
        self.assertEqual(encode_v1(CLIENT4, LOCAL6), b"PROXY UNKNOWN\r\n")
        self.assertEqual(encode_v1(UNIXAddress(b"/tmp/s"), LOCAL4), b"PROXY UNKNOWN\r\n")
        self.assertEqual(encode_v1(None, None), b"PROXY UNKNOWN\r\n")

    def test_twisted_parser_reads_it_back(self) -> None:
        info = V1Parser.parse(encode_v1(CLIENT6, LOCAL6)[:-2])
        self.assertEqual(info.source, CLIENT6)
        self.assertEqual(info.destination, LOCAL6)


class EncodeV2Tests(SynchronousTestCase):
    def test_ipv4_bytes(self) -> None:
        expected = (
            V2_SIGNATURE
            + bytes([0x21, 0x11])
            + struct.pack("!H", 12)
            + bytes([192, 0, 2, 7, 198, 51, 100, 1])
            + struct.pack("!HH", 51000, 443)
        )
        self.assertEqual(encode_v2(CLIENT4, LOCAL4), expected)

    def test_twisted_parser_reads_back_ipv4_and_ipv6(self) -> None:
        for client, local in ((CLIENT4, LOCAL4), (CLIENT6, LOCAL6)):
            info = V2Parser.parse(encode_v2(client, local))
            for parsed, sent in ((info.source, client), (info.destination, local)):
                self.assertEqual(ipaddress.ip_address(parsed.host), ipaddress.ip_address(sent.host))
                self.assertEqual(parsed.port, sent.port)

    def test_unknown_addresses_are_a_local_header(self) -> None:
        header = encode_v2(CLIENT4, LOCAL6)
        self.assertEqual(header, V2_SIGNATURE + b"\x20\x00\x00\x00")
        self.assertIsNone(V2Parser.parse(header).source)


class EncodeTests(SynchronousTestCase):
    def test_by_version(self) -> None:
        self.assertEqual(encode("none", CLIENT4, LOCAL4), b"")
        self.assertEqual(encode("v1", CLIENT4, LOCAL4), encode_v1(CLIENT4, LOCAL4))
        self.assertEqual(encode("v2", CLIENT4, LOCAL4), encode_v2(CLIENT4, LOCAL4))
        self.assertRaises(ValueError, encode, "v3", CLIENT4, LOCAL4)


class IncomingHeaderTests(SynchronousTestCase):
    def feed_bytewise(self, data: bytes) -> tuple[object, bytes]:
        reader = IncomingHeader()
        for i in range(len(data)):
            result = reader.feed(data[i : i + 1])
            if result is not None:
                info, rest = result
                return info, rest + data[i + 1 :]
        self.fail("the header never completed")

    def test_v1_byte_by_byte_keeps_what_follows(self) -> None:
        info, rest = self.feed_bytewise(encode_v1(CLIENT4, LOCAL4) + b"\x16\x03\x01")
        self.assertEqual(client_address(info), CLIENT4)  # type: ignore[arg-type]
        self.assertEqual(rest, b"\x16\x03\x01")

    def test_v2_byte_by_byte_keeps_what_follows(self) -> None:
        info, rest = self.feed_bytewise(encode_v2(CLIENT6, LOCAL6) + b"GET / HTTP/1.1\r\n")
        source = client_address(info)  # type: ignore[arg-type]
        assert source is not None
        self.assertEqual((source.host, source.port), ("2001:db8::7", 51000))
        self.assertEqual(rest, b"GET / HTTP/1.1\r\n")

    def test_whole_header_in_one_chunk(self) -> None:
        result = IncomingHeader().feed(encode_v1(CLIENT6, LOCAL6) + b"x")
        assert result is not None
        self.assertEqual(client_address(result[0]), CLIENT6)
        self.assertEqual(result[1], b"x")

    def test_unknown_and_local_carry_no_client(self) -> None:
        for header in (b"PROXY UNKNOWN\r\n", encode_v2(None, None)):
            result = IncomingHeader().feed(header)
            assert result is not None
            self.assertIsNone(client_address(result[0]))

    def test_not_a_header(self) -> None:
        self.assertRaises(ProxyHeaderError, IncomingHeader().feed, b"\x16\x03\x01\x02\x00")
        self.assertRaises(ProxyHeaderError, IncomingHeader().feed, b"GET / HTTP/1.1\r\n")

    def test_v1_longer_than_107_bytes(self) -> None:
        reader = IncomingHeader()
        self.assertIsNone(reader.feed(b"PROXY TCP4 " + b"1" * 90))
        self.assertRaises(ProxyHeaderError, reader.feed, b"1" * 10)
        self.assertRaises(ProxyHeaderError, IncomingHeader().feed, b"PROXY TCP4 " + b"1" * 100 + b" \r\n")

    def test_v1_addresses_must_be_addresses(self) -> None:
        """Twisted's parser takes any text as an address; one that is not would match no block list."""
        for line in (
            b"PROXY TCP4 evil.example 192.0.2.1 1 2\r\n",
            b"PROXY TCP4 2001:db8::1 192.0.2.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 192.0.2.1 70000 2\r\n",
            b"PROXY TCP4 192.0.2.7 192.0.2.1 port 2\r\n",
            b"PROXY TCP4 192.0.2.7\r\n",
            b"PROXY SCTP 192.0.2.7 192.0.2.1 1 2\r\n",
        ):
            self.assertRaises(ProxyHeaderError, IncomingHeader().feed, line)

    def test_v2_malformed(self) -> None:
        too_long = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 65000)
        self.assertRaises(ProxyHeaderError, IncomingHeader().feed, too_long)
        bad_version = V2_SIGNATURE + b"\x31\x11" + struct.pack("!H", 12) + bytes(12)
        self.assertRaises(ProxyHeaderError, IncomingHeader().feed, bad_version)
        short_addresses = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 4) + bytes(4)
        self.assertRaises(ProxyHeaderError, IncomingHeader().feed, short_addresses)

    def test_may_start_header(self) -> None:
        for data in (b"", b"P", b"PROXY", b"PROXY TCP4", V2_SIGNATURE[:5], V2_SIGNATURE + b"\x21"):
            self.assertTrue(may_start_header(data), data)
        for data in (b"\x16\x03", b"GET ", b"PX", b"SSH-2.0"):
            self.assertFalse(may_start_header(data), data)


addresses = st.one_of(
    st.builds(
        lambda n, p: IPv4Address("TCP", str(ipaddress.IPv4Address(n)), p),
        st.integers(0, 2**32 - 1),
        st.integers(0, 65535),
    ),
    st.builds(
        lambda n, p: IPv6Address("TCP", str(ipaddress.IPv6Address(n)), p),
        st.integers(0, 2**128 - 1).filter(lambda n: ipaddress.IPv6Address(n).ipv4_mapped is None),
        st.integers(0, 65535),
    ),
)


class RoundTripTests(SynchronousTestCase):
    @given(addresses, addresses, st.sampled_from(["v1", "v2"]), st.binary(max_size=20))
    def test_what_is_written_is_read_back(self, source, destination, version, after) -> None:  # type: ignore[no-untyped-def]
        header = encode(version, source, destination)
        result = IncomingHeader().feed(header + after)
        assert result is not None
        info, rest = result
        self.assertEqual(rest, after)
        if type(source) is type(destination):
            parsed = client_address(info)
            assert parsed is not None
            self.assertEqual(ipaddress.ip_address(parsed.host), ipaddress.ip_address(source.host))
            self.assertEqual(parsed.port, source.port)
        else:
            self.assertIsNone(client_address(info))

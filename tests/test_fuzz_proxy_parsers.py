"""Fuzzing the proxy's byte parsers that see a connection's first bytes: the TLS ClientHello reader and the
PROXY protocol header reader. Whatever the bytes, in whatever pieces: a result, "need more", or the
parser's own error, never another exception; every strict prefix of a valid input is "need more"; the
answer does not depend on how the bytes were cut; the buffered bytes stay bounded."""

from __future__ import annotations

import ssl

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.trial.unittest import SynchronousTestCase

from dcrouter.net.proxyprotocol import (
    V2_MAX,
    IncomingHeader,
    ProxyHeaderError,
    encode_v1,
    encode_v2,
)
from dcrouter.proxy.clienthello import ClientHello, ClientHelloReader, MalformedClientHello
from tests.fuzzing import examples, mutated, split
from tests.tls_hellos import real_client_hello

HELLOS = [
    real_client_hello("www.example.com", alpn=["h2", "http/1.1"]),
    real_client_hello("api.example.net", maximum=ssl.TLSVersion.TLSv1_2),
    real_client_hello(None),
    real_client_hello("bücher.example"),
]
#: A hello cut into several records, as some clients and attackers send it.
_HANDSHAKE = HELLOS[0][5:]
HELLOS.append(
    b"".join(b"\x16\x03\x01" + len(p).to_bytes(2, "big") + p for p in split(_HANDSHAKE, [7, 40, 300]))
)

hello_bytes = st.one_of(
    st.binary(max_size=600),
    mutated(st.sampled_from(HELLOS)),
    # A plausible record header in front of random bytes reaches past the first checks.
    st.builds(
        lambda n, body: b"\x16\x03\x01" + n.to_bytes(2, "big") + b"\x01" + body,
        st.integers(0, 2**16 - 1),
        st.binary(max_size=600),
    ),
)


def hello_outcome(pieces: list[bytes], max_bytes: int = 16384) -> ClientHello | str | None:
    reader = ClientHelloReader(max_bytes=max_bytes)
    result: ClientHello | None = None
    try:
        for piece in pieces:
            result = reader.feed(piece)
            # Never more buffered than one record (header and 2^14 bytes) besides the handshake so far.
            assert len(reader._pending) <= len(piece) + 5 + 2**14 or result is not None
            assert len(reader._handshake) <= max_bytes
    except MalformedClientHello:
        return "malformed"
    return result


class ClientHelloFuzzTests(SynchronousTestCase):
    @examples(2)
    @given(hello_bytes, st.lists(st.integers(0, 1 << 16), max_size=8), st.integers(64, 20000))
    def test_any_bytes_any_cut(self, data: bytes, cuts: list[int], max_bytes: int) -> None:
        whole = hello_outcome([data], max_bytes)
        self.assertEqual(hello_outcome(split(data, cuts), max_bytes), whole)
        if isinstance(whole, ClientHello) and whole.server_name is not None:
            self.assertEqual(whole.server_name, whole.server_name.lower())
            self.assertTrue(whole.server_name.isascii())

    def test_every_truncation_of_a_valid_hello_needs_more(self) -> None:
        for hello in HELLOS:
            complete = hello_outcome([hello])
            self.assertIsInstance(complete, ClientHello)
            for cut in range(len(hello)):
                self.assertIsNone(hello_outcome([hello[:cut]]), cut)
                # And the same bytes fed one at a time.
            self.assertEqual(hello_outcome([hello[i : i + 1] for i in range(len(hello))]), complete)


def _v1(addresses: tuple[str, str, int, int]) -> bytes:
    src, dst, sport, dport = addresses
    kind = IPv6Address if ":" in src else IPv4Address
    return encode_v1(kind("TCP", src, sport), kind("TCP", dst, dport))


def _v2(addresses: tuple[str, str, int, int]) -> bytes:
    src, dst, sport, dport = addresses
    kind = IPv6Address if ":" in src else IPv4Address
    return encode_v2(kind("TCP", src, sport), kind("TCP", dst, dport))


ports = st.integers(0, 65535)
address_pairs = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(str), st.ip_addresses(v=4).map(str), ports, ports),
    st.tuples(st.ip_addresses(v=6).map(str), st.ip_addresses(v=6).map(str), ports, ports),
)
valid_headers = st.one_of(
    address_pairs.map(_v1),
    address_pairs.map(_v2),
    st.just(b"PROXY UNKNOWN\r\n"),
    st.just(encode_v2(None, None)),
    # v2 with TLVs after the addresses (the length covers them).
    st.builds(
        lambda header, tlvs: (
            header[:14]
            + (int.from_bytes(header[14:16], "big") + len(tlvs)).to_bytes(2, "big")
            + header[16:]
            + tlvs
        ),
        address_pairs.map(_v2),
        st.binary(max_size=64),
    ),
)
proxy_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda tail: b"PROXY " + tail, st.binary(max_size=120)),
    st.builds(
        lambda tail: b"PROXY TCP4 " + tail,
        st.text(alphabet="0123456789. :\r\nTCP6abcdef", max_size=80).map(str.encode),
    ),
    st.builds(lambda tail: encode_v2(None, None)[:12] + tail, st.binary(max_size=300)),
    mutated(valid_headers),
)


def proxy_outcome(pieces: list[bytes]) -> tuple[object, bytes] | str | None:
    reader = IncomingHeader()
    try:
        for index, piece in enumerate(pieces):
            result = reader.feed(piece)
            if result is not None:
                info, rest = result
                return (info.source, info.destination), rest + b"".join(pieces[index + 1 :])
            assert len(reader._buffer) <= V2_MAX, len(reader._buffer)
    except ProxyHeaderError:
        return "refused"
    return None


class ProxyHeaderFuzzTests(SynchronousTestCase):
    @examples(2)
    @given(proxy_bytes, st.binary(max_size=8), st.lists(st.integers(0, 1 << 16), max_size=6))
    def test_any_bytes_any_cut(self, data: bytes, after: bytes, cuts: list[int]) -> None:
        stream = data + after
        self.assertEqual(proxy_outcome(split(stream, cuts)), proxy_outcome([stream]))

    @examples(1)
    @given(valid_headers, st.binary(max_size=16))
    def test_every_truncation_of_a_valid_header_needs_more(self, header: bytes, after: bytes) -> None:
        result = proxy_outcome([header + after])
        assert isinstance(result, tuple), result
        self.assertEqual(result[1], after)
        for cut in range(len(header)):
            self.assertIsNone(proxy_outcome([header[:cut]]), cut)

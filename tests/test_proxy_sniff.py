"""Tests for dcrouter.proxy.sniff: TLS, HTTP/1.x or other, from bytes fed as a client sends them."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dcrouter.proxy.clienthello import parse_client_hello
from dcrouter.proxy.sniff import Kind, Sniffed, Sniffer
from tests.tls_hellos import frame, handshake_of, real_client_hello, sni, with_extension

HELLO = real_client_hello("Shop.Example.com", alpn=["h2"])
HELLO_NO_SNI = real_client_hello(None)


def sniff(data: bytes, max_bytes: int = 16384) -> Sniffed | None:
    return Sniffer(max_bytes=max_bytes).feed(data)


def sniff_bytewise(data: bytes, max_bytes: int = 16384) -> tuple[Sniffed | None, int]:
    """The verdict and how many bytes it took, feeding one byte at a time; (None, len) if undecided."""
    sniffer = Sniffer(max_bytes=max_bytes)
    for index in range(len(data)):
        verdict = sniffer.feed(data[index : index + 1])
        if verdict is not None:
            return verdict, index + 1
    return None, len(data)


def request(*fields: bytes, line: bytes = b"GET / HTTP/1.1") -> bytes:
    return b"\r\n".join([line, *fields]) + b"\r\n\r\n"


class TLSTests(SynchronousTestCase):
    def test_hello_with_sni(self) -> None:
        verdict = sniff(HELLO)
        assert verdict is not None
        self.assertEqual(verdict.kind, Kind.TLS)
        self.assertEqual(verdict.server_name, "shop.example.com")
        self.assertEqual(verdict.reason, "")
        self.assertEqual(verdict.hello, parse_client_hello(HELLO))

    def test_byte_by_byte_decides_on_the_last_byte(self) -> None:
        verdict, used = sniff_bytewise(HELLO + b"\x17\x03\x03")
        self.assertEqual(used, len(HELLO))
        self.assertEqual(verdict, sniff(HELLO))

    def test_split_across_records(self) -> None:
        verdict, used = sniff_bytewise(frame(handshake_of(HELLO), [3, 40, 200]))
        assert verdict is not None
        self.assertEqual(verdict.server_name, "shop.example.com")
        self.assertEqual(used, len(HELLO) + 15)

    def test_without_sni(self) -> None:
        verdict = sniff(HELLO_NO_SNI)
        assert verdict is not None
        self.assertEqual((verdict.kind, verdict.server_name), (Kind.TLS, None))
        self.assertIsNotNone(verdict.hello)
        self.assertEqual(verdict.reason, "no server_name extension")

    def test_ip_address_in_sni(self) -> None:
        verdict = sniff(frame(with_extension(handshake_of(HELLO), 0, sni(b"10.0.0.1"))))
        assert verdict is not None
        self.assertIsNone(verdict.server_name)
        self.assertIn("IP address", verdict.reason)

    def test_idna(self) -> None:
        verdict = sniff(real_client_hello("Bücher.example"))
        assert verdict is not None
        self.assertEqual(verdict.server_name, "xn--bcher-kva.example")

    def test_malformed_hello(self) -> None:
        verdict = sniff(b"\x16\x03\x01\x00\x04\x02")
        self.assertEqual(verdict, Sniffed(Kind.TLS, None, None, verdict.reason if verdict else ""))
        assert verdict is not None
        self.assertIn("malformed ClientHello", verdict.reason)

    def test_hello_over_the_byte_cap(self) -> None:
        verdict, used = sniff_bytewise(HELLO, max_bytes=512)
        assert verdict is not None
        self.assertEqual((verdict.kind, verdict.server_name, verdict.hello), (Kind.TLS, None, None))
        self.assertIn("more than 512 bytes", verdict.reason)
        # The record header alone says 5 + 512 bytes are coming.
        self.assertEqual(used, 5)

    def test_give_up_mid_hello(self) -> None:
        sniffer = Sniffer()
        self.assertIsNone(sniffer.feed(HELLO[:100]))
        verdict = sniffer.give_up()
        self.assertEqual((verdict.kind, verdict.server_name, verdict.hello), (Kind.TLS, None, None))
        self.assertIn("incomplete ClientHello", verdict.reason)


class OtherTests(SynchronousTestCase):
    def test_decided_at_once(self) -> None:
        for first in (
            b"SSH-2.0-OpenSSH_9.2\r\n",
            b"\x00",
            b"EHLO client.example\r\n",
            b"\x80\x2e\x01",
            b"get ",
        ):
            verdict = sniff(first[:1])
            assert verdict is not None, first
            self.assertEqual((verdict.kind, verdict.server_name, verdict.hello), (Kind.OTHER, None, None))

    def test_method_prefix_waits_then_decides(self) -> None:
        sniffer = Sniffer()
        self.assertIsNone(sniffer.feed(b"H"))
        self.assertIsNone(sniffer.feed(b"E"))
        verdict = sniffer.feed(b"LO client.example\r\n")
        assert verdict is not None
        self.assertEqual(verdict.kind, Kind.OTHER)

    def test_unknown_methods_and_http2_preface(self) -> None:
        for data in (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"GETS / HTTP/1.1\r\n", b"GET\t/ HTTP/1.1\r\n"):
            verdict = sniff(data)
            assert verdict is not None
            self.assertEqual(verdict.kind, Kind.OTHER, data)

    def test_give_up_with_nothing(self) -> None:
        sniffer = Sniffer()
        self.assertIsNone(sniffer.feed(b""))
        self.assertEqual(sniffer.give_up(), Sniffed(Kind.OTHER, None, None, "no bytes before the deadline"))

    def test_give_up_with_a_method_prefix(self) -> None:
        sniffer = Sniffer()
        self.assertIsNone(sniffer.feed(b"OPTI"))
        self.assertEqual(sniffer.give_up().kind, Kind.OTHER)

    def test_verdict_is_final(self) -> None:
        sniffer = Sniffer()
        verdict = sniffer.feed(b"SSH-2.0")
        self.assertIs(sniffer.feed(HELLO), verdict)
        self.assertIs(sniffer.give_up(), verdict)


class HTTPTests(SynchronousTestCase):
    def assertName(self, data: bytes, name: str) -> None:
        verdict = sniff(data)
        assert verdict is not None
        self.assertEqual((verdict.kind, verdict.server_name, verdict.reason), (Kind.HTTP, name, ""))

    def assertNoName(self, data: bytes, reason: str) -> None:
        verdict = sniff(data)
        assert verdict is not None, data
        self.assertEqual((verdict.kind, verdict.server_name, verdict.hello), (Kind.HTTP, None, None))
        self.assertIn(reason, verdict.reason)

    def test_host(self) -> None:
        self.assertName(request(b"Host: www.example.com", b"Accept: */*"), "www.example.com")

    def test_every_method(self) -> None:
        for method in (
            b"GET",
            b"HEAD",
            b"POST",
            b"PUT",
            b"DELETE",
            b"CONNECT",
            b"OPTIONS",
            b"TRACE",
            b"PATCH",
        ):
            self.assertName(request(b"Host: a.example", line=method + b" / HTTP/1.1"), "a.example")

    def test_host_is_normalised_and_port_stripped(self) -> None:
        self.assertName(request(b"HOST:  WWW.Example.COM.:8080 "), "www.example.com")
        self.assertName(request(b"host:xn--bcher-kva.example"), "xn--bcher-kva.example")

    def test_body_after_head_is_ignored(self) -> None:
        self.assertName(
            request(b"Host: a.example", b"Content-Length: 5", line=b"POST /f HTTP/1.1") + b"x\nyz",
            "a.example",
        )

    def test_http10(self) -> None:
        self.assertName(request(b"Host: a.example", line=b"GET / HTTP/1.0"), "a.example")
        self.assertNoName(request(line=b"GET / HTTP/1.0"), "no Host header")

    def test_host_count(self) -> None:
        self.assertNoName(request(b"Accept: */*"), "no Host header")
        self.assertNoName(request(b"Host: a.example", b"host: a.example"), "2 Host headers")
        self.assertNoName(request(b"Host: a.example", b"HOST: b.example"), "2 Host headers")

    def test_address_literals(self) -> None:
        self.assertNoName(request(b"Host: [::1]:80"), "IP literal")
        self.assertNoName(request(b"Host: [2001:db8::1]"), "IP literal")
        self.assertNoName(request(b"Host: 192.0.2.1:80"), "IP address")
        self.assertNoName(request(b"Host: 127.1"), "address literal")

    def test_invalid_hosts(self) -> None:
        self.assertNoName(request(b"Host:"), "empty")
        self.assertNoName(request(b"Host: a.example:http"), "invalid port")
        self.assertNoName(request(b"Host: a.example:65536"), "invalid port")
        self.assertNoName(request(b"Host: a.example:"), "invalid port")
        self.assertNoName(request(b"Host: user@a.example"), "userinfo")
        self.assertNoName(request(b"Host: under_score.example"), "invalid label")
        self.assertNoName(request("Host: bücher.example".encode()), "not printable ASCII")
        self.assertNoName(request(b"Host: a.example b.example"), "invalid label")

    def test_obs_fold(self) -> None:
        self.assertNoName(request(b"Host: a.example", b"X-Long: one", b" two"), "obs-fold")
        self.assertNoName(request(b"X-Long: one", b"\tHost: a.example"), "obs-fold")

    def test_whitespace_before_colon(self) -> None:
        self.assertNoName(request(b"Host : a.example"), "whitespace between field name and colon")
        self.assertNoName(request(b"Host\t: a.example"), "whitespace between field name and colon")

    def test_malformed_field_lines(self) -> None:
        self.assertNoName(request(b"Host: a.example", b"no colon here"), "without a colon")
        self.assertNoName(request(b"Host: a.example", b"Bad Name: x"), "invalid field name")
        self.assertNoName(request(b"Host: a.example", b": x"), "invalid field name")

    def test_malformed_request_lines(self) -> None:
        for line in (
            b"GET / HTTP/2.0",
            b"GET  / HTTP/1.1",
            b"GET / HTTP/1.1 ",
            b"GET HTTP/1.1",
            b"GET / http/1.1",
        ):
            self.assertNoName(request(b"Host: a.example", line=line), "malformed request line")

    def test_bare_lf_decides_at_once(self) -> None:
        verdict, used = sniff_bytewise(b"GET / HTTP/1.1\nHost: a.example\n\n")
        assert verdict is not None
        self.assertEqual((verdict.kind, verdict.server_name), (Kind.HTTP, None))
        self.assertIn("bare LF", verdict.reason)
        self.assertEqual(used, len(b"GET / HTTP/1.1\n"))

    def test_absolute_form(self) -> None:
        self.assertName(request(b"Host: a.example", line=b"GET http://A.example:80/x HTTP/1.1"), "a.example")
        self.assertNoName(
            request(b"Host: a.example", line=b"GET https://b.example/ HTTP/1.1"), "different hosts"
        )
        self.assertNoName(request(b"Host: a.example", line=b"GET http://[::1]/ HTTP/1.1"), "request-target")

    def test_byte_by_byte(self) -> None:
        data = request(b"Host: a.example:8443", b"User-Agent: curl/8")
        verdict, used = sniff_bytewise(data + b"body")
        self.assertEqual(used, len(data))
        self.assertEqual(verdict, sniff(data))

    def test_head_longer_than_cap(self) -> None:
        data = request(b"Host: a.example", b"X-Pad: " + b"p" * 100)
        self.assertName(data, "a.example")
        verdict = sniff(data, max_bytes=len(data))
        assert verdict is not None
        self.assertEqual(verdict.server_name, "a.example")
        verdict, used = sniff_bytewise(data, max_bytes=len(data) - 1)
        assert verdict is not None
        self.assertEqual((verdict.server_name, used), (None, len(data) - 1))
        self.assertIn("longer than", verdict.reason)
        self.assertEqual(sniff(data, max_bytes=len(data) - 1), verdict)

    def test_give_up_mid_head(self) -> None:
        sniffer = Sniffer()
        self.assertIsNone(sniffer.feed(b"GET / HTTP/1.1\r\nHost: a.example\r\n"))
        verdict = sniffer.give_up()
        self.assertEqual((verdict.kind, verdict.server_name), (Kind.HTTP, None))
        self.assertIn("incomplete request head", verdict.reason)


_chunks = st.lists(st.integers(1, 64), max_size=40)
_heads = st.lists(
    st.sampled_from([b"Host: a.example", b"Host: b.example:81", b"X: y", b" fold", b"Bad : x", b"\n", b"\r"]),
    max_size=6,
).map(lambda fields: request(*fields))


class FuzzTests(SynchronousTestCase):
    @settings(max_examples=300)
    @given(
        st.one_of(st.binary(max_size=300), _heads, st.binary().map(lambda tail: HELLO[:200] + tail)), _chunks
    )
    def test_chunking_never_changes_the_verdict(self, data: bytes, chunks: list[int]) -> None:
        whole = sniff(data, max_bytes=256)
        sniffer, offset, verdict = Sniffer(max_bytes=256), 0, None
        for size in [*chunks, len(data)]:
            verdict = sniffer.feed(data[offset : offset + size])
            offset += size
        self.assertEqual(verdict, whole)
        if verdict is not None and verdict.server_name is not None:
            self.assertEqual(verdict.reason, "")
        if verdict is None:
            self.assertIn(sniffer.give_up().kind, tuple(Kind))

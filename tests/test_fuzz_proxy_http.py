"""Fuzzing the terminating proxy's HTTP/1.1 message parser (dcrouter.proxy.httpmessage) and the request path
of the proxy around it (head, Host, framing, body), on bytes cut anywhere.

Whatever the bytes: requests, refusals (HttpError with a status the proxy has a reason for) or "need more",
never another exception; the outcome does not depend on the cuts; buffers stay bounded; what is passed on
(the forwarded head, the re-encoded chunked body) parses back, strictly, to what was read, so the next
parser cannot read it differently (request smuggling)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dcrouter.proxy.http import host_name
from dcrouter.proxy.httpmessage import (
    HOP_BY_HOP,
    MAX_CHUNK_LINE,
    MAX_HEAD_BYTES,
    REASONS,
    ChunkedBody,
    HeadBuffer,
    HttpError,
    forwarded_request_head,
    parse_request_head,
    parse_response_head,
    relayed_response_head,
    request_framing,
    response_framing,
)
from tests.fuzzing import examples, mutated, split


def _mostly(good: list[bytes], bad: list[bytes]) -> st.SearchStrategy[bytes]:
    """Valid values nine times in ten: a request must get past its first line to reach the rest."""
    copies = -(-9 * len(bad) // len(good))
    return st.sampled_from(good * copies + bad)


_methods = _mostly([b"GET", b"POST", b"HEAD", b"PUT"], [b"CONNECT", b"G T", b"", b"\xff"])
_targets = _mostly([b"/", b"/a?b=c", b"http://x.example/p"], [b"*", b"", b"/\x00", b"/ x"])
_versions = _mostly([b"HTTP/1.1", b"HTTP/1.0"], [b"HTTP/2.0", b"HTTP/1.1 ", b"http/1.1", b"HTTP/1"])
_names = _mostly(
    [
        b"Content-Length",
        b"Transfer-Encoding",
        b"Connection",
        b"Upgrade",
        b"X-Forwarded-For",
        b"Keep-Alive",
        b"TE",
        b"X",
        b"Host",
    ],
    [b"Host ", b" Host", b"", b"A\x00", b"Content-Length "],
)
_value_words = _mostly(
    [
        b"www.example.com",
        b"www.example.com:8443",
        b"0",
        b"5",
        b"10",
        b"chunked",
        b"close",
        b"keep-alive",
        b"upgrade",
        b"websocket",
        b"1.2.3.4",
        b"",
        b"Upgrade, close",
    ],
    [
        b"[::1]",
        b"-1",
        b"+3",
        b"0x10",
        b"gzip, chunked",
        b"chunked, chunked",
        b"Chunked",
        b" chunked ",
        b"a\rb",
        b"\x7f",
        b"99999999999999999999",
        b"example.com:99999",
        b"xn--nxasmq6b.example",
        b"\xc3\xbc.example",
        b"127.1",
        b"a..b",
    ],
)
_values = st.one_of(_value_words, _value_words, _value_words, st.binary(max_size=12))
_separator = _mostly([b": ", b":"], [b" : ", b":\t", b" :"])
_host_field = _mostly([b"Host: www.example.com", b"host: a.example:81"], [b"Host: ", b"Host: [::1]"])
_fields = st.lists(st.tuples(_names, _values, _separator), max_size=4)
_line_end = _mostly([b"\r\n"], [b"\n", b"\r", b"\r\r\n"])


def _head(
    method: bytes,
    target: bytes,
    version: bytes,
    host: bytes,
    fields: list[tuple[bytes, bytes, bytes]],
    end: bytes,
) -> bytes:
    lines = [b"%s %s %s" % (method, target, version), host, *(n + sep + v for n, v, sep in fields)]
    return b"\r\n".join(lines) + b"\r\n" + end


_chunked_bodies = st.builds(
    lambda chunks, trailer: (
        b"".join(b"%x%s\r\n%s\r\n" % (len(c), ext, c) for c, ext in chunks) + b"0\r\n" + trailer + b"\r\n"
    ),
    st.lists(
        st.tuples(st.binary(max_size=20), st.sampled_from([b"", b";a=b", b"; x", b";\x00"])), max_size=4
    ),
    st.sampled_from([b"", b"X-T: 1\r\n", b"bad\r\n", b"X: \x00\r\n"]),
)
requests = st.builds(
    lambda head, body: head + body,
    st.builds(_head, _methods, _targets, _versions, _host_field, _fields, _line_end),
    st.one_of(st.just(b""), st.binary(max_size=30), _chunked_bodies),
)
request_streams = st.one_of(
    st.lists(requests, max_size=3).map(b"".join),
    mutated(st.lists(requests, min_size=1, max_size=2).map(b"".join)),
    st.binary(max_size=200),
    st.builds(lambda n: b"\r\n" * n + b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n", st.integers(0, 12)),
)


def read_requests(pieces: list[bytes], test: SynchronousTestCase) -> list[object]:
    """What the proxy's client side makes of ``pieces``: for each request its head, the body bytes passed on
    (re-encoded when chunked), and at the end the refusal status or "incomplete"."""
    events: list[object] = []
    head_buffer = HeadBuffer()
    body = None
    pending = b""
    try:
        for piece in pieces:
            pending += piece
            while pending:
                if body is None:
                    complete = head_buffer.feed(pending)
                    pending = b""
                    test.assertLessEqual(len(head_buffer._buffer), MAX_HEAD_BYTES + len(piece))
                    if complete is None:
                        break
                    raw, pending = complete
                    head = parse_request_head(raw)
                    framing = request_framing(head)
                    try:
                        name: str | None = host_name(head.fields.get(b"host"))
                    except ValueError:
                        name = None
                    check_forwarded(head, test)
                    events.append(("head", head, name, framing))
                    body = framing.reader()
                    if body.done:
                        body = None
                        head_buffer = HeadBuffer()
                    continue
                out, pending = body.feed(pending)
                if isinstance(body, ChunkedBody):
                    test.assertLessEqual(len(body._line), MAX_CHUNK_LINE + 2)
                if out:
                    events.append(("body", out))
                if body.done:
                    body = None
                    head_buffer = HeadBuffer()
    except HttpError as error:
        test.assertIn(error.status, REASONS)
        return [*_merged(events), ("refused", error.status)]
    return _merged(events)


def _merged(events: list[object]) -> list[object]:
    """Body events joined per request (so cuts do not show), chunked ones decoded to their data."""
    merged: list[object] = []
    for event in events:
        assert isinstance(event, tuple)
        if event[0] == "body" and merged and merged[-1][0] == "body":  # type: ignore[index]
            merged[-1] = ("body", merged[-1][1] + event[1])  # type: ignore[index]
        else:
            merged.append(event)
    result: list[object] = []
    for event in merged:
        assert isinstance(event, tuple)
        result.append(("body", _dechunk(event[1])) if event[0] == "body" else event)
    return result


def _dechunk(data: bytes) -> bytes:
    """Re-encoded chunked data read back strictly; other bodies as they are."""
    if not data[:1].isalnum() or b"\r\n" not in data:
        return data
    reader = ChunkedBody()
    try:
        out, rest = reader.feed(data)
    except HttpError:
        return data
    if not reader.done:
        return data
    # A second pass over what the first produced gives the same bytes: the encoding is canonical.
    again = ChunkedBody()
    again_out, _ = again.feed(out)
    assert again_out == out, (again_out, out)
    chunks, pos = [], 0
    while True:
        line_end = out.index(b"\r\n", pos)
        size = int(out[pos:line_end], 16)
        if size == 0:
            return b"".join(chunks) + rest
        chunks.append(out[line_end + 2 : line_end + 2 + size])
        pos = line_end + 2 + size + 2


def check_forwarded(head, test: SynchronousTestCase) -> None:  # type: ignore[no-untyped-def]
    """The head sent to the backend parses back strictly to the same request, less hop-by-hop fields."""
    forwarded = forwarded_request_head(head, client_ip="192.0.2.7", trust_forwarded=False)
    again = parse_request_head(forwarded)
    test.assertEqual((again.method, again.target, again.version), (head.method, head.target, head.version))
    test.assertEqual(request_framing(again), request_framing(head))
    kept = [(n, v) for n, v in again.fields.lines if n.lower() not in HOP_BY_HOP]
    for name, _value in kept:
        test.assertNotIn(name.lower(), {b"connection", b"keep-alive", b"te", b"trailer"})
    test.assertEqual(again.fields.get_all(b"host"), head.fields.get_all(b"host"))


_statuses = st.sampled_from([b"200", b"204", b"304", b"101", b"100", b"404", b"099", b"1000", b"abc"])
responses = st.builds(
    lambda version, status, reason, fields, end: (
        b"%s %s%s\r\n" % (version, status, reason)
        + b"".join(n + sep + v + b"\r\n" for n, v, sep in fields)
        + end
    ),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1 "]),
    _statuses,
    st.sampled_from([b" OK", b"", b" ", b" \x00", b" \xff"]),
    _fields,
    _line_end,
)


class HttpMessageFuzzTests(SynchronousTestCase):
    @examples(2)
    @given(request_streams, st.lists(st.integers(0, 1 << 16), max_size=8))
    def test_requests_any_bytes_any_cut(self, stream: bytes, cuts: list[int]) -> None:
        whole = read_requests([stream], self)
        self.assertEqual(read_requests(split(stream, cuts), self), whole)

    @examples(1)
    @given(st.one_of(responses, mutated(responses)), st.sampled_from([b"GET", b"HEAD"]), st.booleans())
    def test_response_heads(self, raw: bytes, method: bytes, close: bool) -> None:
        try:
            # HeadBuffer says 400 or 431 for any head; the proxy answers the client 502 for a backend's.
            complete = HeadBuffer(leading_crlf=False).feed(raw)
        except HttpError:
            return
        if complete is None:
            return
        try:
            head = parse_response_head(complete[0])
            framing = response_framing(method, head)
        except HttpError as error:
            self.assertEqual(error.status, 502)
            return
        relayed = parse_response_head(relayed_response_head(head, close=close))
        self.assertEqual(
            (relayed.version, relayed.status, relayed.reason), (head.version, head.status, head.reason)
        )
        self.assertEqual(response_framing(method, relayed), framing)

    @examples(1)
    @given(
        _chunked_bodies.map(lambda b: b), st.lists(st.integers(0, 1 << 12), max_size=8), st.binary(max_size=8)
    )
    def test_chunked_body_any_cut(self, body: bytes, cuts: list[int], after: bytes) -> None:
        def run(pieces: list[bytes]) -> tuple[bytes, bytes] | int:
            reader, out, rest = ChunkedBody(), b"", b""
            try:
                for piece in pieces:
                    if reader.done:
                        rest += piece
                        continue
                    got, left = reader.feed(piece)
                    out, rest = out + got, rest + left
            except HttpError as error:
                return error.status
            return _dechunk(out) if reader.done else b"incomplete", rest

        self.assertEqual(run(split(body + after, cuts)), run([body + after]))

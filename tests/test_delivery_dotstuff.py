"""The outbound dot-stuffer and the body producer: byte-exact examples, properties over every chunking, and
flow control against a consumer that pushes back."""

from __future__ import annotations

import io
import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from dcrouter.delivery.dotstuff import DotStuffer, ProducerStopped, StuffedBodyProducer


def stuff(*chunks: bytes) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.encode(chunk) for chunk in chunks) + stuffer.finish()


def normalise(text: bytes) -> bytes:
    """What the receiver should get: no NUL octets, and every CRLF, bare CR and bare LF a CRLF."""
    return text.replace(b"\x00", b"").replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def unstuff(wire: bytes) -> bytes:
    """The receiver's side (RFC 5321 §4.5.2): cut at the terminator, drop one leading dot per line."""
    assert wire.endswith(b".\r\n")
    text = wire[: -len(b".\r\n")]
    if not text:
        return b""
    assert text.endswith(b"\r\n")
    lines = text[:-2].split(b"\r\n")
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


class ExampleTests(unittest.TestCase):
    def test_first_line_dot_is_doubled(self) -> None:
        self.assertEqual(stuff(b".hidden\r\nok\r\n"), b"..hidden\r\nok\r\n.\r\n")

    def test_lone_dot_and_double_dot_lines(self) -> None:
        self.assertEqual(stuff(b"a\r\n.\r\n..x\r\nb\r\n"), b"a\r\n..\r\n...x\r\nb\r\n.\r\n")

    def test_dot_at_chunk_boundary_after_crlf(self) -> None:
        self.assertEqual(stuff(b"a\r\n", b".\r\n", b"b"), b"a\r\n..\r\nb\r\n.\r\n")

    def test_dot_after_crlf_split_across_chunks(self) -> None:
        self.assertEqual(stuff(b"a\r", b"\n.b\r\n"), b"a\r\n..b\r\n.\r\n")
        self.assertEqual(stuff(b"a\r", b"\n", b".b\r\n"), b"a\r\n..b\r\n.\r\n")

    def test_split_crlf_stays_one_crlf(self) -> None:
        self.assertEqual(stuff(b"a\r", b"\nb\r\n"), b"a\r\nb\r\n.\r\n")

    def test_bare_lf_and_bare_cr_become_crlf(self) -> None:
        self.assertEqual(stuff(b"a\nb\rc\r\n"), b"a\r\nb\r\nc\r\n.\r\n")
        self.assertEqual(stuff(b"a\n.b\r.c\r\n"), b"a\r\n..b\r\n..c\r\n.\r\n")

    def test_cr_cr_lf_is_two_line_breaks(self) -> None:
        self.assertEqual(stuff(b"a\r", b"\r\nb"), b"a\r\n\r\nb\r\n.\r\n")

    def test_smuggling_sequences_cannot_end_the_data(self) -> None:
        wire = stuff(b"x\n.\r\nMAIL FROM:<evil@example>\r\n", b"y\r\n.\nz\r.\r")
        self.assertEqual(wire.count(b"\r\n.\r\n"), 1)
        self.assertTrue(wire.endswith(b"\r\n.\r\n"))

    def test_nul_octets_are_dropped_so_no_hop_reads_another_end(self) -> None:
        # Queued before ingress refused NUL (or by another writer): a server that drops NULs itself would
        # read "\x00." as the end of the data and the rest as commands. What goes out holds no NUL, so every
        # receiver reads the same lines, and the dot gets stuffed.
        wire = stuff(b"a\r\n\x00.\r\nMAIL FROM:<spoof@victim.test>\r\n.\x00\r\nb\r\n")
        self.assertEqual(wire, b"a\r\n..\r\nMAIL FROM:<spoof@victim.test>\r\n..\r\nb\r\n.\r\n")
        self.assertEqual(stuff(b"a\r\n\x00", b".\r\n"), b"a\r\n..\r\n.\r\n")
        self.assertEqual(stuff(b"a\r", b"\x00", b"\n\x00.b"), b"a\r\n..b\r\n.\r\n")
        self.assertEqual(stuff(b"\x00"), b".\r\n")

    def test_as_many_cr_as_lf_but_not_paired(self) -> None:
        # Counting CR, LF and CRLF decides whether a chunk needs normalising: equal counts are not enough.
        self.assertEqual(stuff(b"a\n\rb\r\n"), b"a\r\n\r\nb\r\n.\r\n")
        self.assertEqual(stuff(b"a\n\r.b\r\n"), b"a\r\n\r\n..b\r\n.\r\n")
        self.assertEqual(stuff(b"x\r\n.y\r\n"), b"x\r\n..y\r\n.\r\n")

    def test_body_without_final_line_break_gets_one(self) -> None:
        self.assertEqual(stuff(b"a\r\nlast"), b"a\r\nlast\r\n.\r\n")

    def test_trailing_cr_at_end(self) -> None:
        self.assertEqual(stuff(b"a\r"), b"a\r\n.\r\n")

    def test_empty_body(self) -> None:
        self.assertEqual(stuff(), b".\r\n")
        self.assertEqual(stuff(b"", b""), b".\r\n")

    def test_body_of_line_breaks_only(self) -> None:
        self.assertEqual(stuff(b"\r\n"), b"\r\n.\r\n")

    def test_misuse_raises(self) -> None:
        stuffer = DotStuffer()
        stuffer.finish()
        self.assertRaises(ValueError, stuffer.encode, b"x")
        self.assertRaises(ValueError, stuffer.finish)


# Mostly the characters that matter, with some others so lines have content.
_TEXT = st.binary(max_size=200).map(lambda raw: bytes(b".\r\nab\x00"[byte % 6] for byte in raw)) | st.binary(
    max_size=100
)


class PropertyTests(unittest.TestCase):
    @settings(max_examples=400, deadline=None)
    @given(_TEXT, st.lists(st.integers(min_value=0, max_value=200), max_size=12))
    def test_any_chunking(self, text: bytes, cuts: list[int]) -> None:
        wire = stuff(*split_at(text, cuts))
        # Never a bare CR or LF, never a NUL.
        self.assertIsNone(re.search(rb"\r(?!\n)|(?<!\r)\n", wire))
        self.assertNotIn(b"\x00", wire)
        # The terminator only at the end.
        self.assertTrue(wire.endswith(b".\r\n"))
        self.assertNotIn(b"\r\n.\r\n", wire[:-3])
        self.assertFalse(wire.startswith(b".\r\n") and len(wire) > 3)
        # Unstuffing gives the normalised input back, with a final line break.
        expected = normalise(text)
        if expected and not expected.endswith(b"\r\n"):
            expected += b"\r\n"
        self.assertEqual(unstuff(wire), expected)

    @settings(max_examples=200, deadline=None)
    @given(_TEXT, st.lists(st.integers(min_value=0, max_value=200), max_size=12))
    def test_output_does_not_depend_on_chunking(self, text: bytes, cuts: list[int]) -> None:
        self.assertEqual(stuff(*split_at(text, cuts)), stuff(text))


class FailingFile(io.BytesIO):
    """A body file whose disk fails after the first read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads = 0

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        if self.reads > 1:
            raise OSError(5, "Input/output error")
        return super().read(size)


class ProducerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.transport = StringTransport()

    def producer(self, body: io.BytesIO, **kwargs: int) -> StuffedBodyProducer:
        return StuffedBodyProducer(body, self.transport, clock=self.clock, **kwargs)

    def test_writes_stuffed_text_and_terminator_then_unregisters(self) -> None:
        body = io.BytesIO(b"a\r\n.b\r\n" * 3)
        producer = self.producer(body, chunk_size=4)
        done = producer.start()
        self.assertEqual(self.transport.value(), b"a\r\n..b\r\n" * 3 + b".\r\n")
        self.assertEqual(self.successResultOf(done), len(self.transport.value()))
        self.assertIsNone(self.transport.producer)

    def test_small_body_and_terminator_are_one_write(self) -> None:
        writes: list[bytes] = []
        self.transport.write = writes.append  # type: ignore[method-assign]
        producer = self.producer(io.BytesIO(b".a\r\nb\r\n"))
        self.successResultOf(producer.start())
        self.assertEqual(writes, [b"..a\r\nb\r\n.\r\n"])

    def test_short_reads_that_are_not_the_end_lose_nothing(self) -> None:
        class Trickle(io.RawIOBase):
            """A body whose reads return at most 3 octets (a pipe, say): short reads before the end."""

            def __init__(self, data: bytes) -> None:
                self._data = data

            def readable(self) -> bool:
                return True

            def read(self, size: int = -1) -> bytes:
                piece, self._data = self._data[:3], self._data[3:]
                return piece

        producer = self.producer(Trickle(b"ab\r\n.c\r\nd"), chunk_size=8)  # type: ignore[arg-type]
        self.successResultOf(producer.start())
        self.assertEqual(self.transport.value(), b"ab\r\n..c\r\nd\r\n.\r\n")

    def test_registers_as_a_streaming_producer(self) -> None:
        producer = self.producer(io.BytesIO(b"x" * 100), chunk_size=10, chunks_per_turn=2)
        producer.start()
        self.assertIs(self.transport.producer, producer)
        self.assertTrue(self.transport.streaming)

    def test_paused_consumer_stops_the_reading(self) -> None:
        body = io.BytesIO(b"0123456789" * 10)
        producer = self.producer(body, chunk_size=10, chunks_per_turn=3)
        done = producer.start()
        self.assertEqual(body.tell(), 30)
        producer.pauseProducing()
        # The next turn was scheduled before the pause; it must not read.
        self.clock.advance(0)
        self.assertEqual(body.tell(), 30)
        self.assertEqual(len(self.transport.value()), 30)
        self.assertNoResult(done)
        producer.resumeProducing()
        self.assertEqual(body.tell(), 60)
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(self.transport.value(), b"0123456789" * 10 + b"\r\n.\r\n")
        self.successResultOf(done)

    def test_pause_from_inside_write_is_honoured(self) -> None:
        body = io.BytesIO(b"y" * 1000)
        producer = self.producer(body, chunk_size=100, chunks_per_turn=100)
        original_write = self.transport.write

        def write(data: bytes) -> None:
            # A TCP transport pauses its producer from inside write once its buffer is over the limit.
            original_write(data)
            if len(self.transport.value()) >= 300:
                producer.pauseProducing()

        self.transport.write = write  # type: ignore[method-assign]
        done = producer.start()
        self.assertEqual(body.tell(), 300)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertNoResult(done)

    def test_one_turn_is_bounded(self) -> None:
        body = io.BytesIO(b"z" * 1000)
        done = self.producer(body, chunk_size=100, chunks_per_turn=2).start()
        # Two chunks, then the rest waits for a later reactor turn.
        self.assertEqual(body.tell(), 200)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertNoResult(done)
        self.clock.advance(0)
        self.assertEqual(body.tell(), 1000)
        self.successResultOf(done)

    def test_stop_producing_fails_and_reads_no_more(self) -> None:
        body = io.BytesIO(b"z" * 1000)
        producer = self.producer(body, chunk_size=100, chunks_per_turn=1)
        done = producer.start()
        producer.stopProducing()
        self.failureResultOf(done, ProducerStopped)
        self.clock.advance(0)
        producer.resumeProducing()
        self.assertEqual(body.tell(), 100)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_read_error_fails_without_terminator(self) -> None:
        producer = self.producer(FailingFile(b"a" * 50), chunk_size=10)
        done = producer.start()
        failure = self.failureResultOf(done, OSError)
        self.assertEqual(failure.value.errno, 5)
        self.assertEqual(self.transport.value(), b"a" * 10)
        self.assertIsNone(self.transport.producer)

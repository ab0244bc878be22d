"""bench/hol_sink: a downstream SMTP server for bench/hol, in Twisted, on 127.0.0.1.

    python -m bench.hol_sink --delay 0.5 --record FILE   # prints its port on stdout, then serves

Answers every command at once, except the end of DATA: after ``--delay`` seconds (0: at once). With
``--record``, appends one line per message accepted: ``<arrival time> <X-Bench-Sent header value>`` (the
sender's clock is the same machine's ``time.time()``), flushed as it goes.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import IO

from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver


class Sink(LineReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, delay: float, record: IO[str] | None) -> None:
        self.delay = delay
        self.record = record
        self.in_data = False
        self.sent = ""

    def connectionMade(self) -> None:
        self.sendLine(b"220 sink.bench.invalid ESMTP bench/hol_sink")

    def lineReceived(self, line: bytes) -> None:
        if self.in_data:
            if line == b".":
                self.in_data = False
                sent, self.sent = self.sent, ""
                if self.delay > 0:
                    reactor.callLater(self.delay, self._accepted, sent)  # type: ignore[attr-defined]
                else:
                    self._accepted(sent)
            elif not self.sent and line[:14].lower() == b"x-bench-sent: ":
                self.sent = line[14:].decode("ascii", "replace")
            return
        verb = line[:4].upper()
        if verb == b"EHLO":
            self.sendLine(b"250-sink.bench.invalid")
            self.sendLine(b"250-PIPELINING")
            self.sendLine(b"250 8BITMIME")
        elif verb == b"DATA":
            self.in_data = True
            self.sendLine(b"354 go ahead")
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"250 ok")

    def _accepted(self, sent: str) -> None:
        if self.record is not None:
            self.record.write(f"{time.time():.6f} {sent}\n")
            self.record.flush()
        if self.transport is not None and self.transport.connected:
            self.sendLine(b"250 2.0.0 queued")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hol_sink")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--record")
    args = parser.parse_args()
    record = open(args.record, "a") if args.record else None  # noqa: SIM115 (open for the process's life)
    factory = Factory.forProtocol(lambda: Sink(args.delay, record))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=1024)  # type: ignore[attr-defined]
    sys.stdout.write(f"{port.getHost().port}\n")
    sys.stdout.flush()
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()

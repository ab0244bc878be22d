"""Child process of tests/test_queue_crash.py: enqueue into the DiskQueue at ``argv[1]`` until killed.

Ids are ``argv[2]`` followed by a counter. Every acknowledged enqueue prints ``ACK <id> <sha256 of body>``
(and flushes), only from the enqueue's callback: a printed id is an acknowledged one, as a 250 would be. Every
fifth message is file-backed (a spool file moved in), the rest are inline; 16 enqueues are kept in flight so
that group commit batches them.
"""

from __future__ import annotations

import hashlib
import os
import sys

from twisted.internet import reactor
from twisted.python.failure import Failure

from dcrouter.mail.envelope import Envelope
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.queue.disk import DiskQueue
from dcrouter.queue.item import QueueItem

IN_FLIGHT = 16


def body_for(item_id: str, n: int) -> bytes:
    seed = hashlib.sha256(item_id.encode()).digest()
    return seed * (300_000 // 32 if n % 5 == 0 else 10_000 // 32)


class Feeder:
    def __init__(self, queue: DiskQueue, prefix: str) -> None:
        self.queue = queue
        self.prefix = prefix
        self.counter = 0

    def start(self, counts: dict[str, int]) -> None:
        sys.stdout.write(f"LOADED {counts['items']}\n")
        sys.stdout.flush()
        for _ in range(IN_FLIGHT):
            self.next()

    def next(self) -> None:
        n = self.counter
        self.counter += 1
        item_id = f"{self.prefix}{n:08d}"
        body = body_for(item_id, n)
        if n % 5 == 0:
            path = os.path.join(self.queue.spool_directory, f"spool-{item_id}")
            with open(path, "wb") as f:
                f.write(body)
            message = SpooledMessage(len(body), path=path)
        else:
            message = SpooledMessage(len(body), data=body)
        now = reactor.seconds()
        item = QueueItem(
            id=item_id,
            envelope=Envelope(mail_from="a@example.org", recipients=["b@example.com"]),
            size=len(body),
            created_at=now,
            next_attempt_at=now,
        )
        d = self.queue.enqueue(item, message)
        d.addCallbacks(self.acknowledged, self.failed, callbackArgs=(hashlib.sha256(body).hexdigest(),))

    def acknowledged(self, item: QueueItem, digest: str) -> None:
        sys.stdout.write(f"ACK {item.id} {digest}\n")
        sys.stdout.flush()
        self.next()

    def failed(self, failure: Failure) -> None:
        sys.stdout.write(f"ERROR {failure.getErrorMessage()}\n")
        sys.stdout.flush()
        reactor.stop()


def main() -> None:
    path, prefix = sys.argv[1], sys.argv[2]
    queue = DiskQueue(path, reactor=reactor, clock=reactor)
    feeder = Feeder(queue, prefix)
    queue.load().addCallbacks(feeder.start, feeder.failed)
    reactor.run()


if __name__ == "__main__":
    main()

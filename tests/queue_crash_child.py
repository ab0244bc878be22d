"""Child process of tests/test_queue_crash.py: enqueue into the DiskQueue at ``argv[1]`` until killed.

With ``argv[3]`` ``background``, the queue verifies its rows in the background, slowly (see
``slow_verify_chunk``), and prints ``VERIFIED`` when that is done.

Ids are ``argv[2]`` followed by a counter. Every acknowledged enqueue prints ``ACK <id> <sha256 of body>``
(and flushes), only from the enqueue's callback: a printed id is an acknowledged one, as a 250 would be. Every
fifth message is file-backed (a spool file moved in), the rest are inline; 16 enqueues are kept in flight so
that group commit batches them.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

from twisted.internet import reactor
from twisted.python.failure import Failure

from dcrouter.mail.envelope import Envelope
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.queue import disk as disk_module
from dcrouter.queue.disk import DiskQueue
from dcrouter.queue.item import QueueItem
from dcrouter.queue.recovery import verify_chunk

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


def slow_verify_chunk(*args: object) -> object:
    """The background verification, made slow enough that the parent's SIGKILL lands in the middle of it."""
    time.sleep(0.05)
    return verify_chunk(*args)  # type: ignore[arg-type]


def main() -> None:
    path, prefix = sys.argv[1], sys.argv[2]
    background = sys.argv[3:] == ["background"]
    if background:
        # A thread of the child, not the test's reactor, sleeps; 10 rows a chunk: 0.05 s per 10 rows.
        disk_module.VERIFY_CHUNK = 10
        disk_module.verify_chunk = slow_verify_chunk  # type: ignore[assignment]
    queue = DiskQueue(path, reactor=reactor, clock=reactor, background_verification=background)
    feeder = Feeder(queue, prefix)
    d = queue.load()
    d.addCallbacks(feeder.start, feeder.failed)
    if background:
        d.addCallback(lambda _: queue.verified())
        d.addCallback(lambda _: print("VERIFIED", flush=True))
    reactor.run()


if __name__ == "__main__":
    main()

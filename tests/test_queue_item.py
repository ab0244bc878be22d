"""QueueItem.copy: an independent copy, cheaper than copy.deepcopy (enqueue makes one per message)."""

from __future__ import annotations

import copy
import dataclasses

from twisted.trial import unittest

from dcrouter.mail.envelope import Envelope
from dcrouter.queue.item import QueueItem, QueueItemStatus


def _item() -> QueueItem:
    return QueueItem(
        id="A1B2C3D4E5F60718",
        envelope=Envelope(
            mail_from="a@b.test",
            recipients=["c@d.test", "e@f.test"],
            mail_params={"SIZE": "10"},
            tls="TLSv1.3",
        ),
        size=10,
        status=QueueItemStatus.DEFERRED,
        attempts=2,
        history=[{"at": 1.0, "route": "r", "tried": ["x"], "results": [{"recipient": "c@d.test"}]}],
        outcomes={"e@f.test": {"outcome": "delivered", "reply": "250", "target": "t", "at": 2.0}},
        head=b"Subject: x\r\n\r\n",
        body_offset=7,
    )


class CopyTests(unittest.TestCase):
    def test_equal_to_a_deep_copy(self) -> None:
        item = _item()
        self.assertEqual(item.copy(), copy.deepcopy(item))
        self.assertEqual(item.copy(), item)
        self.assertIsInstance(item.copy(), QueueItem)

    def test_changing_the_copy_never_changes_the_original(self) -> None:
        item = _item()
        before = copy.deepcopy(item)
        twin = item.copy()
        twin.status = QueueItemStatus.DELIVERING
        twin.envelope.recipients.append("g@h.test")
        twin.envelope.mail_params["BODY"] = "8BITMIME"
        twin.envelope.mail_from = "z@z.test"
        twin.history[0]["results"].append({"recipient": "e@f.test"})
        twin.outcomes["e@f.test"]["outcome"] = "permanent"
        twin.outcomes["c@d.test"] = {}
        self.assertEqual(item, before)

    def test_every_field_is_carried(self) -> None:
        # A field added later must come along without touching copy().
        item = _item()
        twin = item.copy()
        for f in dataclasses.fields(QueueItem):
            self.assertEqual(getattr(twin, f.name), getattr(item, f.name), f.name)
        for f in dataclasses.fields(Envelope):
            self.assertEqual(getattr(twin.envelope, f.name), getattr(item.envelope, f.name), f.name)

    def test_empty_history_and_outcomes_are_new_containers(self) -> None:
        item = dataclasses.replace(_item(), history=[], outcomes={})
        twin = item.copy()
        self.assertIsNot(twin.history, item.history)
        self.assertIsNot(twin.outcomes, item.outcomes)

"""The management API's routing, route dry-run, quarantine and suppression endpoints, over a real listening
port on 127.0.0.1 (the harness of tests.test_api)."""

from __future__ import annotations

from dcrouter.queue.item import QueueItemStatus
from tests.test_api import READER, ApiTestBase
from tests.test_queue_contract import make_item


class QuarantineEndpointTests(ApiTestBase):
    async def test_list_show_release_delete(self) -> None:
        await self.start()
        await self.enqueue(
            make_item("QA", status=QueueItemStatus.QUARANTINED, last_error="virus found"),
            make_item("QB", status=QueueItemStatus.QUARANTINED, last_error="spam"),
            make_item("QC"),
        )
        code, body, _ = await self.call("GET", "/api/v1/quarantine", token=READER)
        self.assertEqual(code, 200)
        self.assertEqual([(i["id"], i["reason"]) for i in body["items"]], [("QA", "virus found"), ("QB", "spam")])
        code, body, _ = await self.call("GET", "/api/v1/quarantine/QA", token=READER)
        self.assertEqual(code, 200)
        self.assertEqual((body["reason"], body["headers"], body["headersCut"]), ("virus found", ["Subject: x"], False))
        code, body, _ = await self.call("GET", "/api/v1/quarantine/QC", token=READER)
        self.assertEqual((code, body["error"]["code"]), (409, "wrong_status"))
        code, body, _ = await self.call("GET", "/api/v1/quarantine/QZ", token=READER)
        self.assertEqual((code, body["error"]["code"]), (404, "not_found"))
        code, body, _ = await self.call("GET", "/api/v1/quarantine/bad.id", token=READER)
        self.assertEqual((code, body["error"]["code"]), (400, "bad_id"))
        code, body, _ = await self.call("POST", "/api/v1/quarantine/QA/release", token=READER)
        self.assertEqual(code, 403)

        code, body, _ = await self.call("POST", "/api/v1/quarantine/QA/release")
        self.assertEqual((code, body["item"]["status"]), (200, "queued"))
        assert self.router.queue is not None
        item = await self.router.queue.get("QA")
        assert item is not None
        self.assertEqual((item.status, item.last_error), (QueueItemStatus.QUEUED, None))
        code, body, _ = await self.call("POST", "/api/v1/quarantine/QA/release")
        self.assertEqual((code, body["error"]["code"]), (409, "wrong_status"))

        code, body, _ = await self.call("DELETE", "/api/v1/quarantine/QB")
        self.assertEqual((code, body["item"]["id"]), (200, "QB"))
        self.assertIsNone(await self.router.queue.get("QB"))
        code, body, _ = await self.call("DELETE", "/api/v1/quarantine/QB")
        self.assertEqual(code, 404)
        code, body, _ = await self.call("DELETE", "/api/v1/quarantine/QC")
        self.assertEqual(code, 409)
        self.assertIsNotNone(await self.router.queue.get("QC"))

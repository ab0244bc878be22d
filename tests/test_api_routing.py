"""The management API's routing, route dry-run, quarantine and suppression endpoints, over a real listening
port on 127.0.0.1 (the harness of tests.test_api)."""

from __future__ import annotations

import io
import json
import os
import smtplib
import tomllib
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from dcrouter.cli import parse_args
from dcrouter.config import load_file
from dcrouter.ctl import run
from dcrouter.queue.item import QueueItemStatus
from tests.downstream import Script, start_downstream
from tests.integration import free_ports
from tests.test_api import READER, ApiTestBase, router_options
from tests.test_queue_contract import make_item


def smtp_options(domain_configs: list[dict[str, Any]], **api: Any) -> dict[str, Any]:
    return router_options({"domainConfigs": domain_configs}, **api)


def send(port: int, recipient: str, sender: str = "alice@sender.test") -> Any:
    """One message over a real SMTP session (in a thread: smtplib blocks); the refused recipients, or the
    SMTPRecipientsRefused it raised."""

    def run() -> Any:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            try:
                return client.sendmail(sender, [recipient], b"Subject: t\r\n\r\nhello\r\n")
            except smtplib.SMTPRecipientsRefused as refused:
                return refused.recipients

    return deferToThread(run)


class RoutingRouterBase(ApiTestBase):
    """The routing tests start their own router (:meth:`ApiTestBase.start_router`), deliveries running."""


class RoutingEndpointTests(RoutingRouterBase):
    async def test_get_shows_configured_routing(self) -> None:
        entry = {
            "domains": ["example.com"],
            "targetIPs": ["127.0.0.1"],
            "port": 9,
            "authentication": {"user": "u", "pass": "secret"},
        }
        await self.start_router(smtp_options([entry]))
        code, body, _ = await self.call("GET", "/api/v1/routing")
        self.assertEqual(code, 200)
        self.assertEqual(body, {"domainConfigs": [entry], "routingRules": [], "defaultServer": None})
        code, body, _ = await self.call("GET", "/api/v1/routing", token=READER)
        self.assertEqual(body["domainConfigs"][0]["authentication"], {"user": "u", "pass": "<hidden>"})
        code, body, _ = await self.call("GET", "/api/v1/routing", token=None)
        self.assertEqual(code, 401)
        # What a read token saw, sent back, is not taken for the password.
        code, body, _ = await self.call(
            "PUT",
            "/api/v1/routing",
            body={"domainConfigs": [{**entry, "authentication": {"user": "u", "pass": "<hidden>"}}]},
        )
        self.assertEqual(code, 422)
        self.assertEqual(
            body["error"]["errors"][0].split(":")[0], "smtpConfig.domainConfigs[0].authentication.pass"
        )

    async def test_invalid_routing_changes_nothing(self) -> None:
        await self.start_router(smtp_options([{"domains": ["example.com"], "targetIPs": ["127.0.0.1"]}]))
        code, before, _ = await self.call("GET", "/api/v1/routing")
        bad = {
            "domainConfigs": [
                {"domains": ["new.test"], "targetIPs": []},
                {"domains": ["bad domain!"], "targetIPs": ["x"]},
            ],
            "routingRules": [{"name": "r", "recipients": ["*@a.test"]}],
        }
        code, body, _ = await self.call("PUT", "/api/v1/routing", body=bad)
        self.assertEqual((code, body["error"]["code"]), (422, "invalid_config"))
        errors = body["error"]["errors"]
        self.assertTrue(any(e.startswith("smtpConfig.domainConfigs[0].targetIPs") for e in errors), errors)
        self.assertTrue(any(e.startswith("smtpConfig.domainConfigs[1].domains[0]") for e in errors), errors)
        self.assertTrue(any(e.startswith("smtpConfig.routingRules[0]") for e in errors), errors)
        code, after, _ = await self.call("GET", "/api/v1/routing")
        self.assertEqual(after, before)
        assert self.router.routes is not None
        self.assertEqual(self.router.routes.route("a@b.test", "x@example.com").name, "domain:example.com")
        # The body's own checks: types and unknown keys, 400 before any configuration check.
        code, body, _ = await self.call("PUT", "/api/v1/routing", body={"domainConfigs": {}})
        self.assertEqual((code, body["error"]["code"]), (400, "bad_field"))
        code, body, _ = await self.call("PUT", "/api/v1/routing", body={"domains": []})
        self.assertEqual((code, body["error"]["code"]), (400, "unknown_field"))
        code, body, _ = await self.call("PUT", "/api/v1/routing", token=READER, body={})
        self.assertEqual(code, 403)

    async def test_header_and_dkim_settings_are_not_changed_by_routing(self) -> None:
        await self.start_router(smtp_options([{"domains": ["example.com"], "targetIPs": ["127.0.0.1"]}]))
        entry = {
            "domains": ["example.com"],
            "targetIPs": ["127.0.0.1"],
            "addHeaders": True,
            "headerInfo": [{"name": "X-A", "value": "b"}],
        }
        code, body, _ = await self.call("PUT", "/api/v1/routing", body={"domainConfigs": [entry]})
        self.assertEqual(code, 422)
        [error] = body["error"]["errors"]
        self.assertTrue(
            error.startswith("smtpConfig.domainConfigs[0]: example.com: addHeaders, headerInfo"), error
        )

    async def test_new_routing_applies_to_next_rcpt_and_delivery(self) -> None:
        old, new = start_downstream(), start_downstream()
        self.addCleanup(old.stop)
        self.addCleanup(new.stop)
        options = smtp_options([{"domains": ["example.com"], "targetIPs": ["127.0.0.1"], "port": old.port}])
        await self.start_router(options)
        routing = {
            "domainConfigs": [
                {"domains": ["example.com"], "targetIPs": ["127.0.0.1"], "port": new.port},
                {"domains": ["new.test"], "targetIPs": ["127.0.0.1"], "port": new.port},
            ]
        }
        code, body, _ = await self.call("PUT", "/api/v1/routing", body=routing)
        self.assertEqual(code, 200, body)
        self.assertEqual(
            (body["persisted"], body["routing"]["domainConfigs"]), (False, routing["domainConfigs"])
        )
        self.assertEqual(await send(self.smtp_port(), "bob@new.test"), {})
        self.assertEqual(await send(self.smtp_port(), "carol@example.com"), {})
        messages = await new.wait_for_messages(2).addTimeout(10, reactor)
        self.assertEqual(sorted(m.recipients[0] for m in messages), ["bob@new.test", "carol@example.com"])
        self.assertEqual(old.messages, [])
        # Dropping a domain: its recipients are relay from then on.
        code, _, _ = await self.call(
            "PUT", "/api/v1/routing", body={"domainConfigs": routing["domainConfigs"][1:]}
        )
        self.assertEqual(code, 200)
        refused = await send(self.smtp_port(), "dave@example.com")
        self.assertEqual(refused["dave@example.com"][0], 554)

    async def test_persist_rewrites_the_file_keeping_a_backup(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "dcrouter.toml")
        options = smtp_options([{"domains": ["example.com"], "targetIPs": ["127.0.0.1"]}], persist=True)
        smtp, api = options["smtpConfig"], options["apiConfig"]
        text = (
            "# the operator's comment\n[smtpConfig]\n"
            f"ports = {smtp['ports']}  # SMTP\n"
            'bindAddress = "127.0.0.1"\nhostname = "mx.test"\nimplicitTlsPorts = []\nsubmissionPorts = []\n'
            'queueStorage = "memory"\n\n[[smtpConfig.domainConfigs]]\ndomains = ["example.com"]\n'
            'targetIPs = ["127.0.0.1"]\n\n[apiConfig]\nenabled = true\nport = 0\npersist = true\n'
        )
        for token in api["tokens"]:
            text += f'\n[[apiConfig.tokens]]\nname = "{token["name"]}"\ntokenHash = "{token["tokenHash"]}"\n'
            text += f'scope = "{token["scope"]}"\n'
        with open(path, "w") as f:
            f.write(text)
        await self.start_router(load_file(path))
        routing = {
            "domainConfigs": [
                {"domains": ["new.test"], "targetIPs": ["127.0.0.2"], "port": 2525, "maxRetries": 3}
            ],
            "routingRules": [
                {"name": "billing", "recipients": ["billing@*.test"], "targetIPs": ["127.0.0.3"]}
            ],
            "defaultServer": "relay.test",
        }
        code, body, _ = await self.call("PUT", "/api/v1/routing", body=routing)
        self.assertEqual(code, 200, body)
        self.assertTrue(body["persisted"], body)
        with open(path + ".bak") as f:
            self.assertEqual(f.read(), text)
        with open(path) as f:
            written = f.read()
        self.assertIn("# the operator's comment", written)
        self.assertIn("# SMTP", written)
        reread = load_file(path)
        assert reread.options.smtp_config is not None
        self.assertEqual(reread.options.smtp_config.default_server, "relay.test")
        self.assertEqual(
            {k: tomllib.loads(written)["smtpConfig"][k] for k in routing}, json.loads(json.dumps(routing))
        )
        code, body, _ = await self.call("GET", "/api/v1/routing")
        self.assertEqual(body, routing)


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
        self.assertEqual(
            [(i["id"], i["reason"]) for i in body["items"]], [("QA", "virus found"), ("QB", "spam")]
        )
        code, body, _ = await self.call("GET", "/api/v1/quarantine/QA", token=READER)
        self.assertEqual(code, 200)
        self.assertEqual(
            (body["reason"], body["headers"], body["headersCut"]), ("virus found", ["Subject: x"], False)
        )
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


class RouteTestEndpointTests(RoutingRouterBase):
    async def test_mail(self) -> None:
        options = smtp_options(
            [
                {
                    "domains": ["example.com"],
                    "targetIPs": ["10.0.0.5", "10.0.0.6"],
                    "port": 2525,
                    "useTls": True,
                },
                {
                    "domains": ["*.slow.test"],
                    "targetIPs": ["10.0.0.7"],
                    "maxPerDestination": 2,
                    "maxRetries": 4,
                },
            ]
        )
        smtp = options["smtpConfig"]
        smtp["relayNetworks"] = ["10.9.0.0/16"]
        smtp["routingRules"] = [
            {"name": "billing", "recipients": ["billing@*.test"], "targetIPs": ["10.0.0.9"], "priority": 1}
        ]
        await self.start_router(options, paused=True)
        ask = {"sender": "alice@sender.test", "recipient": "bob@example.com"}
        code, body, _ = await self.call("POST", "/api/v1/routing/test", token=READER, body=ask)
        self.assertEqual(code, 200, body)
        self.assertEqual(
            {k: body[k] for k in ("accepted", "relayRefused", "local", "route", "targets", "port", "tls")},
            {
                "accepted": True,
                "relayRefused": False,
                "local": True,
                "route": "domain:example.com",
                "targets": ["10.0.0.5", "10.0.0.6"],
                "port": 2525,
                "tls": "required",
            },
        )
        self.assertEqual(
            body["matched"],
            {"by": "domainConfigs", "key": "smtpConfig.domainConfigs[0]", "name": "example.com"},
        )
        self.assertEqual(body["retry"]["maxRetries"], 40)
        self.assertTrue(body["paused"])

        code, body, _ = await self.call("POST", "/api/v1/routing/test", body={"recipient": "x@a.slow.test"})
        self.assertEqual(
            (body["route"], body["maxPerDestination"], body["retry"]["maxRetries"]),
            ("domain:*.slow.test", 2, 4),
        )
        self.assertEqual(body["matched"]["key"], "smtpConfig.domainConfigs[1]")

        code, body, _ = await self.call("POST", "/api/v1/routing/test", body={"recipient": "billing@a.test"})
        self.assertEqual(
            body["matched"], {"by": "routingRules", "key": "smtpConfig.routingRules[0]", "name": "billing"}
        )
        self.assertEqual(
            (body["relayRefused"], body["reply"]), (True, "554 5.7.1 <billing@a.test>: Relay access denied")
        )

        # Relay: refused from anywhere, allowed when authenticated or from relayNetworks; routed by MX.
        outside = {"recipient": "carol@elsewhere.test"}
        code, body, _ = await self.call("POST", "/api/v1/routing/test", body=outside)
        self.assertEqual(
            (body["relayRefused"], body["route"], body["mxDomain"]),
            (True, "mx:elsewhere.test", "elsewhere.test"),
        )
        self.assertEqual(body["matched"]["by"], "mx")
        code, body, _ = await self.call(
            "POST", "/api/v1/routing/test", body={**outside, "authenticated": True}
        )
        self.assertFalse(body["relayRefused"])
        code, body, _ = await self.call(
            "POST", "/api/v1/routing/test", body={**outside, "clientIp": "10.9.1.2"}
        )
        self.assertFalse(body["relayRefused"])
        # A suppressed recipient: refused, and said why.
        code, _, _ = await self.call("POST", "/api/v1/suppression", body={"address": "bob@example.com"})
        code, body, _ = await self.call("POST", "/api/v1/routing/test", body=ask)
        self.assertEqual((body["accepted"], body["relayRefused"]), (False, False))
        self.assertEqual(body["suppressed"]["address"], "bob@example.com")
        self.assertTrue(body["reply"].startswith("550 5.1.1"))
        # Nothing was sent or queued.
        assert self.router.queue is not None
        self.assertEqual(sum((await self.router.queue.count_by_status()).values()), 0)

    async def test_bad_input(self) -> None:
        await self.start_router(smtp_options([{"domains": ["example.com"], "targetIPs": ["10.0.0.5"]}]))
        for body, text in [
            ({}, "give either"),
            ({"recipient": "a@b.test", "sni": "x.test"}, "give either"),
            ({"recipient": "not an address"}, "recipient:"),
            ({"recipient": "a@b.test", "clientIp": "nope"}, "clientIp:"),
            ({"recipient": "a@b.test", "sender": "<<"}, "sender:"),
        ]:
            code, answer, _ = await self.call("POST", "/api/v1/routing/test", body=body)
            self.assertEqual((code, answer["error"]["code"]), (400, "bad_field"), body)
            self.assertIn(text, answer["error"]["message"])
        code, answer, _ = await self.call("POST", "/api/v1/routing/test", body={"sni": "a.test", "port": 443})
        self.assertEqual((code, answer["error"]["code"]), (404, "not_running"))
        code, answer, _ = await self.call("POST", "/api/v1/routing/test", body={"recipient": 5})
        self.assertEqual(code, 400)
        code, answer, _ = await self.call(
            "POST", "/api/v1/routing/test", token=None, body={"recipient": "a@b.test"}
        )
        self.assertEqual(code, 401)

    async def test_proxy(self) -> None:
        options = smtp_options([{"domains": ["example.com"], "targetIPs": ["10.0.0.5"]}])
        (proxy_port,) = free_ports(1)
        options["smartProxyConfig"] = {
            "bindAddress": "127.0.0.1",
            "routes": [
                {
                    "name": "web",
                    "match": {"ports": [proxy_port], "domains": ["www.example.com"]},
                    "action": {"type": "forward", "target": {"host": ["10.1.0.1", "10.1.0.2"], "port": 8443}},
                    "security": {"ipBlockList": ["10.66.0.0/16"]},
                },
                {
                    "name": "rest",
                    "match": {"ports": [proxy_port]},
                    "action": {"type": "forward", "target": {"host": "10.1.0.3", "port": 9000}},
                },
            ],
        }
        await self.start_router(options, paused=True)
        code, body, _ = await self.call(
            "POST", "/api/v1/routing/test", body={"sni": "WWW.example.com", "port": proxy_port}
        )
        self.assertEqual(code, 200, body)
        self.assertEqual(
            body["matched"], {"name": "web", "key": "smartProxyConfig.routes[0]", "index": 0, "priority": 0}
        )
        self.assertEqual(
            (body["action"], body["target"]), ("forward", {"hosts": ["10.1.0.1", "10.1.0.2"], "port": 8443})
        )
        code, body, _ = await self.call(
            "POST", "/api/v1/routing/test", body={"host": "other.test", "port": proxy_port}
        )
        self.assertEqual((body["matched"]["name"], body["target"]["port"]), ("rest", 9000))
        code, body, _ = await self.call(
            "POST",
            "/api/v1/routing/test",
            body={"sni": "www.example.com", "port": proxy_port, "clientIp": "10.66.1.1"},
        )
        self.assertEqual((body["matched"]["name"], body["action"]), ("web", "close"))
        code, body, _ = await self.call(
            "POST", "/api/v1/routing/test", body={"sni": "www.example.com", "port": 1}
        )
        self.assertEqual((body["matched"], body["action"]), (None, "close"))
        code, body, _ = await self.call("POST", "/api/v1/routing/test", body={"sni": "www.example.com"})
        self.assertEqual(code, 400)

    async def test_cli(self) -> None:
        options = smtp_options([{"domains": ["example.com"], "targetIPs": ["10.0.0.5"], "port": 2525}])
        await self.start_router(options, paused=True)

        async def cli(*argv: str) -> tuple[int, str, str]:
            args = parse_args(["route-test", "--url", self.base, *argv])
            out, err = io.StringIO(), io.StringIO()
            status = await deferToThread(run, args, out, err, {"DCROUTER_TOKEN": READER})
            return status, out.getvalue(), err.getvalue()

        status, out, _ = await cli("--sender", "a@sender.test", "--recipient", "b@example.com")
        self.assertEqual(status, 0)
        self.assertIn("at RCPT:    accepted", out)
        self.assertIn("route:      domain:example.com -> 10.0.0.5 port 2525, TLS opportunistic", out)
        self.assertIn("(smtpConfig.domainConfigs[0])", out)
        status, out, _ = await cli("--recipient", "b@elsewhere.test", "--client-ip", "192.0.2.9")
        self.assertIn("refused: 554 5.7.1", out)
        status, out, _ = await cli("--recipient", "b@elsewhere.test", "--authenticated", "--json")
        self.assertEqual((status, json.loads(out)["relayRefused"]), (0, False))
        status, _, err = await cli("--sni", "a.test")
        self.assertEqual(status, 2)
        self.assertIn("--port", err)
        status, _, err = await cli("--sni", "a.test", "--port", "443")
        self.assertEqual(status, 1)
        self.assertIn("not_running", err)


class SuppressionTests(RoutingRouterBase):
    async def test_hard_bounce_suppresses_then_refused_at_rcpt(self) -> None:
        downstream = start_downstream(Script(rcpt={"gone@example.com": "550 5.1.1 No such user"}))
        self.addCleanup(downstream.stop)
        options = smtp_options(
            [
                {"domains": ["example.com"], "targetIPs": ["127.0.0.1"], "port": downstream.port},
                {"domains": ["sender.test"], "targetIPs": ["127.0.0.1"], "port": downstream.port},
            ]
        )
        await self.start_router(options)
        # The first message to the address goes out and hard-bounces (the bounce goes to sender.test).
        self.assertEqual(await send(self.smtp_port(), "gone@example.com", "alice@sender.test"), {})
        await downstream.wait_for_messages(1).addTimeout(10, reactor)  # the bounce to alice
        code, body, _ = await self.call("GET", "/api/v1/suppression/gone@example.com", token=READER)
        self.assertEqual((code, body["reason"]), (200, "550 5.1.1 No such user"))
        # Over a real SMTP session, RCPT is refused and counted; other recipients are not.
        refused = await send(self.smtp_port(), "gone@example.com", "alice@sender.test")
        self.assertEqual(refused["gone@example.com"][0], 550)
        self.assertIn(b"5.1.1", refused["gone@example.com"][1])
        self.assertEqual(await send(self.smtp_port(), "here@example.com", "alice@sender.test"), {})
        code, body, _ = await self.call("GET", "/api/v1/suppression", token=READER)
        self.assertEqual([i["address"] for i in body["items"]], ["gone@example.com"])
        self.assertEqual((body["refusedSinceStart"], body["ttl"]), (1, 604_800_000))
        # Taken off the list: accepted again.
        code, body, _ = await self.call("DELETE", "/api/v1/suppression/gone%40example.com")
        self.assertEqual((code, body), (200, {"removed": "gone@example.com"}))
        code, _, _ = await self.call("DELETE", "/api/v1/suppression/gone@example.com")
        self.assertEqual(code, 404)
        self.router.delivery.pause_deliveries()  # type: ignore[union-attr]
        self.assertEqual(await send(self.smtp_port(), "gone@example.com", "alice@sender.test"), {})

    async def test_endpoints(self) -> None:
        await self.start_router(
            smtp_options([{"domains": ["example.com"], "targetIPs": ["127.0.0.1"]}]), paused=True
        )
        code, body, _ = await self.call(
            "POST", "/api/v1/suppression", body={"address": "Spam@Example.com", "ttl": 60_000}
        )
        self.assertEqual(
            (code, body["address"], body["reason"]), (200, "spam@example.com", "added by API token ops")
        )
        refused = await send(self.smtp_port(), "spam@example.com", "alice@sender.test")
        self.assertEqual(refused["spam@example.com"][0], 550)
        code, body, _ = await self.call(
            "POST", "/api/v1/suppression", token=READER, body={"address": "a@b.test"}
        )
        self.assertEqual(code, 403)
        code, body, _ = await self.call("POST", "/api/v1/suppression", body={"address": "nobody"})
        self.assertEqual((code, body["error"]["code"]), (400, "bad_field"))
        code, body, _ = await self.call("POST", "/api/v1/suppression", body={"address": "a@b.test", "ttl": 0})
        self.assertEqual(code, 400)
        code, body, _ = await self.call("GET", "/api/v1/suppression/nobody")
        self.assertEqual((code, body["error"]["code"]), (400, "bad_address"))
        code, body, _ = await self.call("GET", "/api/v1/suppression/a@b.test")
        self.assertEqual(code, 404)
        code, body, _ = await self.call("GET", "/api/v1/suppression?limit=0")
        self.assertEqual(code, 400)

    async def test_off(self) -> None:
        options = smtp_options([{"domains": ["example.com"], "targetIPs": ["127.0.0.1"]}])
        options["smtpConfig"]["delivery"] = {"suppressionTtl": 0}
        await self.start_router(options, paused=True)
        code, body, _ = await self.call("GET", "/api/v1/suppression")
        self.assertEqual((code, body["error"]["code"]), (404, "suppression_off"))

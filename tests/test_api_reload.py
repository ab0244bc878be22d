"""``POST /api/v1/reload`` and ``dcrouter reload`` on a real listening API over a router whose configuration
came from a file: what changed, a 422 with every error and its key path, admin scope."""

from __future__ import annotations

import io
import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from dcrouter import cli
from dcrouter.tap import make_reloader
from tests.test_api import ADMIN, READER, ApiTestBase


class ReloadEndpointTests(ApiTestBase):
    async def start_from_file(self) -> dict[str, Any]:
        router = await self.start()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.path = os.path.join(directory, "router.json")
        # The file says what the running router was built from, then each test edits it.
        smtp = router.options.smtp_config
        assert smtp is not None and router.api is not None
        config: dict[str, Any] = {
            "smtpConfig": {
                "ports": list(smtp.ports),
                "bindAddress": "127.0.0.1",
                "hostname": "mx.test",
                "implicitTlsPorts": [],
                "submissionPorts": [],
                "queueStorage": "memory",
                "domainConfigs": [{"domains": ["example.com"], "targetIPs": ["127.0.0.1"], "port": 9}],
            },
            "apiConfig": {
                "enabled": True,
                "port": 0,
                "tokens": [dict(t) for t in self.tokens()],
            },
        }
        router.options = __import__("dcrouter.config", fromlist=["load_options"]).load_options(config).options
        router.reloader = make_reloader(router, self.path, reactor)
        return config

    def tokens(self) -> list[dict[str, str]]:
        from tests.test_api import sha

        return [
            {"name": "ops", "tokenHash": sha(ADMIN), "scope": "admin"},
            {"name": "viewer", "tokenHash": sha(READER), "scope": "read"},
        ]

    def write(self, config: dict[str, Any]) -> None:
        with open(self.path, "w") as handle:
            json.dump(config, handle)

    async def test_applied_with_what_changed(self) -> None:
        config = await self.start_from_file()
        config["smtpConfig"]["domainConfigs"].append(
            {"domains": ["other.test"], "targetIPs": ["127.0.0.2"], "port": 9}
        )
        self.write(config)
        code, body, _ = await self.call("POST", "/api/v1/reload", body={})
        self.assertEqual(code, 200, body)
        self.assertEqual(body["changes"], ["smtpConfig.domainConfigs"])
        assert self.router.routes is not None
        self.assertEqual(self.router.routes.route("a@b.test", "x@other.test").name, "domain:other.test")

    async def test_invalid_file_is_422_with_key_paths(self) -> None:
        config = await self.start_from_file()
        config["smtpConfig"]["maxRetries"] = "many"
        config["smtpConfig"]["queueStorage"] = "disk"
        self.write(config)
        code, body, _ = await self.call("POST", "/api/v1/reload", body={})
        self.assertEqual(code, 422)
        self.assertEqual(body["error"]["code"], "invalid_config")
        self.assertTrue(body["error"]["errors"])
        self.assertTrue(body["error"]["errors"][0].startswith("smtpConfig.maxRetries"), body)

    async def test_restart_only_is_422(self) -> None:
        config = await self.start_from_file()
        config["smtpConfig"]["queueStorage"] = "disk"
        config["smtpConfig"]["persistentPath"] = os.path.abspath(self.mktemp())
        self.write(config)
        code, body, _ = await self.call("POST", "/api/v1/reload", body={})
        self.assertEqual(code, 422)
        self.assertIn("needs a restart", body["error"]["message"])

    async def test_needs_admin(self) -> None:
        config = await self.start_from_file()
        self.write(config)
        code, _, _ = await self.call("POST", "/api/v1/reload", token=READER, body={})
        self.assertEqual(code, 403)

    async def test_without_a_file(self) -> None:
        await self.start()
        code, body, _ = await self.call("POST", "/api/v1/reload", body={})
        self.assertEqual((code, body["error"]["code"]), (404, "no_config_file"))

    async def test_cli(self) -> None:
        config = await self.start_from_file()
        config["smtpConfig"]["maxRetries"] = 3
        self.write(config)
        out, err = io.StringIO(), io.StringIO()
        environ = {"DCROUTER_API": self.base, "DCROUTER_TOKEN": ADMIN}

        def run() -> int:
            parser = cli._parser()
            args = parser.parse_args(["reload"])
            from dcrouter import ctl

            return ctl.run(args, out, err, environ)

        status = await deferToThread(run)
        self.assertEqual(status, 0, err.getvalue())
        self.assertIn("smtpConfig.maxRetries", out.getvalue())

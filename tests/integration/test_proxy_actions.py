"""The proxy's own answers and hand-overs on real sockets: SMTP reached through a proxy route whose
``socket-handler`` is ``smtp`` (a real ``smtplib`` client, STARTTLS included, mail queued), and static files
from a directory fetched with ``curl`` (traversal attempts sent as they are, ``--path-as-is``).
"""

from __future__ import annotations

import os
import shutil
import smtplib
import ssl
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from dcrouter import DcRouter
from dcrouter.net.certfiles import generate_self_signed
from tests.integration import free_ports
from tests.integration.test_proxy import until

LOCAL = "127.0.0.1"


class SmtpThroughTheProxyTests(TestCase):
    timeout = 60

    def setUp(self) -> Deferred[None]:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert_pem, key_pem = generate_self_signed("mx.test")
        cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        for path, data in ((cert_path, cert_pem), (key_path, key_pem)):
            with open(path, "wb") as handle:
                handle.write(data)
        smtp_port, self.proxy_port = free_ports(2)
        options = {
            "smtpConfig": {
                "ports": [smtp_port],
                "bindAddress": LOCAL,
                "hostname": "mx.test",
                "queueStorage": "memory",
                "tls": {"certPath": cert_path, "keyPath": key_path},
                "domainConfigs": [{"domains": ["example.test"], "targetIPs": [LOCAL], "port": 2626}],
            },
            "smartProxyConfig": {
                "bindAddress": LOCAL,
                "routes": [
                    {
                        "name": "mail",
                        "match": {"ports": self.proxy_port},
                        "action": {"type": "socket-handler", "socketHandler": "smtp"},
                        "security": {"maxConnections": 5},
                    }
                ],
            },
        }
        self.router = DcRouter(options, reactor=reactor)
        assert self.router.delivery is not None
        self.router.delivery.pause_deliveries()
        self.router.privilegedStartService()
        self.router.startService()
        self.addCleanup(self.router.stopService)
        return self.router.when_ready()

    def test_a_message_sent_through_the_proxy_route_is_queued(self) -> Deferred[None]:
        def client() -> tuple[Any, ...]:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            with smtplib.SMTP(LOCAL, self.proxy_port, timeout=10) as session:
                greeting = session.ehlo("client.test")
                session.starttls(context=context)
                session.ehlo("client.test")
                session.mail("sender@client.test")
                session.rcpt("someone@example.test")
                code, reply = session.data(b"Subject: hi\r\n\r\nthrough the proxy\r\n")
                return greeting, code, reply

        async def go() -> None:
            greeting, code, reply = await deferToThread(client)
            self.assertEqual(greeting[0], 250)
            self.assertIn(b"STARTTLS", greeting[1])
            self.assertEqual(code, 250)
            self.assertIn(b"queued as", reply)
            self.assertEqual(self.router.proxy.counters["mail"].connections, 1)  # type: ignore[union-attr]

        return Deferred.fromCoroutine(go())


class StaticFilesWithCurlTests(TestCase):
    timeout = 60

    def setUp(self) -> Deferred[None]:
        if shutil.which("curl") is None:
            raise SkipTest("curl is not installed")
        base = os.path.abspath(self.mktemp())
        root = os.path.join(base, "site")
        os.makedirs(root)
        with open(os.path.join(root, "index.html"), "wb") as handle:
            handle.write(b"<p>static</p>")
        with open(os.path.join(base, "secret.txt"), "wb") as handle:
            handle.write(b"secret")
        os.symlink(os.path.join(base, "secret.txt"), os.path.join(root, "link.txt"))
        self.big = os.urandom(3_000_000)
        with open(os.path.join(root, "big.bin"), "wb") as handle:
            handle.write(self.big)
        cert_pem, key_pem = generate_self_signed("files.test")
        files = {"certPath": os.path.join(base, "c.pem"), "keyPath": os.path.join(base, "k.pem")}
        for path, data in zip(files.values(), (cert_pem, key_pem), strict=True):
            with open(path, "wb") as handle:
                handle.write(data)
        self.port, self.https = free_ports(2)
        options = {
            "smartProxyConfig": {
                "bindAddress": LOCAL,
                "routes": [
                    {
                        "name": "site",
                        "match": {"ports": self.port},
                        "action": {"type": "static", "static": {"root": root}},
                    },
                    {
                        "name": "site-tls",
                        "match": {"ports": self.https, "domains": "files.test"},
                        "action": {
                            "type": "static",
                            "static": {"root": root},
                            "tls": {"mode": "terminate", "certificate": files},
                        },
                    },
                ],
            }
        }
        self.router = DcRouter(options, reactor=reactor)
        self.router.privilegedStartService()
        self.router.startService()
        self.addCleanup(self.router.stopService)
        return self.router.when_ready()

    async def curl(self, path: str) -> tuple[str, bytes]:
        url = f"http://{LOCAL}:{self.port}{path}"
        out, err, code = await getProcessOutputAndValue(
            "curl", ["-sS", "--path-as-is", "-o", "-", "-w", "\n%{http_code}", url], env=os.environ
        )
        self.assertEqual(code, 0, err)
        body, _, status = out.rpartition(b"\n")
        return status.decode(), body

    async def test_a_large_file_over_tls_and_plain(self) -> None:
        for args in (
            [f"http://{LOCAL}:{self.port}/big.bin"],
            [
                "-k",
                "--resolve",
                f"files.test:{self.https}:{LOCAL}",
                f"https://files.test:{self.https}/big.bin",
            ],
        ):
            out, err, code = await getProcessOutputAndValue("curl", ["-sS", *args], env=os.environ)
            self.assertEqual(code, 0, err)
            self.assertEqual(len(out), len(self.big), args)
            self.assertTrue(out == self.big, args)

    async def test_files_and_traversal(self) -> None:
        self.assertEqual(await self.curl("/"), ("200", b"<p>static</p>"))
        for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/..%2fsecret.txt"):
            status, body = await self.curl(path)
            self.assertEqual(status, "400", path)
            self.assertNotIn(b"secret", body)
        self.assertEqual((await self.curl("/link.txt"))[0], "404")


class TerminatedRoutesByRequestTests(TestCase):
    """Terminating routes on one port told apart by path, header and TLS version; curl over real TLS."""

    timeout = 60

    def setUp(self) -> Deferred[None]:
        if shutil.which("curl") is None:
            raise SkipTest("curl is not installed")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert_pem, key_pem = generate_self_signed("site.test")
        files = {"certPath": os.path.join(directory, "c.pem"), "keyPath": os.path.join(directory, "k.pem")}
        for path, data in zip(files.values(), (cert_pem, key_pem), strict=True):
            with open(path, "wb") as handle:
                handle.write(data)
        (self.port,) = free_ports(1)
        tls = {"mode": "terminate", "certificate": files}

        def static(name: str, match: dict[str, Any]) -> dict[str, Any]:
            return {
                "name": name,
                "match": {"ports": self.port, "domains": "site.test", **match},
                "action": {"type": "static", "static": {"content": name}, "tls": tls},
            }

        options = {
            "smartProxyConfig": {
                "bindAddress": LOCAL,
                "routes": [
                    static("default", {}),
                    static("api", {"path": "/api"}),
                    static("images", {"path": "/img/*.png"}),
                    static("beta", {"path": "/api", "headers": {"X-Beta": "/^y/"}}),
                    static("old-tls", {"tlsVersion": ["TLSv1.2"], "path": "/"}),
                ],
            }
        }
        self.router = DcRouter(options, reactor=reactor)
        self.router.privilegedStartService()
        self.router.startService()
        self.addCleanup(self.router.stopService)
        return self.router.when_ready()

    async def curl(self, path: str, *args: str) -> bytes:
        out, err, code = await getProcessOutputAndValue(
            "curl",
            [
                "-sSk",
                "--resolve",
                f"site.test:{self.port}:{LOCAL}",
                *args,
                f"https://site.test:{self.port}{path}",
            ],
            env=os.environ,
        )
        self.assertEqual(code, 0, err)
        return out

    async def test_routes_by_path_header_and_tls_version(self) -> None:
        self.assertEqual(await self.curl("/"), b"default")
        self.assertEqual(await self.curl("/api/items?x=1"), b"api")
        self.assertEqual(await self.curl("/apix"), b"default")
        self.assertEqual(await self.curl("/img/a.png"), b"images")
        self.assertEqual(await self.curl("/api/items", "-H", "X-Beta: yes"), b"beta")
        self.assertEqual(await self.curl("/api/items", "-H", "X-Beta: no"), b"api")
        self.assertEqual(await self.curl("/", "--tls-max", "1.2"), b"old-tls")
        counters = self.router.proxy.counters  # type: ignore[union-attr]
        self.assertEqual(counters["beta"].connections, 1)
        # Every connection gives its route slot back (the last close may still be on its way).
        await until(lambda: sum(c.active for c in counters.values()) == 0, "the connections to close")

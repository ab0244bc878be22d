"""``dcrouter queue|delivery|stats`` without a router: where the client connects, where its token comes from,
and how it prints (the end-to-end test runs it against a real router)."""

from __future__ import annotations

import io

from twisted.trial.unittest import SynchronousTestCase

from dcrouter.cli import parse_args
from dcrouter.ctl import CtlError, print_destinations, print_queue, resolve, run


class ResolveTests(SynchronousTestCase):
    def config(self, text: str) -> str:
        path = self.mktemp() + ".toml"
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_url_precedence(self) -> None:
        path = self.config('[apiConfig]\nbindAddress = "::1"\nport = 9025\n')
        env = {"DCROUTER_TOKEN": "t"}
        self.assertEqual(resolve(parse_args(["stats"]), env).url, "http://127.0.0.1:8025")
        self.assertEqual(resolve(parse_args(["stats", "--config", path]), env).url, "http://[::1]:9025")
        env["DCROUTER_API"] = "http://127.0.0.2:1/"
        self.assertEqual(resolve(parse_args(["stats", "--config", path]), env).url, "http://127.0.0.2:1")
        args = parse_args(["stats", "--url", "http://localhost:7"])
        self.assertEqual(resolve(args, env).url, "http://localhost:7")
        with self.assertRaises(CtlError) as caught:
            resolve(parse_args(["stats", "--url", "ftp://x"]), env)
        self.assertEqual(caught.exception.status, 2)

    def test_token_from_env_or_file(self) -> None:
        token_file = self.mktemp()
        with open(token_file, "w") as f:
            f.write("from-file\n")
        args = parse_args(["queue", "list", "--token-file", token_file])
        self.assertEqual(resolve(args, {}).token, "from-file")
        self.assertEqual(resolve(args, {"DCROUTER_TOKEN": "from-env"}).token, "from-env")
        with self.assertRaises(CtlError):
            resolve(parse_args(["queue", "list"]), {})

    def test_bad_config_is_a_usage_error(self) -> None:
        path = self.config("[apiConfig]\nport = -1\n")
        out, err = io.StringIO(), io.StringIO()
        status = run(parse_args(["stats", "--config", path]), out, err, {"DCROUTER_TOKEN": "t"})
        self.assertEqual(status, 2)
        self.assertIn("apiConfig.port", err.getvalue())

    def test_unreachable(self) -> None:
        err = io.StringIO()
        args = parse_args(["stats", "--url", "http://127.0.0.1:9"])
        self.assertEqual(run(args, io.StringIO(), err, {"DCROUTER_TOKEN": "t"}), 1)
        self.assertIn("cannot reach the management API at http://127.0.0.1:9", err.getvalue())

    def test_delivery_status_prints_each_destination(self) -> None:
        out = io.StringIO()
        result = {
            "inFlightByDestination": {"mx:example.org": 2},
            "lastErrors": {
                "domain:example.test": {"reply": "421 4.4.2 timeout", "at": "2026-12-07T17:55:00Z"}
            },
            "queuedByDestination": {
                "domain:example.test": {"queued": 3, "deferred": 40},
                "mx:example.org": {"queued": 12, "deferred": 0},
            },
            "queuedOther": {"destinations": 7, "queued": 1, "deferred": 2},
            "queuedComplete": False,
        }
        print_destinations(result, out)
        lines = out.getvalue().splitlines()
        self.assertEqual(lines[0].split(), ["DESTINATION", "QUEUED", "DEFERRED", "FLIGHT", "LAST", "ERROR"])
        self.assertEqual(lines[1].split(), ["domain:example.test", "3", "40", "0", "421", "4.4.2", "timeout"])
        self.assertEqual(lines[2].split(), ["mx:example.org", "12", "0", "2"])
        self.assertEqual(lines[3].split(), ["(7", "other", "destinations)", "1", "2"])
        self.assertIn("lower bounds", lines[4])

    def test_mailq_layout(self) -> None:
        out = io.StringIO()
        item = {
            "id": "A1",
            "status": "held",
            "size": 12,
            "createdAt": "2026-12-07T17:51:00Z",
            "sender": "",
            "recipients": ["b@example.test"],
            "lastError": "451 4.4.1\r\n refused",
        }
        print_queue([item], out)
        lines = out.getvalue().splitlines()
        self.assertTrue(lines[0].startswith("-Queue ID-"))
        self.assertEqual(lines[1].split(), ["A1!", "12", "2026-12-07T17:51:00Z", "held", "<>"])
        self.assertEqual(lines[2].strip(), "(451 4.4.1 refused)")
        self.assertEqual(lines[3].strip(), "b@example.test")

    def test_parser_knows_every_action(self) -> None:
        for argv in (
            ["queue", "show", "X"],
            ["queue", "retry", "X"],
            ["queue", "hold", "X"],
            ["queue", "release", "X"],
            ["queue", "delete", "X"],
            ["queue", "bounce", "X", "--reason", "r"],
            ["delivery", "pause"],
            ["delivery", "resume", "domain:example.com"],
            ["delivery", "status"],
            ["stats", "--json"],
        ):
            self.assertTrue(callable(parse_args(argv).run), argv)

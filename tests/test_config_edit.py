"""dcrouter.config.edit: the routing part of a configuration, replaced in memory and written back to its file
(TOML keeping comments, JSON), atomically with a .bak; and what a routing change may not alter."""

from __future__ import annotations

import json
import os
import tomllib

from twisted.trial.unittest import SynchronousTestCase

from dcrouter.config import load_options
from dcrouter.config.edit import hidden_passwords, routing_of, unapplied_changes, with_routing, write_routing

RAW = {
    "logLevel": "info",
    "smtpConfig": {
        "hostname": "mx.test",
        "domainConfigs": [{"domains": ["a.test"], "targetIPs": ["10.0.0.1"], "signDkim": False}],
        "defaultServer": "relay.test",
    },
}
NEW = {
    "domainConfigs": [{"domains": ["b.test"], "targetIPs": ["10.0.0.2"], "baseRetryDelay": 60000}],
    "routingRules": [{"name": "r", "recipients": ["x@c.test"], "targetIPs": ["10.0.0.3"]}],
}


class EditTests(SynchronousTestCase):
    def test_routing_of_and_with_routing(self) -> None:
        self.assertEqual(
            routing_of(RAW),
            {
                "domainConfigs": RAW["smtpConfig"]["domainConfigs"],
                "routingRules": [],
                "defaultServer": "relay.test",
            },
        )
        new = with_routing(RAW, NEW)
        self.assertEqual(new["logLevel"], "info")
        self.assertEqual(new["smtpConfig"]["hostname"], "mx.test")
        self.assertNotIn("defaultServer", new["smtpConfig"])  # left out: removed
        self.assertEqual(routing_of(new), {**NEW, "defaultServer": None})
        self.assertEqual(RAW["smtpConfig"]["defaultServer"], "relay.test")  # the original is untouched

    def test_hidden_passwords(self) -> None:
        entry = {
            "domains": ["a.test"],
            "targetIPs": ["x"],
            "authentication": {"user": "u", "pass": "<hidden>"},
        }
        self.assertEqual(
            [e.split(":")[0] for e in hidden_passwords({"routingRules": [{}], "domainConfigs": [entry]})],
            ["smtpConfig.domainConfigs[0].authentication.pass"],
        )
        shown = routing_of(
            {"smtpConfig": {"domainConfigs": [dict(entry, authentication={"pass": "s"})]}},
            show_passwords=False,
        )
        self.assertEqual(shown["domainConfigs"][0]["authentication"]["pass"], "<hidden>")

    def test_unapplied_changes(self) -> None:
        old = load_options(RAW).options.smtp_config
        moved = load_options(with_routing(RAW, NEW)).options.smtp_config
        self.assertEqual(unapplied_changes(old, moved), [])  # a domain gone and one new, both with defaults
        signed = dict(NEW, domainConfigs=[dict(NEW["domainConfigs"][0], allowedIPs=["10.0.0.0/8"])])
        changed = load_options(with_routing(RAW, signed)).options.smtp_config
        [error] = unapplied_changes(old, changed)
        self.assertTrue(error.startswith("smtpConfig.domainConfigs[0]: b.test: allowedIPs changed"), error)

    def test_write_json(self) -> None:
        path = os.path.join(self.mktemp() + ".d", "dcrouter.json")
        os.makedirs(os.path.dirname(path))
        with open(path, "w") as f:
            json.dump(RAW, f)
        os.chmod(path, 0o640)
        write_routing(path, NEW)
        with open(path) as f:
            written = json.load(f)
        self.assertEqual(written, with_routing(RAW, NEW))
        with open(path + ".bak") as f:
            self.assertEqual(json.load(f), RAW)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o640)
        self.assertEqual(sorted(os.listdir(os.path.dirname(path))), ["dcrouter.json", "dcrouter.json.bak"])

    def test_write_toml_without_smtp_table(self) -> None:
        path = self.mktemp() + ".toml"
        with open(path, "w") as f:
            f.write('# mine\nlogLevel = "info"\n')
        write_routing(path, NEW)
        with open(path) as f:
            text = f.read()
        self.assertTrue(text.startswith("# mine\n"))
        self.assertEqual(tomllib.loads(text)["smtpConfig"], NEW)

    def test_unreadable_file_raises(self) -> None:
        with self.assertRaises(OSError):
            write_routing(os.path.join(self.mktemp(), "missing.toml"), NEW)

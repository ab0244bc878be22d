"""Configuration checks of recipient verification: domainConfigs[].verifyRecipients and its keys, and the
smtpConfig.callout block."""

from __future__ import annotations

import os
from typing import Any

from twisted.trial import unittest

from dcrouter.config import ConfigError, load_options

ENTRY = "smtpConfig.domainConfigs[0]"


def smtp(callout: dict[str, Any] | None = None, **entry: Any) -> dict[str, Any]:
    domain: dict[str, Any] = {"domains": ["example.com", "*.example.org"], "targetIPs": ["10.0.0.10"]}
    domain.update(entry)
    raw: dict[str, Any] = {"ports": [2525], "hostname": "mx.example.com", "domainConfigs": [domain]}
    if callout is not None:
        raw["callout"] = callout
    return {"smtpConfig": raw}


class Case(unittest.TestCase):
    def errors(self, raw: dict[str, Any]) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            load_options(raw)
        return caught.exception.errors

    def recipients_file(self, text: str) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return path


class ModeTests(Case):
    def test_defaults(self) -> None:
        options = load_options(smtp()).options.smtp_config
        assert options is not None
        entry = options.domain_configs[0]
        self.assertEqual(
            (entry.verify_recipients, entry.recipients, entry.recipients_file, entry.callout_sender),
            ("off", [], None, ""),
        )
        self.assertFalse(entry.callout_fail_open)
        callout = options.callout
        self.assertEqual(
            (
                callout.timeout,
                callout.positive_ttl,
                callout.negative_ttl,
                callout.cache_size,
                callout.max_parallel,
            ),
            (30_000, 3_600_000, 600_000, 100_000, 20),
        )

    def test_valid_list(self) -> None:
        path = self.recipients_file("alice@example.com OK\n")
        raw = smtp(verifyRecipients="list", recipients=["bob", "@x.example.org", "sales-*@example.com"])
        raw["smtpConfig"]["domainConfigs"][0]["recipientsFile"] = path
        self.assertEqual(load_options(raw).warnings, [])

    def test_unknown_mode(self) -> None:
        self.assertEqual(
            self.errors(smtp(verifyRecipients="ldap")),
            [f'{ENTRY}.verifyRecipients: expected one of "off", "list", "callout", got a string \'ldap\''],
        )

    def test_list_needs_recipients(self) -> None:
        self.assertEqual(
            self.errors(smtp(verifyRecipients="list")),
            [f"{ENTRY}.recipients: required by verifyRecipients 'list' (or recipientsFile)"],
        )

    def test_recipients_without_list_mode(self) -> None:
        """A list that is not used would give a false sense of protection: refused."""
        self.assertEqual(
            self.errors(smtp(recipients=["alice"], recipientsFile="x", verifyRecipients="callout")),
            [
                f"{ENTRY}.recipients: used only with verifyRecipients = 'list', not 'callout'",
                f"{ENTRY}.recipientsFile: used only with verifyRecipients = 'list', not 'callout'",
                f"{ENTRY}.recipientsFile: cannot read 'x': No such file or directory",
            ],
        )

    def test_callout_keys_without_callouts_warn(self) -> None:
        raw = smtp(verifyRecipients="list", recipients=["a"], calloutSender="", calloutFailOpen=True)
        self.assertEqual(
            load_options(raw).warnings,
            [
                f"{ENTRY}.calloutSender: has no effect with verifyRecipients = 'list'",
                f"{ENTRY}.calloutFailOpen: has no effect with verifyRecipients = 'list'",
            ],
        )

    def test_callout_sender(self) -> None:
        load_options(smtp(verifyRecipients="callout", calloutSender="probe@mx.example.com"))
        for bad in ("probe", "a@[192.0.2.1]", "a b@example.com", "<x@example.com>"):
            with self.subTest(bad=bad):
                [error] = self.errors(smtp(verifyRecipients="callout", calloutSender=bad))
                self.assertTrue(error.startswith(f"{ENTRY}.calloutSender: not an address"), error)


class EntryTests(Case):
    def test_bad_inline_entries_named_one_by_one(self) -> None:
        raw = smtp(verifyRecipients="list", recipients=["ok", "x@example.net", "a b", "ok@y.example.org"])
        self.assertEqual(
            self.errors(raw),
            [
                f"{ENTRY}.recipients[1]: 'x@example.net': example.net is not one of this entry's domains",
                (
                    f"{ENTRY}.recipients[2]: 'a b': a local part with spaces must be quoted, as in "
                    "'\"a b\"@example.com'"
                ),
            ],
        )

    def test_bad_file_line_named(self) -> None:
        path = self.recipients_file("# header\nalice@example.com\nbob@example.org\n")
        self.assertEqual(
            self.errors(smtp(verifyRecipients="list", recipientsFile=path)),
            [
                (
                    f"{ENTRY}.recipientsFile: {path}:3: 'bob@example.org': example.org is not one of this "
                    "entry's domains"
                )
            ],
        )

    def test_missing_file(self) -> None:
        path = os.path.abspath(self.mktemp())
        self.assertEqual(
            self.errors(smtp(verifyRecipients="list", recipientsFile=path)),
            [f"{ENTRY}.recipientsFile: cannot read {path!r}: No such file or directory"],
        )


class CalloutBlockTests(Case):
    def test_values_checked(self) -> None:
        errors = self.errors(
            smtp(callout={"timeout": 0, "cacheSize": 0, "maxParallel": 0, "negativeTtl": -1})
        )
        self.assertEqual(
            errors,
            [
                "smtpConfig.callout.timeout: must be a positive number of milliseconds: 0",
                "smtpConfig.callout.negativeTtl: must be at least 0: -1",
                "smtpConfig.callout.cacheSize: must be at least 1: 0",
                "smtpConfig.callout.maxParallel: must be at least 1: 0",
            ],
        )

    def test_zero_ttl_allowed(self) -> None:
        self.assertEqual(load_options(smtp(callout={"positiveTtl": 0, "negativeTtl": 0})).warnings, [])

    def test_callout_timeout_below_the_socket_timeout(self) -> None:
        raw = smtp(callout={"timeout": 60_000}, verifyRecipients="callout")
        raw["smtpConfig"]["socketTimeout"] = 60_000
        expected = (
            "smtpConfig.callout.timeout: 60000 is not less than smtpConfig.socketTimeout (60000): "
            "a session waiting for a callout would time out first"
        )
        self.assertEqual(load_options(raw).warnings, [expected])
        raw["smtpConfig"]["domainConfigs"][0]["verifyRecipients"] = "off"
        self.assertEqual(load_options(raw).warnings, [])

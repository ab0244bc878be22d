"""Tests for the ``dcrouter`` command (dcrouter.cli)."""

from __future__ import annotations

import getpass
import io
import os
import sys

from twisted.trial import unittest

from dcrouter import cli, passwords
from dcrouter.config.reference import render
from dcrouter.passwords import is_password_hash, verify_password


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class CliCase(unittest.TestCase):
    def setUp(self) -> None:
        self.out, self.err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", self.out)
        self.patch(sys, "stderr", self.err)
        self.patch(passwords, "DEFAULT_LOG2_N", 10)

    def typed(self, *answers: str) -> list[str]:
        """Make getpass return ``answers`` in turn; the returned list records the prompts."""
        prompts: list[str] = []
        queue = list(answers)

        def fake(prompt: str = "Password: ") -> str:
            prompts.append(prompt)
            return queue.pop(0)

        self.patch(sys, "stdin", _Terminal())
        self.patch(getpass, "getpass", fake)
        return prompts


class HashPasswordTests(CliCase):
    def test_from_stdin(self) -> None:
        self.patch(sys, "stdin", io.StringIO(" pass word \r\nsecond line\n"))
        self.assertEqual(cli.main(["hash-password"]), 0)
        stored = self.out.getvalue().strip()
        self.assertTrue(is_password_hash(stored))
        self.assertTrue(verify_password(stored, " pass word "))
        self.assertEqual(self.out.getvalue(), stored + "\n")

    def test_from_terminal_asks_twice(self) -> None:
        prompts = self.typed("secret", "secret")
        self.assertEqual(cli.main(["hash-password"]), 0)
        self.assertEqual(len(prompts), 2)
        self.assertTrue(verify_password(self.out.getvalue().strip(), "secret"))

    def test_mismatch(self) -> None:
        self.typed("secret", "secreT")
        self.assertEqual(cli.main(["hash-password"]), 1)
        self.assertEqual(self.out.getvalue(), "")
        self.assertIn("the passwords differ", self.err.getvalue())

    def test_empty(self) -> None:
        self.patch(sys, "stdin", io.StringIO("\n"))
        self.assertEqual(cli.main(["hash-password"]), 1)
        self.assertEqual(self.out.getvalue(), "")
        self.assertIn("empty password", self.err.getvalue())


class CheckTests(CliCase):
    def write(self, text: str) -> str:
        path = self.mktemp() + ".toml"
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_valid(self) -> None:
        path = self.write(
            '[smtpConfig]\nports = [2525]\nhostname = "mx.example.com"\nqueueStorage = "memory"\n'
        )
        self.assertEqual(cli.main(["check", path]), 0)
        output = self.out.getvalue() + self.err.getvalue()
        self.assertIn("smtpConfig.queueStorage: 'memory': queued messages are lost", output)

    def test_invalid(self) -> None:
        path = self.write("[smtpConfig]\nports = [0]\nmaxMesageSize = 1\n")
        self.assertEqual(cli.main(["check", path]), 1)
        output = self.out.getvalue() + self.err.getvalue()
        self.assertIn("smtpConfig.maxMesageSize: unknown key; did you mean 'maxMessageSize'?", output)
        self.assertIn("smtpConfig.ports[0]: not a port number (1-65535): 0", output)

    def test_missing_file(self) -> None:
        self.assertEqual(cli.main(["check", os.path.join(self.mktemp(), "none.toml")]), 1)


class OtherCommandTests(CliCase):
    def test_config_reference(self) -> None:
        self.assertEqual(cli.main(["config-reference"]), 0)
        self.assertEqual(self.out.getvalue(), render())

    def test_help(self) -> None:
        with self.assertRaises(SystemExit) as exited:
            cli.main(["--help"])
        self.assertEqual(exited.exception.code, 0)
        for command in ("hash-password", "check", "config-reference"):
            self.assertIn(command, self.out.getvalue())

    def test_no_command(self) -> None:
        with self.assertRaises(SystemExit) as exited:
            cli.main([])
        self.assertEqual(exited.exception.code, 2)

"""apiConfig: defaults, validation with key paths, and the token hash forms."""

from __future__ import annotations

import hashlib

from twisted.trial import unittest

from dcrouter import passwords
from dcrouter.config import ConfigError, load_options
from dcrouter.config.api import LOOPBACK_HOSTS, is_token_hash

SHA = "sha256$" + hashlib.sha256(b"t").hexdigest()


class ApiConfigTests(unittest.TestCase):
    def errors(self, api: dict) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            load_options({"smtpConfig": {"ports": [2525]}, "apiConfig": api})
        return caught.exception.errors

    def test_defaults(self) -> None:
        api = load_options({"smtpConfig": {"ports": [2525]}}).options.api_config
        self.assertFalse(api.enabled)
        self.assertEqual((api.bind_address, api.port, api.socket), ("127.0.0.1", 8025, None))
        self.assertEqual((api.tokens, api.cors), ([], []))
        self.assertEqual(tuple(api.allowed_hosts), LOOPBACK_HOSTS)

    def test_tokens(self) -> None:
        self.patch(passwords, "DEFAULT_LOG2_N", 10)
        scrypt = passwords.hash_password("x")
        api = load_options(
            {
                "smtpConfig": {"ports": [2525]},
                "apiConfig": {
                    "enabled": True,
                    "tokens": [
                        {"name": "a", "tokenHash": SHA, "scope": "admin"},
                        {"name": "b", "tokenHash": scrypt},
                    ],
                },
            }
        ).options.api_config
        self.assertEqual([(t.name, t.scope) for t in api.tokens], [("a", "admin"), ("b", "read")])

    def test_errors_name_key_paths(self) -> None:
        errors = self.errors(
            {
                "port": 70000,
                "bindAddress": "localhost",
                "tokens": [
                    {"name": "a", "tokenHash": "secret", "scope": "root"},
                    {"name": "a", "tokenHash": SHA},
                    {"name": "c", "tokenHash": "scrypt$1$2"},
                ],
                "allowedHosts": ["bad host"],
                "cors": ["ftp://x"],
                "socket": "",
                "bogus": 1,
            }
        )
        joined = "\n".join(errors)
        for path in (
            "apiConfig.port:",
            "apiConfig.bindAddress:",
            "apiConfig.tokens[0].tokenHash: not a token hash",
            "apiConfig.tokens[0].scope:",
            "apiConfig.tokens[2].tokenHash: malformed scrypt hash",
            "apiConfig.allowedHosts[0]:",
            "apiConfig.cors[0]:",
            "apiConfig.socket:",
            "apiConfig.bogus: unknown key",
        ):
            self.assertIn(path, joined)

    def test_duplicate_names(self) -> None:
        errors = self.errors({"tokens": [{"name": "a", "tokenHash": SHA}, {"name": "a", "tokenHash": SHA}]})
        self.assertIn("apiConfig.tokens[1].name: 'a' is also apiConfig.tokens[0]", errors)

    def test_enabled_without_tokens_warns(self) -> None:
        result = load_options({"smtpConfig": {"ports": [2525]}, "apiConfig": {"enabled": True}})
        self.assertTrue(any(w.startswith("apiConfig.tokens: empty") for w in result.warnings))

    def test_token_hash_forms(self) -> None:
        self.assertTrue(is_token_hash(SHA))
        self.assertFalse(is_token_hash(SHA.upper()))
        self.assertFalse(is_token_hash("sha256$abc"))


class ApiTokenCommandTests(unittest.TestCase):
    def test_lines_load_and_match_the_token(self) -> None:
        import tomllib

        from dcrouter.cli import api_token_lines

        token, lines = api_token_lines("ops", "admin")
        entry = tomllib.loads(lines)["apiConfig"]["tokens"][0]
        self.assertEqual((entry["name"], entry["scope"]), ("ops", "admin"))
        self.assertEqual(entry["tokenHash"], "sha256$" + hashlib.sha256(token.encode()).hexdigest())
        self.assertNotIn(token, lines)
        self.assertGreaterEqual(len(token), 40)

"""Tests for dcrouter.config: loading TOML/JSON/mappings into the options schema, and every check."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any

from twisted.trial import unittest

from dcrouter.config import ConfigError, ConfigResult, load_file, load_options, schema, values
from dcrouter.config.domains import DomainConfig
from dcrouter.config.options import DcRouterOptions
from dcrouter.config.smtp import SmtpConfig
from dcrouter.config.tls import TlsConfig
from dcrouter.net.certfiles import generate_self_signed
from dcrouter.passwords import hash_password

# An MX-only gateway: no implicit TLS port, so no certificate is needed.
MX_ONLY: dict[str, Any] = {
    "smtpConfig": {
        "ports": [2525],
        "hostname": "mx.example.com",
        "domainConfigs": [{"domains": ["example.com"], "targetIPs": ["10.0.0.10"]}],
    }
}


def smtp(**keys: Any) -> dict[str, Any]:
    """MX_ONLY with smtpConfig keys replaced."""
    raw = copy.deepcopy(MX_ONLY)
    raw["smtpConfig"].update(keys)
    return raw


class LoadCase(unittest.TestCase):
    def errors(self, raw: dict[str, Any]) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            load_options(raw)
        return caught.exception.errors

    def warnings(self, raw: dict[str, Any]) -> list[str]:
        return load_options(raw).warnings

    def write_pair(self) -> tuple[str, str]:
        """A matching certificate and key in a fresh directory."""
        directory = self.mktemp()
        os.makedirs(directory)
        cert, key = generate_self_signed("mx.example.com")
        paths = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        for path, data in zip(paths, (cert, key), strict=True):
            with open(path, "wb") as f:
                f.write(data)
        return paths


class LoadingTests(LoadCase):
    def test_result(self) -> None:
        result = load_options(MX_ONLY)
        self.assertIsInstance(result, ConfigResult)
        self.assertIsInstance(result.options, DcRouterOptions)
        smtp_config = result.options.smtp_config
        assert smtp_config is not None
        self.assertIsInstance(smtp_config, SmtpConfig)
        self.assertIsInstance(smtp_config.domain_configs[0], DomainConfig)
        self.assertEqual(smtp_config.domain_configs[0].target_ips, ["10.0.0.10"])
        self.assertEqual(smtp_config.ports, [2525])
        self.assertEqual(smtp_config.max_message_size, 52_428_800)
        self.assertEqual(result.warnings, [])
        with self.assertRaises(dataclasses.FrozenInstanceError):
            smtp_config.hostname = "other"  # type: ignore[misc]

    def test_declared_keys(self) -> None:
        """`targetIPs`, `maxConnectionsPerIP` and `pass` are the declared keys, not the camelCase guess."""
        raw = smtp(maxConnectionsPerIP=5)
        raw["smtpConfig"]["domainConfigs"][0]["authentication"] = {"user": "u", "pass": "p"}
        options = load_options(raw).options.smtp_config
        assert options is not None
        self.assertEqual(options.max_connections_per_ip, 5)
        authentication = options.domain_configs[0].authentication
        assert authentication is not None
        self.assertEqual(authentication.pass_, "p")

    def test_toml_and_json_files(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        toml_path = os.path.join(directory, "c.toml")
        with open(toml_path, "w") as f:
            f.write('[smtpConfig]\nports = [2525]\nhostname = "mx.example.com"\n')
        json_path = os.path.join(directory, "c.json")
        with open(json_path, "w") as f:
            json.dump({"smtpConfig": {"ports": [2525], "hostname": "mx.example.com"}}, f)
        self.assertEqual(load_file(toml_path).options, load_file(json_path).options)

    def test_file_errors(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        cases = {"c.yaml": "ports: [25]\n", "c.toml": "[smtpConfig\n", "d.json": "{,}"}
        expected = {
            "c.yaml": "unknown configuration format '.yaml'",
            "c.toml": "not valid TOML",
            "d.json": "not valid JSON",
        }
        for name, text in cases.items():
            path = os.path.join(directory, name)
            with open(path, "w") as f:
                f.write(text)
            with self.assertRaises(ConfigError) as caught:
                load_file(path)
            self.assertIn(expected[name], str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            load_file(os.path.join(directory, "missing.toml"))
        self.assertIn("cannot read", str(caught.exception))

    def test_json_duplicate_key(self) -> None:
        path = self.mktemp() + ".json"
        with open(path, "w") as f:
            f.write('{"smtpConfig": {"ports": [2525], "ports": [25], "hostname": "mx.example.com"}}')
        with self.assertRaises(ConfigError) as caught:
            load_file(path)
        self.assertEqual(caught.exception.errors, ["smtpConfig.ports: key given twice"])

    def test_file_names_the_system_cannot_take(self) -> None:
        # Found by fuzzing (tests/test_fuzz_config.py): a certPath with a NUL, or with a lone surrogate (a
        # JSON "\\ud800" escape), made open() raise ValueError out of the loader instead of a ConfigError.
        # (A NUL is now refused in every string setting, before the file name check.)
        for name, why in [
            ("a\x00b.pem", "contains a NUL character (\\x00)"),
            ("\ud800.pem", values.file_path("\ud800.pem")),
        ]:
            pair = {"certPath": name, "keyPath": name}
            self.assertEqual(
                self.errors({**MX_ONLY, "tls": pair}), [f"tls.certPath: {why}", f"tls.keyPath: {why}"]
            )
            self.assertEqual(
                self.errors(smtp(tls=pair)),
                [f"smtpConfig.tls.certPath: {why}", f"smtpConfig.tls.keyPath: {why}"],
            )
            self.assertEqual(self.errors(smtp(persistentPath=name)), [f"smtpConfig.persistentPath: {why}"])
        self.assertIn("NUL", values.file_path("a\x00b") or "")
        self.assertIn("invalid Unicode", values.file_path("\ud800") or "")
        self.assertEqual(values.file_path(""), "must not be empty")
        self.assertIsNone(values.file_path("var/spool/é"))

    def test_types(self) -> None:
        raw = smtp(useTls=1, maxMessageSize=True, hostname=["a"], ports="25", banner=None)
        raw["smtpConfig"]["domainConfigs"][0]["domains"] = "example.com"
        self.assertEqual(
            self.errors(raw),
            [
                "smtpConfig.ports: expected list of integers, got a string '25'",
                "smtpConfig.hostname: expected string, got a list",
                "smtpConfig.maxMessageSize: expected integer, got a boolean (true)",
                "smtpConfig.domainConfigs[0].domains: expected list of strings, got a string 'example.com'",
                "smtpConfig.useTls: expected boolean, got an integer 1",
            ],
        )

    def test_nul_in_a_string(self) -> None:
        # A path with a NUL would be cut short by the OS or fail only at start-up; a name would be truncated.
        raw = smtp(hostname="mx\x00.example.com")
        raw["smtpConfig"]["persistentPath"] = "/var/lib/dcrouter\x00/evil"
        raw["smtpConfig"]["domainConfigs"][0]["domains"] = ["a.example\x00"]
        self.assertEqual(
            sorted(self.errors(raw)),
            [
                "smtpConfig.domainConfigs[0].domains[0]: contains a NUL character (\\x00)",
                "smtpConfig.hostname: contains a NUL character (\\x00)",
                "smtpConfig.persistentPath: contains a NUL character (\\x00)",
            ],
        )

    def test_int_is_a_float(self) -> None:
        report = schema.Report()
        self.assertEqual(schema._convert(float, 3, "x", report), 3.0)
        self.assertIs(schema._convert(float, True, "x", report), schema._INVALID)
        self.assertEqual(report.errors, ["x: expected number, got a boolean (true)"])

    def test_literal(self) -> None:
        errors = self.errors(smtp(queueStorage="Disk", tls={"minVersion": "TLSv1.1"}))
        self.assertEqual(
            errors,
            [
                'smtpConfig.tls.minVersion: expected one of "TLSv1.2", "TLSv1.3", got a string \'TLSv1.1\'',
                'smtpConfig.queueStorage: expected one of "memory", "disk", "redis", got a string \'Disk\'',
            ],
        )

    def test_unknown_keys(self) -> None:
        raw = smtp(maxMesageSize=1, zzz=2)
        raw["smtpConfg"] = {}
        self.assertEqual(
            self.errors(raw),
            [
                "smtpConfg: unknown key; did you mean 'smtpConfig'?",
                "smtpConfig.maxMesageSize: unknown key; did you mean 'maxMessageSize'?",
                "smtpConfig.zzz: unknown key",
            ],
        )

    def test_required(self) -> None:
        raw = smtp(auth={"users": [{"username": "a"}]})
        raw["smtpConfig"]["domainConfigs"] = [{"targetIPs": ["10.0.0.1"]}]
        self.assertEqual(
            self.errors(raw),
            ["smtpConfig.auth.users[0].password: required", "smtpConfig.domainConfigs[0].domains: required"],
        )

    def test_not_a_table(self) -> None:
        self.assertEqual(self.errors({"smtpConfig": [1]}), ["smtpConfig: expected a table, got a list"])

    def test_all_errors_together(self) -> None:
        raw = smtp(ports=[25, 70000, "x"], relayNetworks=["10.1.2.3/8"], maxConnections=0)
        second = {"domains": ["b.example"], "targetIPs": ["ok.example", "exa mple"]}
        raw["smtpConfig"]["domainConfigs"].append(second)
        error = self.assertRaises(ConfigError, load_options, raw)
        self.assertEqual(
            error.errors,
            [
                "smtpConfig.ports[2]: expected integer, got a string 'x'",
                "smtpConfig.ports[1]: not a port number (1-65535): 70000",
                "smtpConfig.domainConfigs[1].targetIPs[1]: not a host name or IP address: 'exa mple'",
                "smtpConfig.relayNetworks[0]: host bits set in '10.1.2.3/8'; did you mean '10.0.0.0/8'?",
                "smtpConfig.maxConnections: must be at least 1: 0",
            ],
        )
        self.assertEqual(str(error), "\n".join(error.errors))

    def test_warnings_beside_errors(self) -> None:
        """A file with errors still reports its warnings (`--check` shows them all at once)."""
        raw = smtp(ports=[25, 70000], socketTimeout=500)
        raw["smtpConfig"]["auth"] = {"users": [{"username": "u", "password": "plain-text"}]}
        error = self.assertRaises(ConfigError, load_options, raw)
        self.assertEqual(error.errors, ["smtpConfig.ports[1]: not a port number (1-65535): 70000"])
        self.assertEqual(
            error.warnings,
            [
                (
                    "smtpConfig.auth.users[0].password: stored in plain text; use a hash from "
                    "'dcrouter hash-password'"
                ),
                "smtpConfig.socketTimeout: 500 ms is less than a second; durations are in milliseconds",
            ],
        )


class UnsupportedTests(LoadCase):
    def test_top_level(self) -> None:
        raw = copy.deepcopy(MX_ONLY)
        raw.update(dnsServerConfig={"zones": ["example.com"], "dnssecZone": "example.com"})
        raw["tls"] = {"contactEmail": "admin@example.com", "domain": "example.com"}
        errors = self.errors(raw)
        self.assertEqual(
            [e.split(":")[0] for e in errors],
            ["tls.contactEmail", "tls.domain", "dnsServerConfig.dnssecZone"],
        )
        for e in errors:
            self.assertIn(": not supported yet: ", e)

    def test_default_values_pass(self) -> None:
        """A JSON dump of an options object has every key at its default: that must load."""
        raw = smtp(contentScanning=False, scanners=[], transformations=[], redisUrl=None)
        raw.update(smartProxyConfig=None, mtaConfig=None)
        load_options(raw)

    def test_smtp(self) -> None:
        raw = smtp(
            contentScanning=True,
            scanners=[{"type": "spam"}],
            transformations=[{"type": "x"}],
            auth={"methods": ["PLAIN", "OAUTH2"], "ldapUrl": "ldap://x"},
        )
        self.assertEqual(
            self.errors(raw),
            [
                (
                    "smtpConfig.auth.ldapUrl: no base DN: the URL's path names where users are searched "
                    "(ldap://host/ou=people,...)"
                ),
                (
                    "smtpConfig.auth.methods: OAUTH2 is offered, but smtpConfig.auth.oauth2 says nothing of "
                    "how tokens are verified"
                ),
                (
                    "smtpConfig.transformations[0].type: unknown transformation type 'x': not built in, no "
                    "entry point 'x' in group 'dcrouter.transformations', and not a dotted path "
                    "(package.module:Class)"
                ),
            ],
        )

    def test_domain_config(self) -> None:
        raw = copy.deepcopy(MX_ONLY)
        raw["smtpConfig"]["domainConfigs"][0].update(
            allowedIPs=["0.0.0.0/0"],
            rateLimits={"maxMessagesPerMinute": 100},
            addHeaders=True,
            headerInfo=[{"name": "X", "value": "y"}],
            signDkim=True,
            dkimOptions={"domainName": "example.com", "keySelector": "mail", "privateKey": "..."},
        )
        prefix = "smtpConfig.domainConfigs[0]."
        # allowedIPs and rateLimits are built (docs/limits.md); the placeholder key is not a key.
        self.assertEqual(
            [e.split(": ")[0] for e in self.errors(raw)],
            [prefix + "dkimOptions.privateKey"],
        )


class PortTests(LoadCase):
    def test_range_and_duplicates(self) -> None:
        self.assertEqual(
            self.errors(smtp(ports=[0, 25, 25], defaultPort=65536)),
            [
                "smtpConfig.ports: 25 is listed twice",
                "smtpConfig.ports[0]: not a port number (1-65535): 0",
                "smtpConfig.defaultPort: not a port number (1-65535): 65536",
            ],
        )
        self.assertEqual(self.errors(smtp(ports=[])), ["smtpConfig.ports: must not be empty"])

    def test_roles_within_ports(self) -> None:
        self.assertEqual(
            self.errors(smtp(ports=[2525, 2465], implicitTlsPorts=[465], submissionPorts=[2587])),
            [
                "smtpConfig.implicitTlsPorts[0]: port 465 is not in smtpConfig.ports",
                "smtpConfig.submissionPorts[0]: port 2587 is not in smtpConfig.ports",
            ],
        )

    def test_default_roles_apply_to_listed_ports_only(self) -> None:
        """Defaults name 465 and 587; a gateway on port 25 alone need not mention them."""
        load_options(smtp(ports=[25]))

    def test_implicit_tls_submission(self) -> None:
        cert, key = self.write_pair()
        tls = {"certPath": cert, "keyPath": key}
        users = {"users": [{"username": "a", "password": hash_password("pw", log2_n=10)}]}
        raw = smtp(ports=[25, 465, 587], tls=tls, auth=users, defaultServer="relay.example.com")
        self.assertEqual(self.warnings(raw), [])
        warnings = self.warnings(smtp(ports=[25, 465], tls=tls, submissionPorts=[]))
        self.assertEqual(len(warnings), 1)
        self.assertTrue(
            warnings[0].startswith(
                "smtpConfig.implicitTlsPorts[0]: port 465 is not in smtpConfig.submissionPorts"
            )
        )


class TlsTests(LoadCase):
    def test_needed_for_implicit_tls(self) -> None:
        """Implicit TLS without a certificate in the file is not an error: the router generates one (and the
        warning says so, and where)."""
        warnings = self.warnings(smtp(ports=[25, 465], submissionPorts=[], persistentPath="var/q"))
        self.assertEqual(
            [w for w in warnings if w.startswith("smtpConfig.tls:")],
            [
                (
                    "smtpConfig.tls: not set, but smtpConfig.implicitTlsPorts lists [465]: a self-signed "
                    "certificate for mx.example.com is generated at var/q/tls/cert.pem on first start and "
                    "kept there (key: var/q/tls/key.pem). Clients that verify certificates refuse it; set "
                    "certPath and keyPath for production"
                )
            ],
        )
        memory = self.warnings(smtp(ports=[465], queueStorage="memory"))
        self.assertIn(
            "smtpConfig.tls: not set, but smtpConfig.implicitTlsPorts lists [465]: a self-signed certificate "
            "for mx.example.com is generated in memory at every start (queueStorage 'memory' keeps nothing). "
            "Clients that verify certificates refuse it; set certPath and keyPath for production",
            memory,
        )

    def test_minimal_configuration_loads(self) -> None:
        """A hostname and one domainConfigs entry: every other key (ports 25/587/465 and their roles
        included) is a default the user did not write, so it loads, with warnings and no error."""
        result = load_options(
            {
                "smtpConfig": {
                    "hostname": "mx.example.com",
                    "domainConfigs": [{"domains": ["example.com"], "targetIPs": ["10.0.0.10"]}],
                }
            }
        )
        self.assertEqual(result.options.smtp_config.ports, [25, 587, 465])  # type: ignore[union-attr]
        tls_warnings = [w for w in result.warnings if w.startswith("smtpConfig.tls:")]
        self.assertEqual(len(tls_warnings), 1, result.warnings)
        self.assertIn("implicitTlsPorts lists [465] and submission ports [587]", tls_warnings[0])
        self.assertIn("/var/spool/dcrouter/tls/cert.pem", tls_warnings[0])

    def test_shared_certificate_counts(self) -> None:
        cert, key = self.write_pair()
        raw = smtp(ports=[25, 465], submissionPorts=[])
        raw["tls"] = {"certPath": cert, "keyPath": key}
        warnings = self.warnings(raw)
        self.assertEqual([w for w in warnings if w.startswith("smtpConfig.tls")], [])

    def test_pair(self) -> None:
        cert, _ = self.write_pair()
        self.assertEqual(
            self.errors(smtp(tls={"certPath": cert})),
            ["smtpConfig.tls.keyPath: required when the other of certPath/keyPath is set"],
        )
        raw = copy.deepcopy(MX_ONLY)
        raw["tls"] = {"keyPath": cert}
        self.assertEqual(
            self.errors(raw), ["tls.certPath: required when the other of certPath/keyPath is set"]
        )

    def test_files_must_hold_matching_pem(self) -> None:
        cert, key = self.write_pair()
        other_cert, other_key = self.write_pair()
        missing = cert + ".missing"
        self.assertEqual(
            self.errors(smtp(tls={"certPath": missing, "keyPath": key})),
            [f"smtpConfig.tls.certPath: cannot read {missing!r}: No such file or directory"],
        )
        self.assertEqual(
            self.errors(smtp(tls={"certPath": key, "keyPath": cert})),
            [
                f"smtpConfig.tls.certPath: no PEM certificate in {key!r}",
                f"smtpConfig.tls.keyPath: no PEM private key in {cert!r}",
            ],
        )
        self.assertEqual(
            self.errors(smtp(tls={"certPath": cert, "keyPath": other_key})),
            ["smtpConfig.tls.keyPath: does not match the certificate in smtpConfig.tls.certPath"],
        )
        self.assertEqual(
            self.errors(smtp(tls={"certPath": cert, "keyPath": key, "caPath": key})),
            [f"smtpConfig.tls.caPath: no PEM certificate in {key!r}"],
        )
        load_options(smtp(tls={"certPath": cert, "keyPath": key, "caPath": other_cert}))

    def test_self_signed(self) -> None:
        directory = self.mktemp()
        raw = smtp(
            ports=[465],
            submissionPorts=[465],
            tls={
                "certPath": os.path.join(directory, "c.pem"),
                "keyPath": os.path.join(directory, "k.pem"),
                "selfSigned": True,
            },
        )
        tls = load_options(raw).options.smtp_config.tls  # type: ignore[union-attr]
        self.assertIsInstance(tls, TlsConfig)
        self.assertEqual(
            self.errors(smtp(tls={"selfSigned": True})),
            ["smtpConfig.tls.certPath: required with selfSigned: where the certificate is generated"],
        )

    def test_ciphers(self) -> None:
        self.assertEqual(
            self.errors(smtp(tls={"ciphers": "NO-SUCH-CIPHER"})),
            ["smtpConfig.tls.ciphers: OpenSSL knows no cipher in 'NO-SUCH-CIPHER'"],
        )
        load_options(smtp(tls={"ciphers": "ECDHE+AESGCM"}))

    def test_tls_profile(self) -> None:
        tls = load_options(smtp(tls={"tlsProfile": "modern"})).options.smtp_config.tls  # type: ignore[union-attr]
        assert tls is not None
        self.assertEqual(tls.tls_profile, "modern")
        self.assertEqual(TlsConfig().tls_profile, "intermediate")
        self.assertEqual(
            self.errors(smtp(tls={"tlsProfile": "old"})),
            ['smtpConfig.tls.tlsProfile: expected one of "modern", "intermediate", got a string \'old\''],
        )

    def test_ciphers_against_the_profile(self) -> None:
        """ciphers replaces TLS 1.2 suites: where only TLS 1.3 is accepted it is an error; suites the profile
        leaves out are named in a warning, and the strong ones pass quietly."""
        no_effect = "so TLS 1.2 is not accepted; remove it"
        self.assertEqual(
            self.errors(smtp(tls={"tlsProfile": "modern", "ciphers": "ECDHE+AESGCM"})),
            [f'smtpConfig.tls.ciphers: has no effect: smtpConfig.tls.tlsProfile is "modern", {no_effect}'],
        )
        self.assertEqual(
            self.errors(smtp(tls={"minVersion": "TLSv1.3", "ciphers": "ECDHE+AESGCM"})),
            [f'smtpConfig.tls.ciphers: has no effect: smtpConfig.tls.minVersion is "TLSv1.3", {no_effect}'],
        )
        weak = "ECDHE-RSA-AES128-GCM-SHA256:AES128-SHA:ECDHE-RSA-AES128-SHA"
        self.assertEqual(
            self.warnings(smtp(tls={"ciphers": weak})),
            [
                (
                    "smtpConfig.tls.ciphers: lets in TLS 1.2 suites that smtpConfig.tls.tlsProfile leaves "
                    "out (it keeps ECDHE with AEAD only): AES128-SHA, ECDHE-RSA-AES128-SHA"
                )
            ],
        )
        self.assertEqual(self.warnings(smtp(tls={"ciphers": "ECDHE-ECDSA-AES128-GCM-SHA256"})), [])


class ValueTests(LoadCase):
    def test_host_names(self) -> None:
        self.assertEqual(
            self.errors(
                smtp(
                    hostname="mx_1.example.com",
                    banner="hi\r\n250 fake",
                    defaultServer="-bad.example",
                    bindAddress="localhost",
                )
            ),
            [
                "smtpConfig.hostname: not a valid host name: 'mx_1.example.com'",
                "smtpConfig.banner: must not contain CR, LF or other control characters: 'hi\\r\\n250 fake'",
                "smtpConfig.defaultServer: not a host name or IP address: '-bad.example'",
                "smtpConfig.bindAddress: not an IP address: 'localhost'",
            ],
        )
        load_options(smtp(defaultServer="2001:db8::1", bindAddress="::", banner="ESMTP ready"))

    def test_sizes_and_durations(self) -> None:
        self.assertEqual(
            self.errors(smtp(maxMessageSize=0, socketTimeout=-1, maxCommandLineLength=100, maxQueueSize=-1)),
            [
                "smtpConfig.maxMessageSize: must be at least 1: 0",
                "smtpConfig.socketTimeout: must be a positive number of milliseconds: -1",
                "smtpConfig.maxCommandLineLength: must be at least 512: 100",
                "smtpConfig.maxQueueSize: must be at least 0: -1",
            ],
        )
        self.assertEqual(
            self.warnings(smtp(socketTimeout=30)),
            ["smtpConfig.socketTimeout: 30 ms is less than a second; durations are in milliseconds"],
        )

    def test_limits_against_each_other(self) -> None:
        self.assertEqual(
            self.errors(
                smtp(maxConnections=10, maxConnectionsPerIP=11, baseRetryDelay=60_000, maxRetryDelay=30_000)
            ),
            [
                "smtpConfig.maxConnectionsPerIP: 11 is more than smtpConfig.maxConnections (10)",
                "smtpConfig.maxRetryDelay: 30000 is less than smtpConfig.baseRetryDelay (60000)",
            ],
        )

    def test_domains(self) -> None:
        raw = copy.deepcopy(MX_ONLY)
        raw["smtpConfig"]["domainConfigs"] = [
            {"domains": ["example.com", "*.example.com", "*", "a.*.example"], "targetIPs": ["10.0.0.1"]},
            {"domains": ["EXAMPLE.com", "x.example", "x.example"], "targetIPs": []},
            {"domains": [], "targetIPs": ["mail1.example.com"]},
        ]
        self.assertEqual(
            self.errors(raw),
            [
                "smtpConfig.domainConfigs[0].domains[2]: not a domain name or '*.' wildcard: '*'",
                "smtpConfig.domainConfigs[0].domains[3]: not a domain name or '*.' wildcard: 'a.*.example'",
                "smtpConfig.domainConfigs[1].domains: 'x.example' is listed twice",
                "smtpConfig.domainConfigs[1].targetIPs: must not be empty",
                "smtpConfig.domainConfigs[2].domains: must not be empty",
            ],
        )

    def test_domain_in_two_entries(self) -> None:
        raw = copy.deepcopy(MX_ONLY)
        raw["smtpConfig"]["domainConfigs"].append(
            {"domains": ["*.example.com", "Example.COM."], "targetIPs": ["10.0.0.2"]}
        )
        self.assertEqual(
            self.errors(raw),
            ["smtpConfig.domainConfigs[1].domains[1]: 'Example.COM.' is also in smtpConfig.domainConfigs[0]"],
        )

    def test_relay_networks(self) -> None:
        networks = ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]
        load_options(smtp(relayNetworks=networks, defaultServer="r.example"))
        self.assertEqual(
            self.errors(smtp(relayNetworks=["10.0.0.0/33", "fe80::1/10"])),
            [
                "smtpConfig.relayNetworks[0]: not an IP network in CIDR notation: '10.0.0.0/33'",
                "smtpConfig.relayNetworks[1]: host bits set in 'fe80::1/10'; did you mean 'fe80::/10'?",
            ],
        )


class AuthTests(LoadCase):
    def test_users(self) -> None:
        good = hash_password("pw", log2_n=10)
        users = [
            {"username": "a", "password": good},
            {"username": "a", "password": good},
            {"username": "b", "password": ""},
            {"username": "c", "password": "scrypt$15$8$1$bad"},
        ]
        self.assertEqual(
            self.errors(smtp(auth={"users": users})),
            [
                "smtpConfig.auth.users[2].password: must not be empty",
                (
                    "smtpConfig.auth.users[3].password: malformed scrypt hash; make a new one with "
                    "'dcrouter hash-password'"
                ),
            ],
        )
        self.assertEqual(
            self.errors(smtp(auth={"users": users[:2]})),
            ["smtpConfig.auth.users[1].username: 'a' is also smtpConfig.auth.users[0]"],
        )

    def test_plain_text_password(self) -> None:
        raw = smtp(auth={"users": [{"username": "a", "password": "secret"}]})
        self.assertEqual(
            self.warnings(raw),
            [
                (
                    "smtpConfig.auth.users[0].password: stored in plain text; use a hash "
                    "from 'dcrouter hash-password'"
                )
            ],
        )

    def test_submission_without_users(self) -> None:
        cert, key = self.write_pair()
        warnings = self.warnings(
            smtp(ports=[25, 587], tls={"certPath": cert, "keyPath": key}, defaultServer="relay.example.com")
        )
        self.assertEqual(
            warnings, ["smtpConfig.auth.users: empty, so nobody can submit mail on submission ports [587]"]
        )

    def test_submission_without_tls(self) -> None:
        """A submission port needs TLS (AUTH only after STARTTLS): without a certificate in the file, one is
        generated under persistentPath, and the warning says where."""
        raw = smtp(
            ports=[25, 587],
            defaultServer="relay.example.com",
            persistentPath="/srv/dcrouter",
            auth={"users": [{"username": "a", "password": hash_password("pw", log2_n=10)}]},
        )
        self.assertEqual(
            self.warnings(raw),
            [
                (
                    "smtpConfig.tls: not set, but submission ports [587] offer AUTH only after STARTTLS: a "
                    "self-signed certificate for mx.example.com is generated at /srv/dcrouter/tls/cert.pem "
                    "on first start and kept there (key: /srv/dcrouter/tls/key.pem). Clients that verify "
                    "certificates refuse it; set certPath and keyPath for production"
                )
            ],
        )

    def test_target_authentication_pair(self) -> None:
        raw = copy.deepcopy(MX_ONLY)
        raw["smtpConfig"]["domainConfigs"][0]["authentication"] = {"user": "u"}
        self.assertEqual(
            self.errors(raw),
            ["smtpConfig.domainConfigs[0].authentication.pass: required when the other of user/pass is set"],
        )


class OtherWarningTests(LoadCase):
    def test_memory_queue(self) -> None:
        self.assertEqual(
            self.warnings(smtp(queueStorage="memory")),
            ["smtpConfig.queueStorage: 'memory': queued messages are lost when dcrouter stops"],
        )

    def test_nothing_to_run(self) -> None:
        self.assertEqual(self.warnings({}), ["smtpConfig: not set, so dcrouter has nothing to run"])

    def test_relay_without_default_server(self) -> None:
        """Without defaultServer, relayed mail goes by MX: nothing to warn about."""
        self.assertEqual(self.warnings(smtp(relayNetworks=["10.0.0.0/8"])), [])


# Seed section 7.1 as JSON (`JSON.stringify` of the options object), with certificate paths made in the test.
SEED_7_1 = """{"smtpConfig": {
  "ports": [25, 587, 465], "hostname": "mail.example.com", "maxMessageSize": 52428800,
  "tls": {"certPath": "CERT", "keyPath": "KEY"},
  "domainConfigs": [{"domains": ["example.com", "*.example.com"],
                     "targetIPs": ["mail1.example.com", "mail2.example.com"], "port": 25, "useTls": true}],
  "defaultServer": "fallback-mail.example.com", "defaultPort": 25, "useTls": true,
  "queueStorage": "disk", "persistentPath": "/var/mail/queue", "maxRetries": 5}}"""

# Seed section 7.2 as JSON, verbatim.
SEED_7_2 = """{"smtpConfig": {
  "ports": [25, 587, 465], "hostname": "mail.example.com",
  "domainConfigs": [{
    "domains": ["example.com", "*.example.com"], "targetIPs": ["mail1.example.com", "mail2.example.com"],
    "port": 25, "useTls": true,
    "addHeaders": true, "headerInfo": [{"name": "X-Processed-By", "value": "gateway"},
                                       {"name": "X-Scanned", "value": "true"}],
    "signDkim": true,
    "dkimOptions": {"domainName": "example.com", "keySelector": "mail", "privateKey": "..."},
    "rateLimits": {"maxMessagesPerMinute": 100, "maxRecipientsPerMessage": 50}}],
  "contentScanning": true, "scanners": [
    {"type": "spam", "threshold": 5.0, "action": "tag"}, {"type": "virus", "action": "reject"},
    {"type": "attachment", "blockedExtensions": [".exe", ".bat", ".vbs"], "action": "reject"}],
  "transformations": [{"type": "addHeader", "header": "X-Gateway", "value": "DcRouter 1.0"},
                      {"type": "dkimSign", "domains": ["example.com"]}]}}"""


class SeedExampleTests(LoadCase):
    def test_basic_configuration(self) -> None:
        cert, key = self.write_pair()
        path = self.mktemp() + ".json"
        with open(path, "w") as f:
            f.write(SEED_7_1.replace("CERT", cert).replace("KEY", key))
        result = load_file(path)
        smtp_config = result.options.smtp_config
        assert smtp_config is not None
        self.assertEqual(smtp_config.ports, [25, 587, 465])
        self.assertEqual(smtp_config.hostname, "mail.example.com")
        self.assertEqual(smtp_config.max_message_size, 50 * 1024 * 1024)
        self.assertEqual(smtp_config.domain_configs[0].target_ips, ["mail1.example.com", "mail2.example.com"])
        self.assertEqual(smtp_config.domain_configs[0].domains, ["example.com", "*.example.com"])
        self.assertTrue(smtp_config.domain_configs[0].use_tls)
        self.assertEqual(
            (smtp_config.default_server, smtp_config.default_port, smtp_config.use_tls),
            ("fallback-mail.example.com", 25, True),
        )
        self.assertEqual(
            (smtp_config.queue_storage, smtp_config.persistent_path, smtp_config.max_retries),
            ("disk", "/var/mail/queue", 5),
        )
        # No users: the only thing to warn about in the seed's own example.
        self.assertEqual(
            result.warnings,
            ["smtpConfig.auth.users: empty, so nobody can submit mail on submission ports [587, 465]"],
        )

    def test_advanced_configuration(self) -> None:
        """Every part of 7.2 loads but the placeholder DKIM key (its rateLimits are built: docs/limits.md);
        the certificate it does not name for port 465 is a warning (one is generated)."""
        error = self.assertRaises(ConfigError, load_options, json.loads(SEED_7_2))
        errors = error.errors
        prefix = "smtpConfig.domainConfigs[0]."
        self.assertEqual([e.split(": ")[0] for e in errors], [prefix + "dkimOptions.privateKey"])
        self.assertIn("smtpConfig.tls", [w.split(": ")[0] for w in error.warnings])
        self.assertEqual(sum("not supported yet" in e for e in errors), 0)

    def test_advanced_configuration_without_unbuilt_parts(self) -> None:
        raw = json.loads(SEED_7_2)
        smtp_config = raw["smtpConfig"]
        for key in ("contentScanning", "scanners", "transformations"):
            del smtp_config[key]
        for key in ("addHeaders", "headerInfo", "signDkim", "dkimOptions", "rateLimits"):
            del smtp_config["domainConfigs"][0][key]
        smtp_config["tls"] = {"certPath": "var/c.pem", "keyPath": "var/k.pem", "selfSigned": True}
        smtp_config["defaultServer"] = "fallback-mail.example.com"
        smtp_config["auth"] = {"users": [{"username": "a", "password": hash_password("pw", log2_n=10)}]}
        self.assertEqual(load_options(raw).warnings, [])

    def test_round_trip(self) -> None:
        """Options serialised back to the file's keys load to equal options."""
        cert, key = self.write_pair()
        options = load_options(json.loads(SEED_7_1.replace("CERT", cert).replace("KEY", key))).options
        self.assertEqual(load_options(json.loads(json.dumps(_to_raw(options)))).options, options)


def _to_raw(value: Any) -> Any:
    """Options as a mapping with the file's keys, the way a JSON dump of an options object looks."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {schema.file_key(f): _to_raw(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [_to_raw(v) for v in value]
    return value

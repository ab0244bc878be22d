"""Checks across the keys of one block (block checks).

A block check (:func:`dcrouter.config.schema.block_check`) sees one whole block after its keys were converted
and reports through a :class:`~dcrouter.config.schema.Report`.

This module does not import the schema (``options.py`` imports it), so block checks read their block by
attribute and spell the seed's file keys in their messages.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dcrouter.config.schema import Report, block_check, join, set_in_file
from dcrouter.mail.recipients import RecipientTable, read_recipients_file
from dcrouter.net.domains import normalize_domain
from dcrouter.net.redis_url import parse_redis_url
from dcrouter.passwords import is_password_hash, looks_like_password_hash

# --- block checks ------------------------------------------------------------------------------------------


def _listed(ports: Iterable[int], known: list[int]) -> list[tuple[int, int]]:
    return [(i, p) for i, p in enumerate(ports) if p not in known]


@block_check("ports", "implicit_tls_ports", "submission_ports")
def smtp_port_roles(smtp: Any, path: str, report: Report) -> None:
    """implicitTlsPorts and submissionPorts give roles to ports that are listened on. Their defaults name the
    standard ports (465, 587) and apply only if those are in ``ports``; a list the file sets must be a subset,
    which catches a role given to a port that was mistyped or forgotten in ``ports``."""
    roles = (
        ("implicitTlsPorts", "implicit_tls_ports", smtp.implicit_tls_ports),
        ("submissionPorts", "submission_ports", smtp.submission_ports),
    )
    for key, attr, ports in roles:
        if not set_in_file(smtp, attr):
            continue
        for i, p in _listed(ports, smtp.ports):
            report.error(f"{join(path, key)}[{i}]", f"port {p} is not in {join(path, 'ports')}")
    for i, p in enumerate(smtp.implicit_tls_ports):
        if p in smtp.ports and p not in smtp.submission_ports:
            # RFC 8314 section 3.3: port 465 is message submission over implicit TLS.
            report.warning(
                f"{join(path, 'implicitTlsPorts')}[{i}]",
                f"port {p} is not in {join(path, 'submissionPorts')}, so it accepts mail without AUTH; "
                "RFC 8314 makes implicit TLS a submission port",
            )


def _tls_usable(tls: Any) -> bool:
    return tls is not None and (tls.self_signed or (tls.cert_path is not None and tls.key_path is not None))


def generated_certificate_paths(persistent_path: str) -> tuple[str, str]:
    """Where the router keeps the self-signed certificate and key it generates when SMTP needs TLS and the
    configuration names no certificate (the disk and redis queues; a memory queue's is never written)."""
    directory = os.path.join(persistent_path, "tls")
    return os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")


def smtp_tls_needs(smtp: Any) -> list[str]:
    """Why SMTP needs a certificate, one reason per role that cannot work without TLS; empty when nothing
    does (an MX port serves without TLS, it only cannot offer STARTTLS then)."""
    implicit = [p for p in smtp.implicit_tls_ports if p in smtp.ports]
    submission = [p for p in smtp.submission_ports if p in smtp.ports and p not in implicit]
    reasons = []
    if implicit:
        reasons.append(f"smtpConfig.implicitTlsPorts lists {implicit}")
    if submission and not smtp.auth.allow_insecure:
        reasons.append(f"submission ports {submission} offer AUTH only after STARTTLS")
    return reasons


@block_check(
    "smtp_config.ports",
    "smtp_config.implicit_tls_ports",
    "smtp_config.submission_ports",
    "smtp_config.tls",
    "smtp_config.auth",
    "smtp_config.hostname",
    "smtp_config.queue_storage",
    "smtp_config.persistent_path",
    "tls",
)
def smtp_tls_needed(options: Any, path: str, report: Report) -> None:
    """Implicit TLS cannot work without a certificate, nor submission (AUTH only after TLS). When the file
    names none (the top-level ``tls`` certificate counts: the router falls back to it), the router generates
    a self-signed one, so a minimal configuration starts; this warning says so, and where it is kept."""
    smtp = options.smtp_config
    shared = options.tls
    usable = _tls_usable(smtp.tls) or (
        shared is not None and shared.cert_path is not None and shared.key_path is not None
    )
    reasons = smtp_tls_needs(smtp)
    if usable or not reasons:
        return
    if smtp.queue_storage == "memory":
        where = "in memory at every start (queueStorage 'memory' keeps nothing)"
    else:
        cert, key = generated_certificate_paths(smtp.persistent_path)
        where = f"at {cert} on first start and kept there (key: {key})"
    report.warning(
        "smtpConfig.tls",
        f"not set, but {' and '.join(reasons)}: a self-signed certificate for {smtp.hostname} is generated "
        f"{where}. Clients that verify certificates refuse it; set certPath and keyPath for production",
    )


@block_check("ports", "submission_ports", "auth")
def smtp_users_present(smtp: Any, path: str, report: Report) -> None:
    if smtp.auth.users:
        return
    submission = [p for p in smtp.submission_ports if p in smtp.ports]
    users = join(path, "auth.users")
    if submission:
        report.warning(users, f"empty, so nobody can submit mail on submission ports {submission}")
    elif smtp.auth.required:
        report.warning(users, f"empty while {join(path, 'auth.required')} is true, so no mail is accepted")


@block_check("max_connections", "max_connections_per_ip")
def smtp_connection_caps(smtp: Any, path: str, report: Report) -> None:
    if smtp.max_connections_per_ip > smtp.max_connections:
        report.error(
            join(path, "maxConnectionsPerIP"),
            f"{smtp.max_connections_per_ip} is more than {join(path, 'maxConnections')} "
            f"({smtp.max_connections})",
        )


@block_check("base_retry_delay", "max_retry_delay")
def smtp_retry_delays(smtp: Any, path: str, report: Report) -> None:
    if smtp.max_retry_delay < smtp.base_retry_delay:
        report.error(
            join(path, "maxRetryDelay"),
            f"{smtp.max_retry_delay} is less than {join(path, 'baseRetryDelay')} ({smtp.base_retry_delay})",
        )


@block_check("queue_storage", "redis_url")
def smtp_queue_storage(smtp: Any, path: str, report: Report) -> None:
    if smtp.queue_storage == "memory":
        report.warning(join(path, "queueStorage"), "'memory': queued messages are lost when dcrouter stops")
    if smtp.redis_url is not None:
        try:
            parse_redis_url(smtp.redis_url)
        except ValueError as e:
            report.error(join(path, "redisUrl"), str(e))
    elif smtp.queue_storage == "redis":
        report.error(
            join(path, "redisUrl"),
            "required with queueStorage 'redis' (redis://host:port/db or unix:///path)",
        )


@block_check("domain_configs")
def smtp_domains_once(smtp: Any, path: str, report: Report) -> None:
    """A domain in two entries would make routing depend on their order."""
    owner: dict[str, int] = {}
    for i, entry in enumerate(smtp.domain_configs):
        for j, domain in enumerate(entry.domains):
            norm = normalize_domain(domain[2:]) if domain.startswith("*.") else normalize_domain(domain)
            norm = ("*." if domain.startswith("*.") else "") + norm
            if norm in owner and owner[norm] != i:
                report.error(
                    f"{join(path, 'domainConfigs')}[{i}].domains[{j}]",
                    f"{domain!r} is also in {join(path, 'domainConfigs')}[{owner[norm]}]",
                )
            owner.setdefault(norm, i)


@block_check("domains", "verify_recipients", "recipients", "recipients_file")
def domain_recipients(entry: Any, path: str, report: Report) -> None:
    """Recipient verification's keys fit its mode, list entries name the entry's domains, and a recipients
    file can be read and parsed now (a file that breaks later keeps its last good version in use)."""
    mode = entry.verify_recipients
    listed = ("recipients", entry.recipients), ("recipientsFile", entry.recipients_file)
    if mode == "list" and not entry.recipients and entry.recipients_file is None:
        report.error(join(path, "recipients"), "required by verifyRecipients 'list' (or recipientsFile)")
    if mode != "list":
        for key, value in listed:
            if value:
                report.error(join(path, key), f"used only with verifyRecipients = 'list', not {mode!r}")
    if mode != "callout":
        for key, attr in (("calloutSender", "callout_sender"), ("calloutFailOpen", "callout_fail_open")):
            if set_in_file(entry, attr):
                report.warning(join(path, key), f"has no effect with verifyRecipients = {mode!r}")
    for i, item in enumerate(entry.recipients):
        try:
            RecipientTable([item], entry.domains)
        except ValueError as error:
            report.error(f"{join(path, 'recipients')}[{i}]", str(error))
    if entry.recipients_file is not None:
        try:
            read_recipients_file(entry.recipients_file, entry.domains)
        except OSError as error:
            reason = error.strerror or error
            report.error(join(path, "recipientsFile"), f"cannot read {entry.recipients_file!r}: {reason}")
        except ValueError as error:
            report.error(join(path, "recipientsFile"), str(error))


@block_check("domain_configs", "callout", "socket_timeout")
def smtp_callout_timeout(smtp: Any, path: str, report: Report) -> None:
    """A client waiting for a callout sends nothing: past socketTimeout its session would be closed first."""
    if not any(entry.verify_recipients == "callout" for entry in smtp.domain_configs):
        return
    if smtp.callout.timeout >= smtp.socket_timeout:
        report.warning(
            join(path, "callout.timeout"),
            f"{smtp.callout.timeout} is not less than {join(path, 'socketTimeout')} ({smtp.socket_timeout}): "
            "a session waiting for a callout would time out first",
        )


@block_check("default_server", "default_port", "use_tls")
def smtp_default_route(smtp: Any, path: str, report: Report) -> None:
    """Without defaultServer, mail outside domainConfigs and routingRules goes by MX to port 25 with
    opportunistic TLS, so defaultPort and useTls (which apply to defaultServer only) would be ignored."""
    if smtp.default_server is not None:
        return
    if set_in_file(smtp, "default_port"):
        report.warning(
            join(path, "defaultPort"),
            f"has no effect without {join(path, 'defaultServer')}: other mail goes by MX, to port 25",
        )
    if smtp.use_tls:
        report.warning(
            join(path, "useTls"),
            f"has no effect without {join(path, 'defaultServer')}: mail delivered by MX uses STARTTLS "
            "when offered, and is not refused without it",
        )


@block_check("routing_rules")
def smtp_routing_rules(smtp: Any, path: str, report: Report) -> None:
    """A rule's name is its route's name, the key of delivery limits and connection pools: two rules with one
    name would share them while sending to different servers."""
    first: dict[str, int] = {}
    for i, rule in enumerate(smtp.routing_rules):
        if rule.name in first:
            report.error(
                f"{join(path, 'routingRules')}[{i}].name",
                f"{rule.name!r} is also {join(path, 'routingRules')}[{first[rule.name]}]",
            )
        first.setdefault(rule.name, i)


@block_check("domain_configs", "transformations", "scanners", "content_scanning")
def smtp_processing(smtp: Any, path: str, report: Report) -> None:
    """Keys that only make sense together: a signing key for each signed domain, scanners that run."""
    keyed: list[str] = []
    for i, domain in enumerate(smtp.domain_configs):
        where = f"{join(path, 'domainConfigs')}[{i}]"
        if domain.sign_dkim and domain.dkim_options is None:
            report.error(join(where, "dkimOptions"), "is required by signDkim")
        if domain.dkim_options is not None:
            keyed.extend(domain.domains)
        if domain.add_headers and not domain.header_info:
            report.warning(join(where, "headerInfo"), "addHeaders is set but headerInfo is empty")
    for i, entry in enumerate(smtp.transformations):
        where = f"{join(path, 'transformations')}[{i}]"
        if entry.type != "dkimSign":
            continue
        if entry.private_key is not None:
            continue
        for domain in entry.domains:
            if domain not in keyed:
                report.error(
                    join(where, "domains"),
                    f"{domain!r} has no key: give privateKey here or dkimOptions in its domainConfigs entry",
                )
    if smtp.scanners and not smtp.content_scanning:
        report.warning(join(path, "scanners"), "not used: contentScanning is off")
    if smtp.content_scanning and not smtp.scanners:
        report.warning(join(path, "contentScanning"), "is on but no scanners are configured")


def _read(path: str) -> bytes | str:
    """The file's bytes, or an error message."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        return f"cannot read {path!r}: {e.strerror or e}"


def _load_pem(file: str, what: str) -> Any:
    data = _read(file)
    if isinstance(data, str):
        return data
    try:
        if what == "key":
            return serialization.load_pem_private_key(data, password=None)
        return x509.load_pem_x509_certificates(data)
    except TypeError:
        return f"the private key in {file!r} is encrypted; dcrouter needs it unencrypted"
    except ValueError:
        noun = "private key" if what == "key" else "certificate"
        return f"no PEM {noun} in {file!r}"


def _public(key: Any) -> bytes:
    return bytes(
        key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


@block_check("cert_path", "key_path", "ca_path", "self_signed")
def tls_material(tls: Any, path: str, report: Report) -> None:
    """certPath and keyPath come as a pair; files that are meant to exist must hold matching PEM."""
    if tls.self_signed and tls.cert_path is None and tls.key_path is None:
        report.error(join(path, "certPath"), "required with selfSigned: where the certificate is generated")
        return
    _pem_files(tls.cert_path, tls.key_path, tls.ca_path, tls.self_signed, path, report)


@block_check("cert_path", "key_path")
def shared_tls_material(tls: Any, path: str, report: Report) -> None:
    _pem_files(tls.cert_path, tls.key_path, None, False, path, report)


def _pem_files(
    cert: str | None, key: str | None, ca: str | None, generated: bool, path: str, report: Report
) -> None:
    if (cert is None) != (key is None):
        missing = "keyPath" if key is None else "certPath"
        report.error(join(path, missing), "required when the other of certPath/keyPath is set")
        return
    loaded: dict[str, Any] = {}
    for name, file, what in (("certPath", cert, "cert"), ("keyPath", key, "key"), ("caPath", ca, "cert")):
        # A self-signed pair is generated on first start, so only its absence is expected.
        if file is None or (generated and name != "caPath" and not os.path.exists(file)):
            continue
        result = _load_pem(file, what)
        if isinstance(result, str):
            report.error(join(path, name), result)
        else:
            loaded[name] = result
    if (
        "certPath" in loaded
        and "keyPath" in loaded
        and _public(loaded["certPath"][0].public_key()) != _public(loaded["keyPath"].public_key())
    ):
        report.error(join(path, "keyPath"), f"does not match the certificate in {join(path, 'certPath')}")


@block_check("ciphers", "min_version", "tls_profile")
def tls_ciphers(tls: Any, path: str, report: Report) -> None:
    """``ciphers`` replaces the profile's TLS 1.2 suites: it must name some, TLS 1.2 must be accepted at all,
    and suites the profile leaves out (without forward secrecy, without AEAD, DHE) are worth a warning."""
    if tls.ciphers is None:
        return
    # Imported here: dcrouter.net.tls imports this package's options.
    from OpenSSL import SSL

    from dcrouter.net.tls import INTERMEDIATE_CIPHERS, TlsPolicy

    ciphers = join(path, "ciphers")
    if TlsPolicy(tls.tls_profile, tls.min_version).minimum_version == "TLSv1.3":
        reason = (
            f'{join(path, "tlsProfile")} is "modern"'
            if tls.tls_profile == "modern"
            else f'{join(path, "minVersion")} is "TLSv1.3"'
        )
        report.error(ciphers, f"has no effect: {reason}, so TLS 1.2 is not accepted; remove it")
        return
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        context.set_cipher_list(tls.ciphers.encode("ascii", "replace"))
    except SSL.Error:
        report.error(ciphers, f"OpenSSL knows no cipher in {tls.ciphers!r}")
        return
    # TLS 1.3 suites (TLS_*) are listed too; they are not the override's and are all strong.
    chosen = SSL.Connection(context, None).get_cipher_list()
    weaker = [name for name in chosen if not name.startswith("TLS_") and name not in INTERMEDIATE_CIPHERS]
    if weaker:
        report.warning(
            ciphers,
            f"lets in TLS 1.2 suites that {join(path, 'tlsProfile')} leaves out (it keeps ECDHE with AEAD "
            f"only): {', '.join(weaker)}",
        )


@block_check("users")
def auth_unique_users(auth: Any, path: str, report: Report) -> None:
    first: dict[str, int] = {}
    for i, user in enumerate(auth.users):
        if user.username in first:
            report.error(
                f"{join(path, 'users')}[{i}].username",
                f"{user.username!r} is also {join(path, 'users')}[{first[user.username]}]",
            )
        first.setdefault(user.username, i)


@block_check("password")
def user_password(user: Any, path: str, report: Report) -> None:
    password = join(path, "password")
    if is_password_hash(user.password):
        return
    if looks_like_password_hash(user.password):
        report.error(password, "malformed scrypt hash; make a new one with 'dcrouter hash-password'")
    else:
        report.warning(password, "stored in plain text; use a hash from 'dcrouter hash-password'")


@block_check("user", "pass_")
def authentication_pair(auth: Any, path: str, report: Report) -> None:
    if (auth.user is None) != (auth.pass_ is None):
        missing = "pass" if auth.pass_ is None else "user"
        report.error(join(path, missing), "required when the other of user/pass is set")


@block_check("smtp_config", "smart_proxy_config", "http_domain_routes")
def router_has_work(options: Any, path: str, report: Report) -> None:
    """SMTP and the proxy are each work enough; with neither, the process would only idle."""
    if options.smtp_config is None and options.smart_proxy_config is None and not options.http_domain_routes:
        report.warning("smtpConfig", "not set, so dcrouter has nothing to run")


@block_check("smart_proxy_config", "http_domain_routes", "smtp_config.ports")
def proxy_smtp_ports(options: Any, path: str, report: Report) -> None:
    """SMTP and the proxy cannot both listen on one port: the second bind would fail at start-up, so the
    config is refused with both key paths named instead."""
    # Imported here: the proxy schema imports this module (through options.py).
    from dcrouter.config.proxy import claimed_ports

    smtp_ports = options.smtp_config.ports
    for where, start, end in claimed_ports(options.smart_proxy_config, options.http_domain_routes):
        for i, p in enumerate(smtp_ports):
            if start <= p <= end:
                report.error(where, f"port {p} is also smtpConfig.ports[{i}]")

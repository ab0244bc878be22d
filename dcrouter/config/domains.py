"""The schema of ``smtpConfig.domainConfigs``: the domains mail is accepted for from anyone, where it is
relayed, what is added to it, and how its recipients are verified (with ``smtpConfig.callout``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dcrouter.config import values
from dcrouter.config.delivery import AuthenticationConfig
from dcrouter.config.schema import Report, block_check, checked, join, option, set_in_file
from dcrouter.mail.recipients import RecipientTable, read_recipients_file


@dataclass(frozen=True)
class RateLimitsConfig:
    max_messages_per_minute: int | None = option(
        None,
        doc="Messages accepted per minute for these domains' recipients, from all clients together (more get "
        "451 4.7.1 at RCPT; a burst of the whole minute's worth, then spaced evenly: docs/limits.md).",
        check=values.positive,
    )
    max_recipients_per_message: int | None = option(
        None,
        doc="Recipients at these domains in one message (more get 452 4.5.3).",
        check=values.positive,
    )


@dataclass(frozen=True)
class HeaderInfo:
    name: str = option(doc="Header field name.")
    value: str = option(doc="Header field value.")


@dataclass(frozen=True)
class DkimOptions:
    domain_name: str = option(doc="d= of the signature.")
    key_selector: str = option(doc="s= of the signature.")
    private_key: str = option(
        doc="PEM private key (RSA 2048+ bits or Ed25519), inline or a file path.",
        check=values.dkim_private_key,
    )


@block_check("domains", "verify_recipients", "recipients", "recipients_file")
def domain_recipients(entry: DomainConfig, path: str, report: Report) -> None:
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


@checked(domain_recipients)
@dataclass(frozen=True)
class DomainConfig:
    domains: list[str] = option(
        doc="Recipient domains: exact names or `*.example.com` wildcards. A domain may appear in one entry "
        "only.",
        check=values.all_of(values.not_empty, values.unique),
        each=values.domain_pattern,
    )
    target_ips: list[str] = option(
        factory=list,
        key="targetIPs",
        doc="Servers (host names or IPs) mail for these domains is relayed to; at least one.",
        check=values.not_empty,
        each=values.host_or_ip,
    )
    port: int = option(25, doc="Port on the target servers.", check=values.port)
    use_tls: bool = option(False, doc="Require STARTTLS towards the targets.")
    authentication: AuthenticationConfig | None = option(None, doc="AUTH towards the targets.")
    max_per_destination: int | None = option(
        None,
        addition=True,
        doc="Deliveries in flight at once to these domains' targets (each domain is its own destination); "
        "not set: smtpConfig.maxPerDestination.",
        check=values.positive,
    )
    max_retries: int | None = option(
        None,
        addition=True,
        doc="Delivery attempts before mail waiting for these domains bounces; not set: "
        "smtpConfig.maxRetries.",
        check=values.non_negative,
    )
    base_retry_delay: int | None = option(
        None,
        addition=True,
        doc="Milliseconds before the first retry to these domains (doubles per attempt); not set: "
        "smtpConfig.baseRetryDelay.",
        check=values.duration,
    )
    max_retry_delay: int | None = option(
        None,
        addition=True,
        doc="Upper bound of the retry delay to these domains, in milliseconds; not set: "
        "smtpConfig.maxRetryDelay.",
        check=values.duration,
    )
    allowed_ips: list[str] = option(
        factory=list,
        key="allowedIPs",
        doc="CIDRs of the clients allowed to send mail to these domains (others get 550 5.7.1 at RCPT; "
        "authenticated sessions are not held to it). Empty: every client.",
        each=values.cidr,
    )
    rate_limits: RateLimitsConfig | None = option(None, doc="Per-domain limits.")
    add_headers: bool = option(
        False, doc="Add headerInfo's fields to mail for these domains (needs headerProcessing)."
    )
    header_info: list[HeaderInfo] = option(factory=list, doc="Header fields added when addHeaders is set.")
    sign_dkim: bool = option(
        False,
        doc="DKIM-sign mail whose From domain is one of these domains, with dkimOptions (needs dkimSigning).",
    )
    dkim_options: DkimOptions | None = option(None, doc="The signing key of signDkim.")
    verify_recipients: Literal["off", "list", "callout"] = option(
        "off",
        addition=True,
        doc="Refuse unknown recipients at RCPT (docs/smtp.md): `off` accepts every address at these domains; "
        "`list` only those in recipients/recipientsFile (every client); `callout` asks the target first "
        "(clients neither authenticated nor in relayNetworks).",
    )
    recipients: list[str] = option(
        factory=list,
        addition=True,
        doc="With verifyRecipients `list`: the addresses that exist: `alice@example.com`, `alice` (at every "
        "domain of the entry), `@example.com` (all of a domain), `*` wildcards in local parts (`alice+*`).",
        each=values.one_line,
    )
    recipients_file: str | None = option(
        None,
        addition=True,
        doc="With verifyRecipients `list`: a file of such entries, one per line (`#` comments; a Postfix "
        "table's `address OK` lines work); re-read when it changes.",
        check=values.file_path,
    )
    callout_sender: str = option(
        "",
        addition=True,
        doc="MAIL FROM of callout probes: empty for the null sender `<>`, or an address for targets that "
        "refuse it.",
        check=values.mailbox_or_empty,
    )
    callout_fail_open: bool = option(
        False,
        addition=True,
        doc="Accept a recipient whose callout could not decide (target down, timeout, 4xx) instead of "
        "answering 450 4.1.1.",
    )


@dataclass(frozen=True)
class CalloutConfig:
    timeout: int = option(
        30_000,
        doc="Milliseconds one recipient callout may take in all (waiting its turn, connecting, TLS, the "
        "replies); then the recipient is unverified.",
        check=values.duration,
    )
    positive_ttl: int = option(
        3_600_000,
        doc="Milliseconds an address the target accepted is remembered (0: not at all).",
        check=values.non_negative,
    )
    negative_ttl: int = option(
        600_000,
        doc="Milliseconds an address the target refused is remembered (0: not at all).",
        check=values.non_negative,
    )
    cache_size: int = option(
        100_000,
        doc="Addresses remembered at most; the least recently used are forgotten first.",
        check=values.positive,
    )
    max_parallel: int = option(
        20, doc="Callouts in flight at once; more wait their turn (within timeout).", check=values.positive
    )

"""The schema of ``smtpConfig.verification``: SPF, DKIM, DMARC and ARC checks of incoming mail, and what the
chain does with a DMARC failure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dcrouter.config import values
from dcrouter.config.schema import Report, block_check, checked, join, option

Action = Literal["tag", "reject", "quarantine"]


def _acting(entry: VerificationConfig | DomainPolicyConfig, path: str) -> list[str]:
    return [
        join(path, key)
        for key, value in (
            ("onDmarcReject", entry.on_dmarc_reject),
            ("onDmarcQuarantine", entry.on_dmarc_quarantine),
        )
        if value != "tag"
    ]


@block_check("dmarc", "on_dmarc_reject", "on_dmarc_quarantine", "policies")
def verification_actions(verification: VerificationConfig, path: str, report: Report) -> None:
    acting = _acting(verification, path)
    for i, policy in enumerate(verification.policies):
        acting.extend(_acting(policy, f"{join(path, 'policies')}[{i}]"))
    if acting and not verification.dmarc:
        report.error(acting[0], f"acts on DMARC results, but {join(path, 'dmarc')} is false")
    first: dict[str, str] = {}
    for i, policy in enumerate(verification.policies):
        for j, domain in enumerate(policy.domains):
            where = f"{join(path, 'policies')}[{i}].domains[{j}]"
            if domain.lower() in first:
                report.error(where, f"{domain!r} is also {first[domain.lower()]}")
            first.setdefault(domain.lower(), where)


@dataclass(frozen=True)
class DomainPolicyConfig:
    domains: list[str] = option(
        doc="Recipient domains (exact, or `*.` wildcard) whose mail this policy decides.",
        check=values.not_empty,
        each=values.domain_pattern,
    )
    on_dmarc_reject: Action = option("tag", doc="As verification.onDmarcReject, for these recipients.")
    on_dmarc_quarantine: Action = option(
        "tag", doc="As verification.onDmarcQuarantine, for these recipients."
    )


@dataclass(frozen=True)
class ArcSignConfig:
    domain_name: str = option(
        doc="The sealing domain (d=). Without keySelector and privateKey, the dkimOptions of the "
        "domainConfigs entry listing it are used.",
        check=values.host_name,
    )
    key_selector: str | None = option(None, doc="s= of the seal; with privateKey.")
    private_key: str | None = option(
        None,
        doc="The RSA private key (PEM, inline or a file path); with keySelector.",
        check=values.dkim_private_key,
    )


@checked(verification_actions)
@dataclass(frozen=True)
class VerificationConfig:
    enabled: bool = option(
        False,
        doc="Verify mail received from clients that neither authenticated nor are in relayNetworks, and "
        "add one Authentication-Results field (RFC 8601).",
    )
    authserv_id: str | None = option(
        None,
        doc="The authserv-id of the Authentication-Results field; fields that arrive claiming it are "
        "removed. Not set: smtpConfig.hostname.",
        check=values.host_name,
    )
    spf: bool = option(True, doc="Check SPF (RFC 7208) for the MAIL FROM and HELO identities.")
    dkim: bool = option(True, doc="Verify every DKIM signature (RFC 6376), up to 10 per message.")
    dmarc: bool = option(
        True, doc="Evaluate DMARC (RFC 7489) for the From domain, with the Public Suffix List."
    )
    arc: bool = option(True, doc="Validate the ARC chain (RFC 8617).")
    on_dmarc_reject: Action = option(
        "tag",
        doc="Mail failing DMARC whose domain publishes p=reject: `tag` (only the header), `reject` "
        "(550 5.7.1) or `quarantine`.",
    )
    on_dmarc_quarantine: Action = option(
        "tag",
        doc="Mail failing DMARC whose domain publishes p=quarantine: `tag`, `reject` (550 5.7.1) or "
        "`quarantine`.",
    )
    policies: list[DomainPolicyConfig] = option(
        factory=list,
        doc="Other actions for mail to some recipient domains; recipients of no entry get the actions "
        "above. A message for several recipients gets the strictest of their actions (reject, then "
        "quarantine, then tag).",
    )
    arc_sign: ArcSignConfig | None = option(
        None,
        doc="Seal verified mail with an ARC set (RFC 8617: ARC-Authentication-Results with this gateway's "
        "results, ARC-Message-Signature, ARC-Seal) before it is queued, so that a receiver downstream of "
        "a forwarding (a mailing list, an alias) can rely on what this gateway found.",
    )

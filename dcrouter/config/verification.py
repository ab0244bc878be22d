"""The schema of ``smtpConfig.verification``: SPF, DKIM, DMARC and ARC checks of incoming mail, and what the
chain does with a DMARC failure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dcrouter.config import values
from dcrouter.config.schema import Report, block_check, checked, join, option


@block_check("dmarc", "on_dmarc_reject", "on_dmarc_quarantine")
def verification_actions(verification: VerificationConfig, path: str, report: Report) -> None:
    acting = [
        key
        for key, value in (
            ("onDmarcReject", verification.on_dmarc_reject),
            ("onDmarcQuarantine", verification.on_dmarc_quarantine),
        )
        if value != "tag"
    ]
    if acting and not verification.dmarc:
        report.error(join(path, acting[0]), f"acts on DMARC results, but {join(path, 'dmarc')} is false")


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
    on_dmarc_reject: Literal["tag", "reject", "quarantine"] = option(
        "tag",
        doc="Mail failing DMARC whose domain publishes p=reject: `tag` (only the header), `reject` "
        "(550 5.7.1) or `quarantine`.",
    )
    on_dmarc_quarantine: Literal["tag", "reject", "quarantine"] = option(
        "tag",
        doc="Mail failing DMARC whose domain publishes p=quarantine: `tag`, `reject` (550 5.7.1) or "
        "`quarantine`.",
    )
    arc_sign: bool = option(False, unsupported="ARC sealing on relay is not built yet.")

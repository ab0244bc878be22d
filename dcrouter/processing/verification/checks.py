"""The checks of one received message, run in a worker thread: SPF (RFC 7208, pyspf) for the MAIL FROM and
HELO identities, every DKIM signature (RFC 6376, dkimpy), the ARC chain (RFC 8617, dkimpy) and DMARC
(RFC 7489: policy discovery and identifier alignment here, organizational domains from the Public Suffix
List of the ``publicsuffixlist`` package).

Every lookup goes through a :class:`~dcrouter.processing.verification.dns.BlockingDns` (``twisted.names``
with ``mtaConfig``'s resolvers). pyspf looks names up through its module-level ``DNSLookup`` (the seam its
own test suite replaces); it is pointed here, once, at the lookups of the verification running in the
calling thread, so no pyspf query in this process ever reaches the system resolver.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import Any

import dkim
import spf
from dkim.util import parse_tag_value
from publicsuffixlist import PublicSuffixList

from dcrouter.processing.verification.dns import BlockingDns, DnsTemporaryError

#: DKIM signatures verified per message; the rest are reported as not checked (each costs a DNS lookup and
#: an RSA operation, and a sender could add hundreds).
MAX_SIGNATURES = 10
#: Seconds one SPF evaluation may take in all (RFC 7208 §4.6.4 suggests at least 20).
SPF_TIME_LIMIT = 20

_psl = PublicSuffixList()
_current = threading.local()


def _spf_lookup(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> list[Any]:
    lookups: BlockingDns | None = getattr(_current, "dns", None)
    if lookups is None:
        raise spf.TempError("DNS: no resolver for this thread")
    try:
        return lookups.spf_lookup(name, qtype)
    except DnsTemporaryError as e:
        raise spf.TempError(f"DNS {e}") from None


spf.DNSLookup = _spf_lookup


@dataclass
class SpfResult:
    identity: str  # "mailfrom" or "helo"
    domain: str
    result: str  # pass, fail, softfail, neutral, none, temperror, permerror
    explanation: str = ""


@dataclass
class DkimResult:
    result: str  # pass, fail, neutral (not checked), temperror, permerror
    domain: str = ""
    selector: str = ""
    identity: str = ""
    b: str = ""  # the first characters of b=, which tell signatures of one domain apart (RFC 6008)
    reason: str = ""


@dataclass
class DmarcResult:
    result: str  # pass, fail, none, temperror, permerror
    from_domain: str = ""
    policy: str = ""  # the policy that applies to the From domain: none, quarantine, reject
    reason: str = ""


@dataclass
class ArcResult:
    result: str  # pass, fail, none
    reason: str = ""


@dataclass
class Results:
    spf: list[SpfResult] = field(default_factory=list)
    dkim: list[DkimResult] = field(default_factory=list)
    dmarc: DmarcResult | None = None
    arc: ArcResult | None = None


@dataclass(frozen=True)
class Identities:
    """What the session said: the client's address, its HELO name and the MAIL FROM address."""

    ip: str
    helo: str
    mail_from: str


def verify(
    message: bytes,
    who: Identities,
    lookups: BlockingDns,
    *,
    check_spf: bool = True,
    check_dkim: bool = True,
    check_dmarc: bool = True,
    check_arc: bool = True,
) -> Results:
    """Run the checks asked for on ``message`` (the bytes as received, CRLF line ends)."""
    results = Results()
    _current.dns = lookups
    try:
        if check_spf or check_dmarc:
            results.spf = spf_results(who)
        if check_dkim or check_dmarc:
            results.dkim = dkim_results(message, lookups)
        if check_arc:
            results.arc = arc_result(message, lookups)
        if check_dmarc:
            results.dmarc = dmarc_result(message, results.spf, results.dkim, lookups)
    finally:
        _current.dns = None
    if not check_spf:
        results.spf = []
    if not check_dkim:
        results.dkim = []
    return results


# -- SPF --


def spf_results(who: Identities) -> list[SpfResult]:
    """The MAIL FROM identity (``postmaster@HELO`` for the null sender, RFC 7208 §2.4) and the HELO
    identity (§2.3), in that order; HELO is left out when it is not a domain name (an address literal)."""
    out = []
    helo = who.helo.strip()
    helo_is_name = bool(helo) and not helo.startswith("[") and "." in helo
    sender = who.mail_from or (f"postmaster@{helo}" if helo_is_name else "")
    if sender:
        out.append(_spf("mailfrom", who.ip, sender, helo))
    if helo_is_name:
        out.append(_spf("helo", who.ip, f"postmaster@{helo}", helo))
    return out


def _spf(identity: str, ip: str, sender: str, helo: str) -> SpfResult:
    domain = sender.rpartition("@")[2].lower()
    try:
        query = spf.query(i=ip, s=sender, h=helo or domain, timeout=SPF_TIME_LIMIT, querytime=SPF_TIME_LIMIT)
        result, _code, explanation = query.check()
    except spf.TempError as e:
        return SpfResult(identity, domain, "temperror", str(e))
    except Exception as e:  # noqa: BLE001 (pyspf raises plain exceptions for names it cannot query)
        return SpfResult(identity, domain, "permerror", str(e))
    return SpfResult(identity, domain, str(result), str(explanation))


# -- DKIM --


def dkim_results(message: bytes, lookups: BlockingDns) -> list[DkimResult]:
    """One result per DKIM-Signature field, top first (at most :data:`MAX_SIGNATURES` are verified)."""
    try:
        verifier = dkim.DKIM(message, minkey=1024)
    except dkim.DKIMException as e:
        return [DkimResult("permerror", reason=str(e))]
    signatures = [value for name, value in verifier.headers if name.lower() == b"dkim-signature"]
    out = []
    for index, value in enumerate(signatures):
        try:
            tags = parse_tag_value(value)
        except dkim.DKIMException as e:
            out.append(DkimResult("permerror", reason=str(e)))
            continue
        found = DkimResult(
            "neutral",
            domain=_text(tags.get(b"d", b"")).lower(),
            selector=_text(tags.get(b"s", b"")),
            identity=_text(tags.get(b"i", b"")),
            b=_text(b"".join(tags.get(b"b", b"").split()))[:8],
        )
        if index >= MAX_SIGNATURES:
            found.reason = f"not checked: more than {MAX_SIGNATURES} signatures"
            out.append(found)
            continue
        failures = len(lookups.failures)
        try:
            valid = verifier.verify(idx=index, dnsfunc=lookups.dkim_txt)
        except dkim.DKIMException as e:
            # dkimpy raises for a body that does not match as for a malformed signature; only the
            # latter is a permanent error (RFC 6376 §6.1.3 and RFC 8601 §2.7.1).
            if "body hash mismatch" in str(e):
                found.result, found.reason = "fail", "body hash mismatch"
            else:
                found.result, found.reason = "permerror", str(e)
        else:
            if valid:
                found.result = "pass"
            elif len(lookups.failures) > failures:
                found.result, found.reason = "temperror", "key lookup failed"
            else:
                found.result, found.reason = "fail", "signature did not verify"
        out.append(found)
    return out


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace")


# -- ARC --


def arc_result(message: bytes, lookups: BlockingDns) -> ArcResult:
    try:
        cv, _sets, reason = dkim.ARC(message, minkey=1024).verify(dnsfunc=lookups.dkim_txt)
    except dkim.DKIMException as e:
        return ArcResult("fail", str(e))
    if cv == dkim.CV_None:
        return ArcResult("none")
    if cv == dkim.CV_Pass:
        return ArcResult("pass")
    return ArcResult("fail", str(reason))


# -- DMARC --


def organizational_domain(domain: str) -> str:
    """The registrable domain of ``domain`` (RFC 7489 §3.2), by the Public Suffix List."""
    domain = domain.rstrip(".").lower()
    return _psl.privatesuffix(domain) or domain


def from_domain(message: bytes) -> str | None:
    """The domain of the message's one ``From`` mailbox; None when there is not exactly one field with
    exactly one address (RFC 7489 §6.6.1 leaves those to the receiver: they are a permerror here)."""
    head = message.split(b"\r\n\r\n", 1)[0]
    fields = _unfolded_from(head)
    if len(fields) != 1:
        return None
    addresses = [addr for _name, addr in getaddresses(fields) if addr]
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None
    domain = addresses[0].rpartition("@")[2].strip().rstrip(".").lower()
    return domain or None


def _unfolded_from(head: bytes) -> list[str]:
    fields: list[str] = []
    inside = False
    for line in head.split(b"\r\n"):
        text = line.decode("utf-8", "replace")
        if text[:1] in (" ", "\t"):
            if inside:
                fields[-1] += text
            continue
        name, colon, value = text.partition(":")
        inside = bool(colon) and name.strip().lower() == "from"
        if inside:
            fields.append(value)
    return fields


@dataclass
class DmarcRecord:
    policy: str
    subdomain_policy: str | None
    adkim: str
    aspf: str


def parse_dmarc_record(text: str) -> DmarcRecord | None:
    """A ``v=DMARC1`` record's tags (RFC 7489 §6.3); None when it is not one. A record without a valid
    ``p`` is treated as ``p=none`` when it names a report address (§6.6.3), else as no record."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        key, eq, value = part.strip().partition("=")
        if eq:
            tags.setdefault(key.strip().lower(), value.strip())
    if not text.lstrip().startswith("v=") or tags.get("v") != "DMARC1":
        return None
    policy = tags.get("p", "").lower()
    if policy not in ("none", "quarantine", "reject"):
        if "rua" not in tags:
            return None
        policy = "none"
    subdomain = tags.get("sp", "").lower()
    return DmarcRecord(
        policy=policy,
        subdomain_policy=subdomain if subdomain in ("none", "quarantine", "reject") else None,
        adkim="s" if tags.get("adkim", "r").lower() == "s" else "r",
        aspf="s" if tags.get("aspf", "r").lower() == "s" else "r",
    )


def _dmarc_record(domain: str, lookups: BlockingDns) -> DmarcRecord | None:
    found = []
    for text in lookups.txt(f"_dmarc.{domain}"):
        record = parse_dmarc_record(text.decode("utf-8", "replace"))
        if record is not None:
            found.append(record)
    # More than one record: as if none (RFC 7489 §6.6.3 step 5).
    return found[0] if len(found) == 1 else None


def _aligned(domain: str, author: str, mode: str) -> bool:
    domain = domain.rstrip(".").lower()
    if mode == "s":
        return domain == author
    return organizational_domain(domain) == organizational_domain(author)


def dmarc_result(
    message: bytes, spf_results: list[SpfResult], dkim_results: list[DkimResult], lookups: BlockingDns
) -> DmarcResult:
    author = from_domain(message)
    if author is None:
        return DmarcResult("permerror", reason="not exactly one From address")
    org = organizational_domain(author)
    try:
        record = _dmarc_record(author, lookups)
        policy_source = author
        if record is None and org != author:
            record = _dmarc_record(org, lookups)
            policy_source = org
    except DnsTemporaryError as e:
        return DmarcResult("temperror", author, reason=str(e))
    if record is None:
        return DmarcResult("none", author)
    policy = record.policy
    if policy_source != author and record.subdomain_policy is not None:
        policy = record.subdomain_policy
    mail_from = next((r for r in spf_results if r.identity == "mailfrom"), None)
    if (
        mail_from is not None
        and mail_from.result == "pass"
        and _aligned(mail_from.domain, author, record.aspf)
    ):
        return DmarcResult("pass", author, policy, "SPF aligned")
    for signature in dkim_results:
        if signature.result == "pass" and _aligned(signature.domain, author, record.adkim):
            return DmarcResult("pass", author, policy, f"DKIM aligned ({signature.domain})")
    # Not passing because an answer is missing is not a failure yet: the sender may be right.
    if (mail_from is not None and mail_from.result == "temperror") or any(
        s.result == "temperror" and _aligned(s.domain, author, record.adkim) for s in dkim_results
    ):
        return DmarcResult("temperror", author, policy, "SPF or DKIM lookup failed")
    return DmarcResult("fail", author, policy, "neither SPF nor DKIM aligned and passed")

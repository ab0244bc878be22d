"""The ``Authentication-Results`` field (RFC 8601) of a verification, and the authserv-id of a field that
arrived with a message (fields claiming the gateway's own id are removed before its own is added, §5)."""

from __future__ import annotations

import re

from dcrouter.processing.verification.checks import Results

_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+\-./=?^_`{|}~@]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _value(text: str) -> str:
    """``text`` as a property value: as it is when a token, else a quoted string (RFC 2045 ``value``)."""
    if _TOKEN.match(text):
        return text
    cleaned = _CONTROL.sub("", text).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{cleaned}"'


def _comment(text: str) -> str:
    cleaned = _CONTROL.sub("", text).replace("\\", "").replace("(", "[").replace(")", "]")
    return f" ({cleaned[:120]})" if cleaned else ""


def authentication_results(authserv_id: str, results: Results) -> str:
    """The field's value: ``authserv-id;`` then one resinfo per result, or ``none`` when nothing was
    checked."""
    parts: list[str] = []
    for spf in results.spf:
        prop = "smtp.mailfrom" if spf.identity == "mailfrom" else "smtp.helo"
        parts.append(f"spf={spf.result} {prop}={_value(spf.domain)}")
    signatures = results.dkim
    if not signatures and results.dmarc is not None:
        parts.append("dkim=none")
    for sig in signatures:
        text = f"dkim={sig.result}"
        if sig.result not in ("pass",):
            text += _comment(sig.reason)
        if sig.domain:
            text += f" header.d={_value(sig.domain)}"
        if sig.selector:
            text += f" header.s={_value(sig.selector)}"
        if sig.b:
            text += f" header.b={_value(sig.b)}"
        parts.append(text)
    if results.dmarc is not None:
        dmarc = results.dmarc
        text = f"dmarc={dmarc.result}"
        if dmarc.policy:
            text += _comment(f"p={dmarc.policy}")
        elif dmarc.result != "none":
            text += _comment(dmarc.reason)
        if dmarc.from_domain:
            text += f" header.from={_value(dmarc.from_domain)}"
        parts.append(text)
    if results.arc is not None:
        parts.append(f"arc={results.arc.result}{_comment(results.arc.reason)}")
    if not parts:
        return f"{authserv_id}; none"
    return f"{authserv_id}; " + "; ".join(parts)


def authserv_id(value: str) -> str:
    """The authserv-id an ``Authentication-Results`` value starts with (comments and an optional version
    skipped), lower-cased; ``""`` when there is none."""
    text = value.strip()
    while text.startswith("("):
        depth, end = 0, len(text)
        for position, char in enumerate(text):
            depth += char == "("
            depth -= char == ")"
            if depth == 0:
                end = position
                break
        text = text[end + 1 :].lstrip()
    if text.startswith('"'):
        end = text.find('"', 1)
        return text[1:end].lower() if end > 0 else ""
    return re.split(r"[\s;(]", text, maxsplit=1)[0].lower()

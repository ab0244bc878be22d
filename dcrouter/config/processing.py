"""The schema of message processing: ``smtpConfig.scanners``, ``smtpConfig.transformations`` and
``smtpConfig.mimeLimits``.

A scanner or transformation entry is one table whose ``type`` says which keys apply; the keys of other types
are refused by the block checks here (``blockedExtensions`` on a ``spam`` scanner is a mistake, not a no-op).
A ``type`` that is not built in names a plugin (an entry point or a dotted path, see docs/plugins.md); its
``options`` table is then checked by the plugin's own schema.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, Literal

from dcrouter.config import plugins, values
from dcrouter.config.schema import Report, block_check, checked, join, option, set_in_file
from dcrouter.mail.headers import HeaderError, check_name, check_value

SCANNER_TYPES = ("spam", "virus", "attachment")
TRANSFORMATION_TYPES = (
    "addHeader",
    "removeHeader",
    "modifyHeader",
    "rewriteAddress",
    "removeAttachment",
    "sanitizeAttachment",
    "addFooter",
    "dkimSign",
    "srsForward",
    "srsReverse",
)
Action = Literal["tag", "reject", "quarantine", "discard"]

#: Keys each built-in type may use (besides ``type``, ``name``, ``action`` and the error policies).
_SCANNER_KEYS: dict[str, frozenset[str]] = {
    "spam": frozenset(
        {"engine", "threshold", "host", "port", "socket", "timeout", "max_size", "on_error", "subject_prefix"}
    ),
    "virus": frozenset(
        {"engine", "host", "port", "socket", "timeout", "max_size", "on_error", "on_unscannable"}
    ),
    "attachment": frozenset({"blocked_extensions", "blocked_types", "scan_archives", "on_unscannable"}),
}
_ENGINES = {"spam": ("builtin", "spamassassin", "rspamd"), "virus": ("clamav",)}


def _is_builtin(kind: str, value: str) -> bool:
    return value in (SCANNER_TYPES if kind == "scanner" else TRANSFORMATION_TYPES)


def _plugin_type(kind: str, entry: ScannerConfig | TransformationConfig, path: str, report: Report) -> None:
    """A type that is not built in must name a loadable plugin whose options pass its own schema."""
    plugins.check_config(kind, entry, path, report)


def _foreign_keys(
    cls: type, entry: object, allowed: frozenset[str], path: str, report: Report, what: str
) -> None:
    """Keys the file sets that the entry's type does not use."""
    for f in fields(cls):
        if f.name in allowed or f.name in ("type", "name", "action", "options"):
            continue
        if set_in_file(entry, f.name):
            key = f.metadata.get("key") or _camel(f.name)
            report.error(join(path, key), f"does not apply to {what}")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


@block_check("type", "options", "engine", "blocked_extensions", "blocked_types", "socket", "port")
def scanner_entry(entry: ScannerConfig, path: str, report: Report) -> None:
    if not _is_builtin("scanner", entry.type):
        _plugin_type("scanner", entry, path, report)
        _foreign_keys(
            ScannerConfig,
            entry,
            frozenset({"on_error", "on_unscannable", "timeout"}),
            path,
            report,
            "a plugin",
        )
        return
    if entry.options:
        report.error(join(path, "options"), "only plugin scanners take an options table")
    _foreign_keys(ScannerConfig, entry, _SCANNER_KEYS[entry.type], path, report, f"a {entry.type!r} scanner")
    engines = _ENGINES.get(entry.type)
    if engines is not None and entry.engine is not None and entry.engine not in engines:
        report.error(
            join(path, "engine"), f"must be one of {', '.join(engines)} for a {entry.type!r} scanner"
        )
    if entry.type == "attachment" and not entry.blocked_extensions and not entry.blocked_types:
        report.error(path, "an attachment scanner needs blockedExtensions or blockedTypes")
    if entry.socket is not None and entry.port is not None:
        report.error(join(path, "socket"), "give either socket or port, not both")


@checked(scanner_entry)
@dataclass(frozen=True)
class ScannerConfig:
    type: str = option(
        doc="`spam`, `virus` or `attachment`; any other value names a plugin scanner (an entry point in "
        "the `dcrouter.scanners` group, or a dotted path `package.module:Class`).",
        check=values.not_empty,
    )
    action: Action = option(
        "reject",
        doc="On a hit: `tag` (add headers and accept), `reject` (5xx at the end of DATA), `quarantine` (keep "
        "it, never deliver; listable and releasable) or `discard` (answer 250, drop it, log it).",
    )
    name: str | None = option(
        None,
        addition=True,
        doc="Name in logs, headers and replies (default: the type).",
        check=values.one_line,
    )
    threshold: float = option(5.0, doc="spam: score at or above which a message is spam.")
    blocked_extensions: list[str] = option(
        factory=list,
        doc="attachment: file name extensions refused (`.exe`; any case), checked on every name a part "
        "declares, on double extensions (`invoice.pdf.exe`) and on names inside archives.",
    )
    blocked_types: list[str] = option(
        factory=list,
        addition=True,
        doc="attachment: content types refused whether declared or sniffed from the content "
        "(`application/x-dosexec`).",
    )
    scan_archives: bool = option(
        True,
        addition=True,
        doc="attachment: look at the names inside archives (zip, tar, gzip, bzip2, xz, RAR), and inside "
        "archives in them down to `mimeLimits.maxArchiveDepth`; an archive that cannot be listed is "
        "unscannable.",
    )
    engine: str | None = option(
        None,
        addition=True,
        doc="spam: `builtin` (heuristics, no daemon; the default), `spamassassin` (spamd) or `rspamd` "
        "(its HTTP API). virus: `clamav` (clamd; the default).",
    )
    host: str = option(
        "127.0.0.1", addition=True, doc="spam/virus: the daemon's host.", check=values.host_or_ip
    )
    port: int | None = option(
        None,
        addition=True,
        doc="spam/virus: the daemon's TCP port (default: spamd 783, rspamd 11333, clamd 3310).",
        check=values.port,
    )
    socket: str | None = option(
        None, addition=True, doc="spam/virus: the daemon's Unix socket instead of host and port."
    )
    timeout: int = option(
        30_000,
        addition=True,
        doc="Milliseconds one scan may take before the daemon counts as down.",
        check=values.duration,
    )
    max_size: int | None = option(
        None,
        addition=True,
        doc="Largest message sent to the daemon, in bytes (default: spam 1 MiB, larger ones are not "
        "spam-checked, as with spamc; virus 25 MiB, larger ones are unscannable).",
        check=values.positive,
    )
    on_error: Literal["tempfail", "accept"] = option(
        "tempfail",
        addition=True,
        doc="When the scanner cannot answer (daemon down, timeout): `tempfail` (451 4.7.0, the client "
        "retries) or `accept` (logged, passed unscanned).",
    )
    on_unscannable: Literal["action", "tempfail", "accept"] | None = option(
        None,
        addition=True,
        doc="When the message cannot be fully inspected (limits, a zip bomb, a broken structure): `action` "
        "(treated as a hit: the default), `tempfail` or `accept` (logged).",
    )
    subject_prefix: str | None = option(
        None,
        addition=True,
        doc="spam with action `tag`: put before the Subject of spam (`[SPAM] `).",
        check=values.one_line,
    )
    options: dict[str, Any] = option(
        factory=dict, addition=True, doc="A plugin scanner's own options, checked by the plugin's schema."
    )

    @property
    def label(self) -> str:
        return self.name or self.type


_TRANSFORMATION_KEYS: dict[str, frozenset[str]] = {
    "addHeader": frozenset({"header", "value", "domains"}),
    "removeHeader": frozenset({"header", "domains"}),
    "modifyHeader": frozenset({"header", "pattern", "replacement", "domains"}),
    "rewriteAddress": frozenset({"map", "pattern", "replacement", "scope"}),
    "removeAttachment": frozenset({"extensions", "types", "text"}),
    "sanitizeAttachment": frozenset({"extensions", "types", "text"}),
    "addFooter": frozenset({"text", "html", "domains"}),
    "dkimSign": frozenset({"domains", "domain_name", "key_selector", "private_key"}),
    "srsForward": frozenset({"srs_domain", "secrets", "local_domains"}),
    "srsReverse": frozenset({"srs_domain", "secrets", "max_age_days"}),
}
_TRANSFORMATION_NEEDS: dict[str, tuple[str, ...]] = {
    "addHeader": ("header", "value"),
    "removeHeader": ("header",),
    "modifyHeader": ("header", "pattern"),
    "addFooter": (),
    "dkimSign": ("domains",),
    "srsForward": ("srs_domain", "secrets"),
    "srsReverse": ("srs_domain", "secrets"),
}

#: Shortest SRS secret: the HMAC key that keeps forged SRS addresses (an open relay) out.
SRS_SECRET_MIN = 16


def srs_secret(value: str) -> str | None:
    """An SRS secret of at least :data:`SRS_SECRET_MIN` characters (the message never repeats it)."""
    if len(value) < SRS_SECRET_MIN:
        return f"must be at least {SRS_SECRET_MIN} characters (it has {len(value)})"
    return None


def srs_max_age(value: int) -> str | None:
    # SRS timestamps count days modulo 1024: an older address would look new again.
    if not 1 <= value <= 1023:
        return f"must be 1 to 1023 days: {value}"
    return None


@block_check(
    "type",
    "options",
    "header",
    "value",
    "replacement",
    "text",
    "pattern",
    "map",
    "extensions",
    "types",
    "html",
    "domains",
    "domain_name",
    "key_selector",
    "private_key",
    "srs_domain",
    "secrets",
)
def transformation_entry(entry: TransformationConfig, path: str, report: Report) -> None:
    if not _is_builtin("transformation", entry.type):
        _plugin_type("transformation", entry, path, report)
        _foreign_keys(TransformationConfig, entry, frozenset(), path, report, "a plugin")
        return
    if entry.options:
        report.error(join(path, "options"), "only plugin transformations take an options table")
    kind = entry.type
    _foreign_keys(
        TransformationConfig, entry, _TRANSFORMATION_KEYS[kind], path, report, f"a {kind!r} transformation"
    )
    for needed in _TRANSFORMATION_NEEDS.get(kind, ()):
        if getattr(entry, needed) in (None, [], {}):
            report.error(join(path, _camel(needed)), f"is required by a {kind!r} transformation")
    if entry.header is not None:
        try:
            check_name(entry.header)
        except HeaderError as e:
            report.error(join(path, "header"), str(e))
    for key in ("value", "replacement", "text"):
        value = getattr(entry, key)
        if value is None or (key == "text" and kind == "addFooter"):
            continue
        try:
            check_value(value)
        except HeaderError as e:
            report.error(join(path, key), str(e))
    if entry.pattern is not None:
        try:
            re.compile(entry.pattern)
        except re.error as e:
            report.error(join(path, "pattern"), f"not a regular expression: {e}")
    if kind == "rewriteAddress" and not entry.map and entry.pattern is None:
        report.error(path, "a rewriteAddress transformation needs map or pattern (with replacement)")
    if kind == "rewriteAddress" and entry.pattern is not None and entry.replacement is None:
        report.error(join(path, "replacement"), "is required with pattern")
    if kind in ("removeAttachment", "sanitizeAttachment") and not entry.extensions and not entry.types:
        report.error(path, f"a {kind!r} transformation needs extensions or types")
    if kind == "addFooter" and entry.text is None and entry.html is None:
        report.error(path, "an addFooter transformation needs text or html")
    if kind == "dkimSign":
        given = [k for k in ("domain_name", "key_selector", "private_key") if getattr(entry, k) is not None]
        if given and len(given) != 3:
            report.error(
                path,
                "give domainName, keySelector and privateKey together (or none: the key of the "
                "domainConfigs entry of each domain is used)",
            )


@checked(transformation_entry)
@dataclass(frozen=True)
class TransformationConfig:
    type: str = option(
        doc="`addHeader`, `removeHeader`, `modifyHeader`, `rewriteAddress`, `removeAttachment`, "
        "`sanitizeAttachment`, `addFooter`, `dkimSign`, `srsForward` or `srsReverse`; any other value names "
        "a plugin transformation (entry point group `dcrouter.transformations`, or `package.module:Class`).",
        check=values.not_empty,
    )
    header: str | None = option(None, doc="add/remove/modifyHeader: the field name.")
    value: str | None = option(
        None,
        doc="addHeader: the value; `{queueId}`, `{sender}`, `{hostname}`, `{peer}` and `{date}` are "
        "replaced (tracking headers).",
    )
    pattern: str | None = option(
        None, doc="modifyHeader/rewriteAddress: a regular expression (Python syntax) to replace."
    )
    replacement: str | None = option(
        None, doc="modifyHeader/rewriteAddress: what `pattern` matches becomes (`\\1` for groups)."
    )
    map: dict[str, str] = option(
        factory=dict,
        doc="rewriteAddress: whole addresses or `@domain` keys mapped to their replacements.",
    )
    scope: Literal["envelope", "headers", "both"] = option(
        "both",
        doc="rewriteAddress: the envelope (MAIL FROM, RCPT TO), the From/To/Cc/Reply-To/Sender headers, or "
        "both.",
    )
    extensions: list[str] = option(
        factory=list, doc="remove/sanitizeAttachment: file name extensions of the parts to replace."
    )
    types: list[str] = option(
        factory=list,
        doc="remove/sanitizeAttachment: declared or sniffed content types of the parts to replace.",
    )
    text: str | None = option(
        None,
        doc="addFooter: the plain-text footer. remove/sanitizeAttachment: the text of the part that replaces "
        "an attachment.",
    )
    html: str | None = option(None, doc="addFooter: the HTML footer (default: the text one, escaped).")
    domains: list[str] = option(
        factory=list,
        doc="dkimSign: sign mail whose From domain is one of these. add/remove/modifyHeader, addFooter: "
        "only mail to a recipient in these domains (empty: all mail).",
        each=values.domain_pattern,
    )
    domain_name: str | None = option(
        None, doc="dkimSign: d= (default: the domainConfigs entry's dkimOptions)."
    )
    key_selector: str | None = option(None, doc="dkimSign: s=.")
    private_key: str | None = option(
        None, doc="dkimSign: the PEM private key, inline or a file path.", check=values.dkim_private_key
    )
    srs_domain: str | None = option(
        None,
        addition=True,
        doc="srsForward/srsReverse: the domain of SRS addresses; its mail must reach this gateway "
        "(domainConfigs or relaying) so bounces can be reversed.",
        check=values.host_name,
    )
    secrets: list[str] = option(
        factory=list,
        addition=True,
        doc="srsForward/srsReverse: HMAC secrets of at least 16 characters; the first signs, all verify "
        "(add the new one first, drop the old one after maxAgeDays).",
        each=srs_secret,
    )
    local_domains: list[str] = option(
        factory=list,
        addition=True,
        doc="srsForward: senders in these domains (exact or `*.` wildcard) are not rewritten; the SRS "
        "domain never is.",
        each=values.domain_pattern,
    )
    max_age_days: int = option(
        21,
        addition=True,
        doc="srsReverse: days an SRS address stays valid; older ones are refused (550 5.1.1).",
        check=srs_max_age,
    )
    options: dict[str, Any] = option(
        factory=dict, addition=True, doc="A plugin transformation's own options, checked by its schema."
    )


@dataclass(frozen=True)
class MimeLimitsConfig:
    max_header_bytes: int = option(
        256 * 1024, doc="Largest header block (of the message or a part), in bytes.", check=values.positive
    )
    max_depth: int = option(
        20, doc="Deepest nesting of multiparts and attached messages.", check=values.positive
    )
    max_parts: int = option(1000, doc="Most body parts, all levels together.", check=values.positive)
    max_decoded_bytes: int = option(
        64 * 1024 * 1024, doc="Most decoded content of all parts together, in bytes.", check=values.positive
    )
    max_archive_bytes: int = option(
        16 * 1024 * 1024,
        doc="Largest archive attachment (zip, tar, gzip, bzip2, xz, RAR) whose entries are listed, in bytes, "
        "and largest archive inside one that is decompressed to be listed (0: archives are not opened; a "
        "larger one is unscannable).",
        check=values.non_negative,
    )
    max_archive_expanded: int = option(
        256 * 1024 * 1024,
        doc="Largest total the entries of an archive attachment, archives inside it included, may declare "
        "(or turn out to hold) uncompressed; more is a zip bomb (unscannable).",
        check=values.positive,
    )
    max_archive_entries: int = option(
        10_000,
        doc="Most entries in an archive attachment, archives inside it included; more is unscannable.",
        check=values.positive,
    )
    max_archive_depth: int = option(
        3,
        doc="Archive levels opened: 1 lists the attachment only, 3 also archives inside it and archives "
        "inside those (a tar in a gzip counts as one); an archive nested deeper is unscannable.",
        check=values.positive,
    )
    max_archive_ratio: int = option(
        100,
        doc="An archive entry that expands to more than this many times its compressed size, and to more "
        "than 1 MiB, is a zip bomb (unscannable).",
        check=values.positive,
    )

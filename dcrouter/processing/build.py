"""The processing chain of a configuration: ``smtpConfig`` → scanner stages, transformations, DKIM signers.

The feature flags decide what runs: ``contentScanning`` the scanners, ``headerProcessing`` the header
transformations (addHeader, removeHeader, modifyHeader and domainConfigs' headerInfo), ``dkimSigning`` the
signers (domainConfigs' signDkim and the dkimSign transformations, always after every other change).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from dcrouter.config import plugins
from dcrouter.config.processing import SCANNER_TYPES, ScannerConfig, TransformationConfig
from dcrouter.config.smtp import SmtpConfig
from dcrouter.interfaces import IScanner, ITransformation
from dcrouter.net.reactor import IRouterReactor
from dcrouter.processing.dkim import DkimSigner
from dcrouter.processing.mime import MimeLimits
from dcrouter.processing.processor import DEFAULT_LIMITS, ScannerStage
from dcrouter.processing.transforms.dkim import DkimSign
from dcrouter.processing.transforms.headers import DomainHeaders, build_header_transformation

HEADER_TYPES = frozenset({"addHeader", "removeHeader", "modifyHeader"})


@dataclass
class Chain:
    scanners: list[ScannerStage] = field(default_factory=list)
    transformations: list[ITransformation] = field(default_factory=list)
    signers: list[ITransformation] = field(default_factory=list)
    limits: MimeLimits = field(default_factory=MimeLimits)
    max_parallel: int = 64
    timeout: float = 120.0

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``EmailProcessor`` and ``EmailProcessor.update_options``."""
        return {
            "scanners": self.scanners,
            "transformations": self.transformations,
            "signers": self.signers,
            "limits": self.limits,
            "max_parallel": self.max_parallel,
            "timeout": self.timeout,
        }


def build_scanner(entry: ScannerConfig, reactor: IRouterReactor) -> IScanner:
    """The scanner of one checked ``scanners`` entry."""
    if entry.type == "attachment":
        from dcrouter.processing.scanners.attachment import AttachmentScanner

        return AttachmentScanner(entry)
    if entry.type == "spam":
        engine = entry.engine or "builtin"
        if engine == "spamassassin":
            from dcrouter.processing.scanners.spamd import SpamdScanner

            return SpamdScanner(entry, reactor)
        if engine == "rspamd":
            from dcrouter.processing.scanners.rspamd import RspamdScanner

            return RspamdScanner(entry, reactor)
        from dcrouter.processing.scanners.heuristics import HeuristicSpamScanner

        return HeuristicSpamScanner(entry)
    if entry.type == "virus":
        from dcrouter.processing.scanners.clamd import ClamdScanner

        return ClamdScanner(entry, reactor)
    scanner: IScanner = plugins.instantiate("scanner", entry, reactor)
    return scanner


def build_transformation(
    entry: TransformationConfig,
    hostname: str,
    reactor: IRouterReactor | None = None,
    limits: MimeLimits = DEFAULT_LIMITS,
) -> ITransformation:
    """The transformation of one checked ``transformations`` entry (not dkimSign: see :func:`build_chain`)."""
    built = build_header_transformation(entry, hostname)
    if built is not None:
        return built
    if entry.type in ("removeAttachment", "sanitizeAttachment"):
        from dcrouter.processing.transforms.attachments import RemoveAttachment, SanitizeAttachment
        from dcrouter.processing.transforms.mimerewrite import RewriteLimits

        kind = RemoveAttachment if entry.type == "removeAttachment" else SanitizeAttachment
        return kind(entry, limits=RewriteLimits.from_mime(limits))
    if entry.type == "addFooter":
        from dcrouter.processing.transforms.footer import AddFooter
        from dcrouter.processing.transforms.mimerewrite import RewriteLimits

        return AddFooter(entry, limits=RewriteLimits.from_mime(limits))
    if entry.type in ("srsForward", "srsReverse"):
        from dcrouter.processing.transforms.srs import SrsForward, SrsReverse

        assert entry.srs_domain is not None  # required by the schema
        now = reactor.seconds if reactor is not None else time.time
        if entry.type == "srsForward":
            return SrsForward(entry.srs_domain, entry.secrets, local_domains=entry.local_domains, now=now)
        return SrsReverse(entry.srs_domain, entry.secrets, max_age_days=entry.max_age_days, now=now)
    transformation: ITransformation = plugins.instantiate("transformation", entry, reactor)
    return transformation


def build_chain(config: SmtpConfig, reactor: IRouterReactor, resolver: Any = None) -> Chain:
    """The chain of ``config``; ``resolver`` (a ``twisted.names`` resolver on ``mtaConfig``'s servers) is
    required when ``verification`` is enabled."""
    limits = config.mime_limits
    chain = Chain(
        limits=MimeLimits(
            max_header_bytes=limits.max_header_bytes,
            max_depth=limits.max_depth,
            max_parts=limits.max_parts,
            max_decoded_bytes=limits.max_decoded_bytes,
            max_archive_bytes=limits.max_archive_bytes,
            max_archive_expanded=limits.max_archive_expanded,
            max_archive_entries=limits.max_archive_entries,
            max_archive_depth=limits.max_archive_depth,
            max_archive_ratio=limits.max_archive_ratio,
        ),
        max_parallel=config.max_parallel_processing,
        timeout=config.processing_timeout / 1000,
    )
    if config.verification.enabled:
        chain.scanners.append(_verification_stage(config, reactor, resolver))
    if config.content_scanning:
        for entry in config.scanners:
            chain.scanners.append(
                ScannerStage(
                    build_scanner(entry, reactor),
                    entry.action,
                    on_error=entry.on_error,
                    on_unscannable=entry.on_unscannable,
                    subject_prefix=entry.subject_prefix,
                    name=entry.name,
                    # Built-in daemon clients enforce timeout themselves, per connection; a plugin's is here.
                    timeout=entry.timeout / 1000 if entry.type not in SCANNER_TYPES else None,
                )
            )
    if config.header_processing:
        fields = [
            (domain.domains, [(h.name, h.value) for h in domain.header_info])
            for domain in config.domain_configs
            if domain.add_headers and domain.header_info
        ]
        if fields:
            chain.transformations.append(DomainHeaders(fields))
    for change in config.transformations:
        if change.type == "dkimSign" or (change.type in HEADER_TYPES and not config.header_processing):
            continue
        chain.transformations.append(build_transformation(change, config.hostname, reactor, chain.limits))
    if config.dkim_signing:
        signers = _signers(config)
        if signers:
            chain.signers.append(DkimSign(signers))
    if config.verification.enabled and config.verification.arc_sign is not None:
        # Last: the seal covers every change, DKIM signatures included.
        chain.signers.append(_arc_seal(config, reactor))
    return chain


def _arc_seal(config: SmtpConfig, reactor: IRouterReactor | None) -> ITransformation:
    from dcrouter.mail.dkimkeys import read_private_key
    from dcrouter.processing.transforms.arc import ArcSeal

    arc = config.verification.arc_sign
    assert arc is not None
    domain, selector, key = arc.domain_name, arc.key_selector, arc.private_key
    if key is None:
        wanted = domain.lower()
        for entry in config.domain_configs:
            opts = entry.dkim_options
            if opts is not None and wanted in (name.lower() for name in entry.domains):
                domain, selector, key = opts.domain_name, opts.key_selector, opts.private_key
                break
    if key is None or selector is None:
        raise ValueError(f"smtpConfig.verification.arcSign: no key for {arc.domain_name!r}")
    now = reactor.seconds if reactor is not None else time.time
    authserv = config.verification.authserv_id or config.hostname
    return ArcSeal(domain, selector, read_private_key(key), authserv, now)


def _verification_stage(config: SmtpConfig, reactor: IRouterReactor, resolver: Any) -> ScannerStage:
    """SPF/DKIM/DMARC/ARC first, before the content scanners: its refusals cost the least. Its findings
    carry their own action (the stage's is ``tag``); a verification that fails outright is 451."""
    from dcrouter.net.cidr import CidrSet
    from dcrouter.processing.scanners.authentication import AuthenticationScanner

    if resolver is None:
        raise ValueError("smtpConfig.verification needs a DNS resolver")
    scanner = AuthenticationScanner(
        config.verification,
        hostname=config.hostname,
        resolver=resolver,
        reactor=reactor,
        relay_networks=CidrSet(config.relay_networks),
    )
    return ScannerStage(scanner, "tag", on_error="tempfail")


def _signers(config: SmtpConfig) -> list[tuple[str, DkimSigner]]:
    keyed: dict[str, DkimSigner] = {}
    pairs: list[tuple[str, DkimSigner]] = []
    for domain in config.domain_configs:
        if domain.dkim_options is None:
            continue
        opts = domain.dkim_options
        signer = DkimSigner.from_options(opts.domain_name, opts.key_selector, opts.private_key)
        for name in domain.domains:
            keyed[name.lower()] = signer
            if domain.sign_dkim:
                pairs.append((name, signer))
    for entry in config.transformations:
        if entry.type != "dkimSign":
            continue
        own = None
        if entry.private_key is not None:
            assert entry.domain_name is not None and entry.key_selector is not None
            own = DkimSigner.from_options(entry.domain_name, entry.key_selector, entry.private_key)
        for name in entry.domains:
            chosen = own or keyed.get(name.lower())
            if chosen is not None:
                pairs.append((name, chosen))
    return pairs

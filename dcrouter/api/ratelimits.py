"""``/api/v1/rate-limits``: the seed's "rate limit adjustment" (docs/api.md, Rate limits).

What it reads and changes: ``smtpConfig.rateLimits`` (tiers and their limits), each ``domainConfigs`` entry's
``rateLimits``, and the outbound ``globalRateLimit``, ``perServerRateLimit`` and ``perDomainRateLimit`` of
``smtpConfig.delivery``. A change is validated by the configuration loader's own code
(:func:`dcrouter.config.schema.build_block`, so the errors are the loader's, with the same key paths) and
applied at once by the router (:class:`RateLimitControl`'s ``apply``); nothing is written to the
configuration file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from dcrouter.api.http import ApiError, Call, Endpoint, Field
from dcrouter.config import values
from dcrouter.config.delivery import DeliveryConfig
from dcrouter.config.domains import RateLimitsConfig
from dcrouter.config.edit import OUTBOUND_RATE_KEYS
from dcrouter.config.ratelimits import IngressLimitsConfig
from dcrouter.config.schema import Report, build_block, file_key
from dcrouter.config.smtp import SmtpConfig
from dcrouter.delivery.manager import DeliveryManager
from dcrouter.log import logger

log = logger(__name__)

#: The keys of ``smtpConfig.delivery`` this endpoint changes.
OUTBOUND_KEYS = OUTBOUND_RATE_KEYS
_OUTBOUND_ATTRS = {
    "globalRateLimit": "global_rate_limit",
    "perServerRateLimit": "per_server_rate_limit",
    "perDomainRateLimit": "per_domain_rate_limit",
}


class InvalidLimits(ApiError):
    """422 with every error of the configuration loader, each starting with its key path."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__(422, "invalid_config", "; ".join(errors))
        self.errors = errors

    def body(self) -> dict[str, Any]:
        body = super().body()
        body["error"]["errors"] = self.errors
        return body


def as_file(value: Any) -> Any:
    """A configuration block as the file spells it (camelCase keys), so that what GET answers can be PUT."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {file_key(f): as_file(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [as_file(v) for v in value]
    if isinstance(value, Mapping):
        return {k: as_file(v) for k, v in value.items()}
    return value


class RateLimitControl:
    """The rate limits of a running router. ``config`` reads the SMTP configuration in force; ``apply``
    puts a new one in force, given with the parts of the body as the file spells them (the router rebuilds
    the ingress limits over the same counters, reshapes outbound delivery and keeps its copy of the file's
    content in step); ``delivery`` answers the outbound limits in force (set_rate_limit included)."""

    def __init__(
        self,
        config: Callable[[], SmtpConfig],
        apply: Callable[[SmtpConfig, Mapping[str, Any]], None],
        delivery: DeliveryManager | None,
        persist: Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self._config = config
        self._apply = apply
        self._delivery = delivery
        self._persist = persist

    async def persist(self, parts: Mapping[str, Any]) -> dict[str, Any]:
        """Write ``parts`` to the configuration file when the router does (``apiConfig.persist``):
        ``{"persisted": bool}``, with ``persistError`` when the write failed (the change stays applied)."""
        if self._persist is None:
            return {"persisted": False}
        return await self._persist(parts)

    def show(self) -> dict[str, Any]:
        config = self._config()
        if self._delivery is not None:
            outbound = self._delivery.shaper.settings()
        else:
            outbound = {k: as_file(getattr(config.delivery, a)) for k, a in _OUTBOUND_ATTRS.items()}
        return {
            "rateLimits": as_file(config.rate_limits),
            "domainConfigs": [
                {"domains": list(entry.domains), "rateLimits": as_file(entry.rate_limits)}
                for entry in config.domain_configs
            ],
            "delivery": outbound,
        }

    def update(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``body`` (any of ``rateLimits``, ``domainConfigs``, ``delivery``; a part left out stays
        as it is, a part given replaces it whole) and put it in force; :class:`InvalidLimits` otherwise."""
        config = self._config()
        report = Report()
        changes: dict[str, Any] = {}
        if "rateLimits" in body:
            limits = build_block(IngressLimitsConfig, body["rateLimits"], "smtpConfig.rateLimits", report)
            changes["rate_limits"] = limits
        if "domainConfigs" in body:
            changes["domain_configs"] = self._domains(config, body["domainConfigs"], report)
        if "delivery" in body:
            changes["delivery"] = self._outbound(config, body["delivery"], report)
        if report.errors:
            raise InvalidLimits(report.errors)
        updated = dataclasses.replace(config, **changes)
        self._apply(updated, {k: body[k] for k in ("rateLimits", "domainConfigs", "delivery") if k in body})
        return self.show()

    @staticmethod
    def _domains(config: SmtpConfig, raw: Any, report: Report) -> Any:
        entries = config.domain_configs
        if not isinstance(raw, list) or len(raw) != len(entries):
            report.error(
                "smtpConfig.domainConfigs",
                f"expected a list of {len(entries)} entries, one per configured domainConfigs entry in order "
                "(as GET answers); entries are added or removed with the routing, not here",
            )
            return None
        updated = []
        for i, (entry, item) in enumerate(zip(entries, raw, strict=True)):
            path = f"smtpConfig.domainConfigs[{i}]"
            if not isinstance(item, Mapping):
                report.error(path, "expected a table with domains and rateLimits")
                continue
            for key in item:
                if key not in ("domains", "rateLimits"):
                    report.error(f"{path}.{key}", "not a rate limit (only domains and rateLimits here)")
            if "domains" in item and item["domains"] != list(entry.domains):
                report.error(
                    f"{path}.domains", f"must be the entry's domains as configured: {list(entry.domains)}"
                )
            limits = None
            if item.get("rateLimits") is not None:
                limits = build_block(RateLimitsConfig, item["rateLimits"], f"{path}.rateLimits", report)
            updated.append(dataclasses.replace(entry, rate_limits=limits))
        return updated

    @staticmethod
    def _outbound(config: SmtpConfig, raw: Any, report: Report) -> Any:
        path = "smtpConfig.delivery"
        if not isinstance(raw, Mapping):
            report.error(path, "expected a table of globalRateLimit, perServerRateLimit, perDomainRateLimit")
            return None
        given = {k: v for k, v in raw.items() if v is not None}
        for key in raw:
            if key not in OUTBOUND_KEYS:
                report.error(f"{path}.{key}", f"not an outbound rate limit ({', '.join(OUTBOUND_KEYS)})")
        known = {k: v for k, v in given.items() if k in OUTBOUND_KEYS}
        outbound = build_block(DeliveryConfig, known, path, report)
        if outbound is None:
            return None
        return dataclasses.replace(
            config.delivery, **{attr: getattr(outbound, attr) for attr in _OUTBOUND_ATTRS.values()}
        )


def endpoints(control: Callable[[], RateLimitControl | None]) -> list[Endpoint]:
    """The rate-limit endpoints over the router's :class:`RateLimitControl` (404 without smtpConfig)."""

    def need() -> RateLimitControl:
        found = control()
        if found is None:
            raise ApiError(404, "no_smtp", "this router has no smtpConfig, so no rate limits")
        return found

    def delivery() -> DeliveryManager:
        found = need()._delivery
        if found is None:
            raise ApiError(404, "no_delivery", "this router has no outbound delivery")
        return found

    async def show(call: Call) -> Any:
        return need().show()

    async def update(call: Call) -> Any:
        control = need()
        result = control.update(call.body)
        parts: dict[str, Any] = {
            k: call.body[k] for k in ("rateLimits", "domainConfigs", "delivery") if k in call.body
        }
        result.update(await control.persist(parts))
        log.info(
            "rate limits changed by API token {token}: {parts}", token=_who(call), parts=sorted(call.body)
        )
        return result

    async def set_outbound(call: Call) -> Any:
        manager = delivery()
        domain, limit = call.body["domain"], call.body["limit"]
        report = Report()
        build_block(DeliveryConfig, {"perDomainRateLimit": {domain: limit}}, "smtpConfig.delivery", report)
        if report.errors:
            raise InvalidLimits(report.errors)
        manager.set_rate_limit(domain, limit)
        log.info(
            "outbound rate limit of {domain} set to {limit}/min by API token {token}",
            domain=domain.lower(),
            limit=limit,
            token=_who(call),
        )
        return manager.shaper.settings()

    async def clear_outbound(call: Call) -> Any:
        manager = delivery()
        domain = call.params["domain"]
        if values.domain_pattern(domain) is not None or domain.startswith("*."):
            raise ApiError(400, "bad_domain", f"not a domain name: {domain!r}")
        if domain.lower() not in manager.shaper.rate_limits():
            raise ApiError(404, "not_found", f"no outbound rate limit for {domain}")
        manager.clear_rate_limit(domain)
        log.info(
            "outbound rate limit of {domain} cleared by API token {token}", domain=domain, token=_who(call)
        )
        return manager.shaper.settings()

    parts = (
        Field("rateLimits", "object", "smtpConfig.rateLimits as the file spells it (replaced whole)."),
        Field(
            "domainConfigs",
            "array",
            "One `{domains, rateLimits}` per configured domainConfigs entry, in order; `rateLimits` "
            "replaced.",
        ),
        Field(
            "delivery", "object", "`globalRateLimit`, `perServerRateLimit`, `perDomainRateLimit` (replaced)."
        ),
    )
    E = Endpoint
    return [
        E(
            "GET",
            "/api/v1/rate-limits",
            show,
            "read",
            "The rate limits in force: smtpConfig.rateLimits, each domainConfigs entry's rateLimits, and the "
            "outbound limits (set_rate_limit included).",
            responses={404: "no smtpConfig"},
        ),
        E(
            "PUT",
            "/api/v1/rate-limits",
            update,
            "admin",
            "Replace any of the three parts after the configuration loader's checks; in force at once, "
            "counters kept (docs/limits.md, Changing limits at run time). Not written to the file.",
            body=parts,
            responses={404: "no smtpConfig", 422: "invalid limits (every error with its key path)"},
        ),
        E(
            "POST",
            "/api/v1/rate-limits/outbound",
            set_outbound,
            "admin",
            "The seed's setRateLimit: messages per minute to recipients at one domain, spread evenly.",
            body=(
                Field("domain", "string", "The recipient domain.", required=True),
                Field("limit", "integer", "Messages per minute (at least 1).", required=True),
            ),
            responses={404: "no delivery", 422: "not a domain, or not a positive limit"},
        ),
        E(
            "DELETE",
            "/api/v1/rate-limits/outbound/{domain}",
            clear_outbound,
            "admin",
            "The seed's clearRateLimit: lift one domain's outbound limit.",
            responses={400: "not a domain name", 404: "no limit for that domain"},
        ),
    ]


def _who(call: Call) -> str:
    return call.token.name if call.token is not None else "-"

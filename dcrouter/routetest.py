"""The route dry-run (``POST /api/v1/routing/test``, ``dcrouter route-test``): what the running router would
do with a recipient or a proxied connection, asked of the very objects that decide it, sending nothing.

- Mail: the relay decision is ``SessionPolicy.relay_refusal`` (what RCPT asks before recipient verification,
  which is named but not run: a callout would contact the target), the route is ``RecipientRouter.route``,
  and the limits and retry schedule are the DeliveryManager's for that route. The addresses are parsed as
  RCPT and MAIL parse them.
- Proxy: the route is :meth:`RouteTable.match <dcrouter.proxy.routes.RouteTable.match>` for the port, the name
  (SNI or HTTP Host) and the client address, and whether that route serves the client is its own
  :meth:`~dcrouter.proxy.routes.ProxyRoute.permits`.

Bad input raises ValueError (its text names the field); asking about a part the router does not run raises
LookupError.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dcrouter.delivery.routing import domain_name
from dcrouter.mail.address import AddressError, parse_mail_argument, parse_rcpt_argument
from dcrouter.smtp.session import Session

if TYPE_CHECKING:
    from dcrouter.router import DcRouter

#: The client address assumed when none is given: one outside every relayNetworks a sane file has.
UNKNOWN_CLIENT = "192.0.2.1"


def _client_ip(value: Any) -> str:
    if value is None:
        return UNKNOWN_CLIENT
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"clientIp: not an IP address: {value!r}") from None


def dry_run(router: DcRouter, query: Mapping[str, Any]) -> dict[str, Any]:
    """The answer for ``query``: ``recipient`` (with ``sender``, ``clientIp``, ``authenticated``) asks about
    mail; ``sni`` or ``host`` with ``port`` (and ``clientIp``) about the proxy."""
    mail = "recipient" in query or "sender" in query or "authenticated" in query
    proxy = "sni" in query or "host" in query or "port" in query
    if mail == proxy:
        raise ValueError(
            "give either recipient (with sender, clientIp, authenticated) or sni/host with port "
            "(and clientIp)"
        )
    return _mail(router, query) if mail else _proxy(router, query)


def _mail(router: DcRouter, query: Mapping[str, Any]) -> dict[str, Any]:
    policy, routes, delivery = router.policy, router.routes, router.delivery
    config = router.smtp_config
    if policy is None or routes is None or delivery is None or config is None:
        raise LookupError("this router has no smtpConfig")
    if "recipient" not in query:
        raise ValueError("recipient: required")
    sender_text = query.get("sender", "")
    try:
        recipient, _ = parse_rcpt_argument(f"TO:<{query['recipient']}>", utf8=True)
    except AddressError as error:
        raise ValueError(f"recipient: {error}") from None
    try:
        sender, _ = parse_mail_argument(f"FROM:<{sender_text}> SMTPUTF8", utf8=True)
    except AddressError as error:
        raise ValueError(f"sender: {error}") from None
    client_ip = _client_ip(query.get("clientIp"))
    authenticated = bool(query.get("authenticated", False))
    session = Session(
        session_id="route-test",
        peer_host=client_ip,
        peer_port=0,
        local_port=0,
        auth_user="route-test" if authenticated else None,
    )
    refusal = policy.relay_refusal(session, recipient)
    entry = (
        policy.domain_config(recipient.domain) if recipient.domain and policy.is_local(recipient) else None
    )
    route = routes.route(str(sender), str(recipient))
    limit, retry = delivery.settings_for(route.name)
    answer: dict[str, Any] = {
        "kind": "mail",
        "accepted": refusal is None,
        "relayRefused": refusal is not None,
        "reply": None if refusal is None else refusal.to_bytes().decode("utf-8", "replace").strip(),
        "local": entry is not None,
        "relayAllowed": policy.may_relay(session),
        "verifyRecipients": entry.verify_recipients if entry is not None else "off",
        "matched": _matched(router, route.name),
        "route": route.name,
        "targets": list(route.targets),
        "mxDomain": route.mx_domain,
        "port": route.port,
        "tls": "required" if route.require_tls else "opportunistic",
        "authUser": route.auth_user,
        "maxPerDestination": limit,
        "retry": {
            "maxRetries": retry.max_retries,
            "baseRetryDelay": round(retry.base_delay * 1000),
            "maxRetryDelay": round(retry.max_delay * 1000),
            "queueLifetime": round(retry.lifetime * 1000),
        },
        "paused": delivery.paused or route.name in delivery.paused_destinations,
    }
    return answer


def _matched(router: DcRouter, name: str) -> dict[str, Any]:
    """Which configuration entry made route ``name``: its key path."""
    config = router.smtp_config
    assert config is not None
    kind, _, rest = name.partition(":")
    if kind == "rule":
        for i, rule in enumerate(config.routing_rules):
            if rule.name == rest:
                return {"by": "routingRules", "key": f"smtpConfig.routingRules[{i}]", "name": rest}
        return {"by": "plugin rule", "key": None, "name": rest}
    if kind == "domain":
        for i, entry in enumerate(config.domain_configs):
            if any(domain_name(pattern) == rest for pattern in entry.domains):
                return {"by": "domainConfigs", "key": f"smtpConfig.domainConfigs[{i}]", "name": rest}
    if name == "default":
        return {"by": "defaultServer", "key": "smtpConfig.defaultServer", "name": config.default_server}
    return {"by": "mx", "key": None, "name": rest}


def _proxy(router: DcRouter, query: Mapping[str, Any]) -> dict[str, Any]:
    proxy = router.proxy
    if proxy is None:
        raise LookupError("this router runs no proxy")
    if "sni" in query and "host" in query:
        raise ValueError("give sni or host, not both")
    port = query.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ValueError(f"port: required, 1-65535, got {port!r}")
    name = query.get("sni", query.get("host"))
    if name is not None and not isinstance(name, str):
        raise ValueError(f"sni/host: expected a string, got {name!r}")
    client_ip = _client_ip(query.get("clientIp"))
    table = proxy.context.table
    route = table.match(port, name, client_ip)
    answer: dict[str, Any] = {"kind": "proxy", "port": port, "name": name, "clientIp": client_ip}
    if route is None:
        return {**answer, "matched": None, "action": "close", "reason": "no route for this port and name"}
    index = table.routes.index(route)
    permitted = route.permits(client_ip)
    return {
        **answer,
        "matched": {"name": route.name, "key": route.source, "index": index, "priority": route.priority},
        "action": "forward" if permitted else "close",
        "reason": None if permitted else "the route's IP allow/block list refuses this client",
        "target": {"hosts": list(route.target.hosts), "port": route.target.port},
        "tlsMode": route.tls_mode,
        "maxConnections": route.max_connections,
    }

"""The proxy's active health checks: one :class:`~dcrouter.net.healthcheck.TargetCheck` per target of every
route with ``action.healthCheck``, feeding the shared :class:`~dcrouter.net.targets.TargetHealth`.

A state change is logged, marked in the target health (a target down gets no new connection), and emitted
as ``proxy.target_down`` / ``proxy.target_up`` (fields: route, target ``host:port``, reason).
:meth:`HealthMonitor.states` gives every checked target's state for the ``dcrouter_proxy_target_up`` gauge:
its labels are bounded by the configuration (route name and configured host:port).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.protocol import Protocol

from dcrouter.log import logger
from dcrouter.net.healthcheck import TargetCheck, make_probe
from dcrouter.net.targets import Target

if TYPE_CHECKING:
    from dcrouter.proxy.routes import ProxyRoute
    from dcrouter.proxy.session import ProxyContext

log = logger(__name__)


class HealthMonitor:
    """The health checks of ``context``'s routes; :meth:`start` / :meth:`stop` with the proxy service."""

    def __init__(self, context: ProxyContext) -> None:
        self.context = context
        self.running = False
        #: (route name, target) -> its check
        self.checks: dict[tuple[str, Target], TargetCheck] = {}
        for route in context.table.routes:
            rule = route.target.health_check
            if rule is None:
                continue
            port = rule.port if rule.port is not None else route.target.port
            if port is None:
                continue  # refused by the config loader; a route built in code without a port goes unchecked
            probe = make_probe(rule, self._connector(route), tls=route.tls_mode == "terminate-and-reencrypt")
            for host in route.target.hosts:
                target = Target(host, host, port)
                self.checks[(route.name, target)] = TargetCheck(
                    target, rule, probe, context.reactor, self._changed(route.name)
                )

    def start(self) -> None:
        self.running = True
        for check in self.checks.values():
            check.start()

    def stop(self) -> None:
        self.running = False
        for check in self.checks.values():
            check.stop()

    def release(self) -> None:
        """Stop, and lift the holds these checks put on targets (a reload replaces them)."""
        self.stop()
        for check in self.checks.values():
            if not check.up:
                self.context.health.check_passed(check.target)

    def states(self) -> dict[tuple[str, str], bool]:
        """``(route, "host:port") -> up`` for every checked target."""
        return {(route, str(check.target)): check.up for (route, _), check in self.checks.items()}

    def _connector(self, route: ProxyRoute) -> Callable[[Target, Callable[[], Protocol], bool], Any]:
        context = self.context

        def connect(target: Target, protocol: Callable[[], Protocol], tls: bool) -> Any:
            creator = None
            if tls:
                if route.tls_mode == "terminate-and-reencrypt":
                    creator = context.backend_tls(route, target, None)
                else:
                    # A passthrough backend's certificate is for the clients' names: the check asks only
                    # whether a handshake completes.
                    creator = context.unverified_tls(None)
            return context.connect(target.address, target.port, protocol=protocol, tls=creator)

        return connect

    def _changed(self, route: str) -> Callable[[Target, bool, str], None]:
        health = self.context.health

        def changed(target: Target, up: bool, reason: str) -> None:
            # Another route may check the same host:port: the shared mark follows the latest verdict.
            if up:
                health.check_passed(target)
                log.info("proxy: {route}: target {t} is up ({why})", route=route, t=str(target), why=reason)
            else:
                health.check_failed(target)
                log.warn("proxy: {route}: target {t} is down ({why})", route=route, t=str(target), why=reason)
            self.context.events.emit(
                "proxy.target_up" if up else "proxy.target_down",
                route=route,
                target=str(target),
                reason=reason,
            )

        return changed

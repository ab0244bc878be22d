"""Several credential checkers behind one portal, asked in order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(ICredentialsChecker)
class CheckerChain:
    """Asks each checker that takes the credentials, in order, until one accepts them.

    A Portal keeps one checker per credentials interface; this one stands for all of them. The first success
    wins. A refusal (``UnauthorizedLogin``) passes on to the next checker. A checker that breaks (its
    directory is down: :class:`~dcrouter.interfaces.ProviderUnavailable`, or anything else) does not end the
    search either — a later provider may still accept — but when none accepts, that first breakage is the
    answer, not a refusal: a user whose directory is down gets a temporary failure, never a ``535``.
    """

    def __init__(self, checkers: Sequence[Any]) -> None:
        self.checkers = list(checkers)
        interfaces: list[Any] = []
        for checker in self.checkers:
            for interface in checker.credentialInterfaces:
                if interface not in interfaces:
                    interfaces.append(interface)
        self.credentialInterfaces = tuple(interfaces)

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._check(credentials))

    async def _check(self, credentials: Any) -> Any:
        broken: Failure | None = None
        for checker in self.checkers:
            if not any(i.providedBy(credentials) for i in checker.credentialInterfaces):
                continue
            try:
                return await checker.requestAvatarId(credentials)
            except UnauthorizedLogin:
                continue
            except CancelledError:
                raise
            except Exception:  # noqa: BLE001 (kept: the answer if no later checker accepts)
                if broken is None:
                    broken = Failure()
        if broken is not None:
            broken.raiseException()
        raise UnauthorizedLogin()

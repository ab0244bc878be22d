"""The life cycle the durable queue backends share: new → loading → open → closing → closed, and pausing."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed

from dcrouter.interfaces import QueueUnavailable


class QueueLifecycle:
    """State, ``save()``, ``pause()``/``resume()``/``is_processing()`` and the open check of a backend.

    A subclass sets :attr:`_description` (how errors name the store) and implements ``_close()``, an async
    method releasing what the backend holds; whether it returns or raises, the queue is closed afterwards
    and every ``save()`` waiting on that close fires. ``load()`` moves ``_state`` from "new" to "loading" to
    "open" (or "closed" when it fails).
    """

    _description = "queue"

    def __init__(self) -> None:
        self._state = "new"
        self._close_waiters: list[Deferred[None]] = []
        self._paused = False

    def save(self) -> Deferred[None]:
        """Close the store (see the backend's ``_close``); a second call waits for the same close. Later
        operations fail with QueueUnavailable."""
        if self._state in ("new", "closed"):
            self._state = "closed"
            return succeed(None)
        if self._state == "closing":
            waiter: Deferred[None] = Deferred()
            self._close_waiters.append(waiter)
            return waiter
        if self._state != "open":
            return fail(QueueUnavailable(f"{self._description} is {self._state}"))
        self._state = "closing"
        return Deferred.fromCoroutine(self._closing())

    async def _closing(self) -> None:
        try:
            await self._close()
        finally:
            self._state = "closed"
            waiters, self._close_waiters = self._close_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    async def _close(self) -> None:
        raise NotImplementedError

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def is_processing(self) -> bool:
        return not self._paused

    def _check_open(self) -> None:
        if self._state != "open":
            raise QueueUnavailable(f"{self._description} is {self._state}, not open")

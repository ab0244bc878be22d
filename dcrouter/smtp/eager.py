"""Running a command's coroutine eagerly: straight through when it never waits, on a Deferred when it does.

Most SMTP commands answer without waiting on anything (EHLO, RSET, a RCPT the policy answers from memory),
yet ``Deferred.fromCoroutine`` builds a Deferred and its callback chain for every one. At thousands of
messages a second that machinery is a measurable share of the CPU (docs/decisions.md, "SMTP ingress"), so
:func:`run_eagerly` steps the coroutine itself up to its first ``await`` of a Deferred that has not fired, and
builds a Deferred only then.

What a caller of :func:`run_eagerly` may rely on:

- ``on_result`` is called exactly once, with the coroutine's return value, or with what ``on_error`` returns
  for the failure when the coroutine raised an ``Exception``.
- A coroutine that finishes without waiting (awaiting a Deferred that has already fired is no wait) is run to
  its end, and ``on_result`` called, before :func:`run_eagerly` returns None. No Deferred is built; an
  exception raised by ``on_result`` or ``on_error`` propagates to the caller.
- Otherwise :func:`run_eagerly` returns a Deferred, and the rest of the coroutine runs as
  ``Deferred.fromCoroutine`` would run it: each awaited Deferred's result is sent into it, its failure thrown
  into it. That Deferred then runs ``on_error`` on a failure and ``on_result`` on the outcome; its own result
  is ``on_result``'s, and a failure of ``on_result`` itself is left on it for the caller's errback.
- A wait that is never answered leaves garbage that is collected quietly: closing the driver closes the
  command's coroutine too, in whichever order the collector gets to them.

:func:`resolve` is the other half of the scheme: a coroutine awaits what a collaborator returned only when it
is a Deferred, so a collaborator that answers at once keeps the command on the eager path.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

_T = TypeVar("_T")


def run_eagerly(
    work: Coroutine[Any, Any, _T],
    on_result: Callable[[_T], object],
    on_error: Callable[[Failure], _T],
) -> Deferred[object] | None:
    """Run ``work`` and hand its outcome to ``on_result``; None when that is done, else the Deferred doing it.
    See the module docstring for the contract."""
    try:
        awaited = work.send(None)
    except StopIteration as finished:
        on_result(finished.value)
        return None
    except Exception:  # noqa: BLE001 (handed to on_error, which decides the outcome)
        on_result(on_error(Failure()))
        return None
    done = Deferred.fromCoroutine(_finish(work, awaited))
    done.addErrback(on_error)
    return done.addCallback(on_result)


async def _finish(work: Coroutine[Any, Any, _T], awaited: Any) -> _T:
    """Finish ``work``, a coroutine already run up to its first ``await`` of ``awaited`` (a Deferred)."""
    while True:
        try:
            value = await awaited
        except GeneratorExit:
            # Not the wait's outcome: this coroutine is being closed (garbage, its wait never answered), and
            # the command with it. The collector may have closed the command first; close() then does nothing
            # where throw() would raise.
            work.close()
            raise
        except BaseException as error:  # noqa: BLE001 (handed to the coroutine, which decides)
            step = partial(work.throw, error)
        else:
            step = partial(work.send, value)
        try:
            awaited = step()
        except StopIteration as finished:
            return finished.value  # type: ignore[no-any-return]


async def resolve(value: _T | Deferred[_T]) -> _T:
    """The result of a collaborator that may answer at once or with a Deferred; awaits only the latter."""
    if isinstance(value, Deferred):
        return await value
    return value

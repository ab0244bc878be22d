"""Tests for dcrouter.smtp.eager: a coroutine that never waits runs straight through without a Deferred; one
that waits finishes on a Deferred, with results and failures reaching it as Deferred.fromCoroutine would."""

from __future__ import annotations

import gc
import sys
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dcrouter.smtp.eager import resolve, run_eagerly


class Boom(Exception):
    pass


class Outcomes:
    """Records what run_eagerly hands on: results, and failures turned into a result by on_error."""

    def __init__(self) -> None:
        self.results: list[Any] = []
        self.failures: list[Failure] = []

    def on_result(self, value: Any) -> str:
        self.results.append(value)
        return "answered"

    def on_error(self, failure: Failure) -> str:
        self.failures.append(failure)
        return "internal error"


class StraightThroughTests(SynchronousTestCase):
    def test_a_coroutine_that_never_awaits_is_answered_at_once(self) -> None:
        async def command() -> str:
            return "250 ok"

        outcomes = Outcomes()
        self.assertIsNone(run_eagerly(command(), outcomes.on_result, outcomes.on_error))
        self.assertEqual(outcomes.results, ["250 ok"])
        self.assertEqual(outcomes.failures, [])

    def test_awaiting_a_fired_deferred_is_no_wait(self) -> None:
        async def command() -> str:
            first = await succeed("checked")
            return first + " " + await resolve("at once")

        outcomes = Outcomes()
        self.assertIsNone(run_eagerly(command(), outcomes.on_result, outcomes.on_error))
        self.assertEqual(outcomes.results, ["checked at once"])

    def test_an_exception_before_any_wait_goes_to_on_error_at_once(self) -> None:
        async def command() -> str:
            raise Boom("bug in a command")

        outcomes = Outcomes()
        self.assertIsNone(run_eagerly(command(), outcomes.on_result, outcomes.on_error))
        (failure,) = outcomes.failures
        self.assertIsInstance(failure.value, Boom)
        self.assertEqual(outcomes.results, ["internal error"])

    def test_on_result_raising_propagates_to_the_caller(self) -> None:
        async def command() -> str:
            return "250 ok"

        def on_result(value: str) -> None:
            raise Boom("transport gone")

        self.assertRaises(Boom, run_eagerly, command(), on_result, Outcomes().on_error)


class WaitingTests(SynchronousTestCase):
    def test_a_wait_returns_a_deferred_and_answers_when_it_fires(self) -> None:
        check: Deferred[str] = Deferred()
        steps: list[str] = []

        async def command() -> str:
            steps.append("before")
            verdict = await check
            steps.append("after")
            return verdict

        outcomes = Outcomes()
        waiting = run_eagerly(command(), outcomes.on_result, outcomes.on_error)
        assert waiting is not None
        self.assertEqual(steps, ["before"])
        self.assertNoResult(waiting)
        self.assertEqual(outcomes.results, [])
        check.callback("550 refused")
        self.assertEqual(steps, ["before", "after"])
        self.assertEqual(outcomes.results, ["550 refused"])
        self.assertEqual(self.successResultOf(waiting), "answered")

    def test_every_later_wait_is_followed(self) -> None:
        first: Deferred[int] = Deferred()
        second: Deferred[int] = Deferred()

        async def command() -> int:
            return await first + await resolve(second)

        outcomes = Outcomes()
        waiting = run_eagerly(command(), outcomes.on_result, outcomes.on_error)
        assert waiting is not None
        first.callback(1)
        self.assertEqual(outcomes.results, [])
        second.callback(2)
        self.assertEqual(outcomes.results, [3])
        self.successResultOf(waiting)

    def test_a_failed_wait_is_thrown_into_the_coroutine(self) -> None:
        queued: Deferred[str] = Deferred()

        async def command() -> str:
            try:
                return await queued
            except Boom as error:
                return f"451 {error}"

        outcomes = Outcomes()
        waiting = run_eagerly(command(), outcomes.on_result, outcomes.on_error)
        assert waiting is not None
        queued.errback(Boom("disk full"))
        self.assertEqual(outcomes.results, ["451 disk full"])
        self.assertEqual(outcomes.failures, [])
        self.successResultOf(waiting)

    def test_an_exception_after_a_wait_goes_to_on_error(self) -> None:
        queued: Deferred[str] = Deferred()

        async def command() -> str:
            await queued
            raise Boom("bug after the queue answered")

        outcomes = Outcomes()
        waiting = run_eagerly(command(), outcomes.on_result, outcomes.on_error)
        assert waiting is not None
        queued.callback("queued")
        (failure,) = outcomes.failures
        self.assertIsInstance(failure.value, Boom)
        self.assertEqual(outcomes.results, ["internal error"])
        self.successResultOf(waiting)

    def test_on_result_failing_is_left_on_the_deferred(self) -> None:
        check: Deferred[str] = Deferred()

        async def command() -> str:
            return await check

        def on_result(value: str) -> None:
            raise Boom("transport gone")

        waiting = run_eagerly(command(), on_result, Outcomes().on_error)
        assert waiting is not None
        check.callback("250 ok")
        self.failureResultOf(waiting, Boom)

    def test_resolve_awaits_only_a_deferred(self) -> None:
        pending: Deferred[str] = Deferred()
        outcomes = Outcomes()
        waiting = run_eagerly(resolve(pending), outcomes.on_result, outcomes.on_error)
        assert waiting is not None
        pending.callback("later")
        self.assertEqual(outcomes.results, ["later"])


class AbandonedWaitTests(SynchronousTestCase):
    """A command whose wait is never answered (its session went away) is garbage: its coroutines are closed in
    whatever order the collector picks, and closing must not raise (Python reports that as an unraisable
    exception, "cannot reuse already awaited coroutine")."""

    def test_closing_after_the_command_is_quiet(self) -> None:
        unraisable: list[BaseException | None] = []
        self.patch(sys, "unraisablehook", lambda report: unraisable.append(report.exc_value))

        def abandon() -> None:
            never: Deferred[str] = Deferred()

            async def command() -> str:
                return await never

            work = command()
            self.assertIsNotNone(run_eagerly(work, Outcomes().on_result, Outcomes().on_error))
            work.close()  # the collector happened to close the command's coroutine first

        abandon()
        gc.collect()
        self.assertEqual(unraisable, [])

    def test_closing_the_driver_closes_the_command(self) -> None:
        unraisable: list[BaseException | None] = []
        self.patch(sys, "unraisablehook", lambda report: unraisable.append(report.exc_value))
        steps: list[str] = []

        def abandon() -> None:
            never: Deferred[str] = Deferred()

            async def command() -> str:
                try:
                    return await never
                finally:
                    steps.append("closed")

            run_eagerly(command(), Outcomes().on_result, Outcomes().on_error)

        abandon()
        gc.collect()
        self.assertEqual(steps, ["closed"])
        self.assertEqual(unraisable, [])

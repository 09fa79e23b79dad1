"""Waiting for a condition, with a deadline: the one polling helper of the command line, the
supervisor and the tests (an unbounded wait is a hang waiting to happen)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    """The condition was not met in time; `last` is the value the predicate returned last."""

    def __init__(self, what: str, timeout: float, last: object) -> None:
        super().__init__(f"{what} not met within {timeout:g} s (last value: {last!r})")
        self.last = last


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    interval: float = 0.2,
    what: str = "condition",
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] = time.sleep,
) -> T:
    """Call `predicate` every `interval` seconds until it returns a truthy value, and return
    that value; raise `WaitTimeout` once `timeout` seconds have passed without one. Exceptions
    from `predicate` propagate (a predicate that can fail transiently handles that itself)."""
    deadline = clock() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - clock()
        if remaining <= 0:
            raise WaitTimeout(what, timeout, value)
        sleep(min(interval, remaining))

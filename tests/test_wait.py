"""The one wait-until helper: returns the first truthy value, or says what it last saw."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from radloop.wait import WaitTimeout, wait_until


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_wait_until_returns_the_first_truthy_value() -> None:
    values: Iterator[object] = iter([None, 0, [], {"state": "done"}])
    clock = FakeClock()
    found = wait_until(lambda: next(values), 10, interval=1, clock=clock, sleep=clock.sleep)
    assert found == {"state": "done"} and clock.now == 3


def test_wait_until_gives_up_at_the_deadline_with_the_last_value() -> None:
    clock = FakeClock()
    with pytest.raises(WaitTimeout, match=r"run finished not met within 5 s \(last value: \[\]\)"):
        wait_until(
            lambda: [],
            5,
            what="run finished",
            clock=clock,
            sleep=clock.sleep,
        )
    assert clock.now == 5

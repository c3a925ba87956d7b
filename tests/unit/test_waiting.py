"""The one way to wait: deadline, backoff, the message on time-out (with a fake clock)."""

from __future__ import annotations

import asyncio

import pytest

from ray_serve_cai.errors import BadInput, OperationFailed, RayCaiError, WaitTimeout
from ray_serve_cai.waiting import apoll_until, poll_until


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_returns_the_first_truthy_result() -> None:
    clock = FakeClock()
    answers = iter([None, False, "ready"])
    result = poll_until(
        lambda: next(answers), timeout=10, interval=1, what="x", clock=clock, sleep=clock.sleep
    )
    assert result == "ready"
    assert clock.sleeps == [1, 1]


def test_times_out_naming_what_and_the_last_state() -> None:
    clock = FakeClock()
    with pytest.raises(WaitTimeout) as info:
        poll_until(
            lambda: None,
            timeout=5,
            interval=2,
            what="the head to answer",
            describe_last=lambda: "last status APPLICATION_STARTING",
            clock=clock,
            sleep=clock.sleep,
        )
    assert str(info.value) == (
        "timed out after 5s waiting for the head to answer; last status APPLICATION_STARTING"
    )
    assert clock.sleeps == [2, 2, 1]  # never sleeps past the deadline; one last try at it
    assert isinstance(info.value, OperationFailed) and info.value.exit_code == 1


def test_backoff_is_capped() -> None:
    clock = FakeClock()
    with pytest.raises(WaitTimeout):
        poll_until(
            lambda: None,
            timeout=20,
            interval=1,
            backoff=2,
            max_interval=4,
            what="x",
            clock=clock,
            sleep=clock.sleep,
        )
    assert clock.sleeps[:5] == [1, 2, 4, 4, 4]


def test_async_variant_times_out() -> None:
    with pytest.raises(WaitTimeout, match="waiting for nothing"):
        asyncio.run(apoll_until(lambda: None, timeout=0.05, interval=0.01, what="nothing"))


def test_error_tree_exit_codes() -> None:
    assert issubclass(BadInput, RayCaiError) and BadInput.exit_code == 2
    assert issubclass(OperationFailed, RayCaiError) and OperationFailed.exit_code == 1

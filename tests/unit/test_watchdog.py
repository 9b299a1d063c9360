"""The stream watchdog on plain iterables: items pass, errors pass, a stall fails in bounded time."""

import threading
import time

import pytest

from resnet_ray.watchdog import StallError, watched


def test_items_and_errors_pass_through():
    assert list(watched(iter(range(10)), 5.0, "counting", "x.timeout")) == list(range(10))

    def failing():
        yield 1
        raise ValueError("bad row 7")

    stream = watched(failing(), 5.0, "reading", "x.timeout")
    assert next(stream) == 1
    with pytest.raises(ValueError, match="bad row 7"):
        next(stream)


def test_a_stalled_stream_fails_naming_the_stage_and_the_setting_and_is_closed():
    release, closed = threading.Event(), threading.Event()

    def stalling():
        try:
            yield "first"
            release.wait(30)  # a Ray Data execution whose next block never comes
            yield "late"
            yield "never"
        finally:
            closed.set()

    start = time.monotonic()
    stream = watched(stalling(), 0.5, "evaluation of test", "eval.stall_timeout_s")
    assert next(stream) == "first"
    with pytest.raises(StallError, match=r"evaluation of test made no progress for 0.5 s \(eval.stall_timeout_s\)"):
        next(stream)
    assert time.monotonic() - start < 5
    release.set()  # once the source moves again, the abandoned stream is closed, not left running
    assert closed.wait(30)

"""The worker's consumer flushes buffered task events at most every EVENT_FLUSH_S, instead
of on every event-loop tick (``workers.consumer``). Checked on the consumer's own methods
with a recording stand-in for the event loop (no broker involved)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from workers.consumer import EVENT_FLUSH_S, StudyqConsumer


class LoopRecorder:
    """What the consumer asks of kombu's event loop (``Hub``), run on demand."""

    def __init__(self) -> None:
        self.soon: list[Callable[[], Any]] = []
        self.later: list[tuple[float, Callable[[], Any]]] = []

    def call_soon(self, callback: Callable[[], Any]) -> None:
        self.soon.append(callback)

    def call_later(self, delay: float, callback: Callable[[], Any]) -> None:
        self.later.append((delay, callback))

    def run_soon(self) -> None:
        while self.soon:
            self.soon.pop(0)()


def _consumer(loop: LoopRecorder, flushes: list[int]) -> StudyqConsumer:
    consumer = StudyqConsumer.__new__(StudyqConsumer)  # only the flush scheduling is used
    consumer.hub = loop
    consumer._event_flush_lock = threading.Lock()
    consumer._event_flush_asked = None
    consumer._flush_events = lambda: flushes.append(1)  # type: ignore[method-assign]
    return consumer


def test_many_buffered_events_schedule_one_delayed_flush():
    loop, flushes = LoopRecorder(), []
    consumer = _consumer(loop, flushes)
    # When 50 events are buffered before the loop runs
    for _ in range(50):
        consumer.on_send_event_buffered()
    loop.run_soon()
    # Then one flush is scheduled, EVENT_FLUSH_S later, and nothing is flushed yet
    assert [delay for delay, _ in loop.later] == [EVENT_FLUSH_S]
    assert flushes == []
    # When it fires, the events go out, and the next event schedules a new flush
    loop.later.pop()[1]()
    assert flushes == [1]
    consumer.on_send_event_buffered()
    loop.run_soon()
    assert [delay for delay, _ in loop.later] == [EVENT_FLUSH_S]


def test_a_flush_whose_timer_was_lost_does_not_block_the_next_one():
    loop, flushes = LoopRecorder(), []
    consumer = _consumer(loop, flushes)
    consumer.on_send_event_buffered()
    loop.run_soon()
    loop.later.clear()  # the timer entry is gone (say, a reconnect dropped it)
    consumer._event_flush_asked -= 10 * EVENT_FLUSH_S + 1  # asked long ago
    consumer.on_send_event_buffered()
    loop.run_soon()
    assert [delay for delay, _ in loop.later] == [EVENT_FLUSH_S]

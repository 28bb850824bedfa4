"""``submit``'s page prefetch (``orchestrator.reconcile._pages_ahead``): pages come in
order, a fetch error reaches the caller, and a caller that stops early never hangs."""

from __future__ import annotations

import threading

import pytest

from orchestrator.contracts.errors import StoreUnavailableError
from orchestrator.reconcile import _pages_ahead

pytestmark = pytest.mark.timeout(20)


def test_pages_come_in_order_until_the_first_empty_one():
    pages = iter([[1, 2], [3], [], [4]])
    assert list(_pages_ahead(lambda: next(pages))) == [[1, 2], [3]]


def test_a_fetch_error_is_raised_in_the_callers_thread():
    calls = iter([[1], None])

    def next_page() -> list[int]:
        page = next(calls)
        if page is None:
            raise StoreUnavailableError("database gone")
        return page

    got = []
    with pytest.raises(StoreUnavailableError, match="database gone"):
        for page in _pages_ahead(next_page):
            got.append(page)
    assert got == [[1]]


def test_a_caller_that_stops_early_does_not_wait_on_a_failing_fetch():
    # Given a fetcher that has a page waiting and then fails on the next one
    failed = threading.Event()
    calls = iter([[1], [2]])

    def next_page() -> list[int]:
        page = next(calls, None)
        if page is None:
            failed.set()
            raise StoreUnavailableError("database gone")
        return page

    pages = _pages_ahead(next_page)
    assert next(pages) == [1]
    assert failed.wait(5)  # page [2] waits in the hand-over, the error behind it
    # When the caller stops (its publish failed), closing returns at once
    pages.close()

"""One object per running event loop.

Async clients (``redis.asyncio``, psycopg's async pool, the reinit listener's connection)
belong to the loop that made them and must not be used from another. A web process has one
loop for its lifetime; tests run a loop per test, so entries of loops that have closed are
dropped whenever a new one is made.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerLoop(Generic[T]):
    """A ``T`` for each running event loop, made on first use by ``make``."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._items: dict[asyncio.AbstractEventLoop, T] = {}

    def get(self) -> T:
        """The running loop's ``T`` (must be called from a coroutine or callback)."""
        loop = asyncio.get_running_loop()
        item = self._items.get(loop)
        if item is None:
            for old in [old for old in self._items if old.is_closed()]:
                del self._items[old]
            item = self._items[loop] = self._make()
        return item

    def pop(self) -> T | None:
        """Forget the running loop's ``T`` and answer it (None if it made none), to close it."""
        return self._items.pop(asyncio.get_running_loop(), None)

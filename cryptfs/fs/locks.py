"""A writer-preferring readers/writer lock for trio (see docs/CONCURRENCY.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


class RWLock:
    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        while self._writer or self._waiting_writers:
            await self._changed.wait()
        self._readers += 1
        try:
            yield
        finally:
            self._readers -= 1
            self._notify()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        self._waiting_writers += 1
        try:
            while self._writer or self._readers:
                await self._changed.wait()
        finally:
            self._waiting_writers -= 1
            self._notify()
        self._writer = True
        try:
            yield
        finally:
            self._writer = False
            self._notify()

"""Concurrent sub-tasks whose failures read like one call's failure.

trio reports errors of a nursery's children as an ``ExceptionGroup``; callers of the store
and of the file system expect a single ``CryptfsError`` (which the FUSE layer maps to an
errno).  ``open_tasks()`` is a nursery that re-raises the first ``CryptfsError`` when every
error of the group is one; anything else (cancellation, a bug) stays a group, unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TypeVar

import trio

from cryptfs.errors import CryptfsError

T = TypeVar("T")


def _first(group: BaseExceptionGroup[CryptfsError]) -> CryptfsError:
    e: BaseException = group
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    assert isinstance(e, CryptfsError)
    return e


@asynccontextmanager
async def open_tasks() -> AsyncIterator[trio.Nursery]:
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        match, rest = group.split(CryptfsError)
        if match is not None and rest is None:
            raise _first(match) from None
        raise


async def each(items: Iterable[T], concurrency: int, fn: Callable[[T], Awaitable[None]]) -> None:
    """``fn(item)`` for every item, ``concurrency`` at a time (at least one), in the order
    given; failures as ``open_tasks`` reports them."""
    send, recv = trio.open_memory_channel[T](0)

    async def worker() -> None:
        async for item in recv:
            await fn(item)

    async with open_tasks() as nursery:
        for _ in range(max(1, concurrency)):
            nursery.start_soon(worker)
        async with send:
            for item in items:
                await send.send(item)

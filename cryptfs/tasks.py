"""Concurrent sub-tasks whose failures read like one call's failure.

trio reports errors of a nursery's children as an ``ExceptionGroup``; callers of the store
and of the file system expect a single ``CryptfsError`` (which the FUSE layer maps to an
errno).  ``open_tasks()`` is a nursery that re-raises the first ``CryptfsError`` when every
error of the group is one; anything else (cancellation, a bug) stays a group, unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from cryptfs.errors import CryptfsError


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

"""Run asyncio coroutines (aiobotocore) on one dedicated loop thread, awaited from trio.

Owns: the asyncio event loop thread.  The only module besides ``store.s3`` that may import
asyncio (see ../shared/research/trio-bridge.md for the measurements behind this design).

Resource handling:
    ``open_bridge()`` starts the thread and stops it on exit; coroutines still running then are
    cancelled and awaited.
Error handling:
    Exceptions raised by a coroutine arrive unchanged in trio.  Cancelling the trio caller
    cancels the asyncio task *and waits until it has finished* (``Abort.FAILED``), so a
    cancelled request has really stopped when trio continues.  A task cancelled by the loop
    itself (shutdown) surfaces as ``BridgeClosed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")


class BridgeClosed(RuntimeError):
    pass


# bytes per recv() of a plain-TCP connection: asyncio's 256 KiB makes every recv a fresh
# mmap (the daemon fixes glibc's mmap threshold at 128 KiB, daemon._tune_malloc), its page
# faults and a munmap; below the threshold the buffers are reused from the heap.  A cold
# 512 MiB read took 20-25 % less CPU with 64 KiB (docs/PERFORMANCE.md).
_RECV_BYTES = 64 << 10


class _Loop(asyncio.SelectorEventLoop):
    def _make_socket_transport(self, *args: Any, **kwargs: Any) -> Any:
        transport = super()._make_socket_transport(*args, **kwargs)  # type: ignore[misc]
        if hasattr(transport, "max_size"):
            transport.max_size = _RECV_BYTES
        return transport


class AsyncioBridge:
    def __init__(self) -> None:
        self._loop = _Loop()
        self._thread = threading.Thread(target=self._main, name="cryptfs-s3-loop", daemon=True)
        self._closed = False

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self._loop)
            for t in pending:
                t.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def start(self) -> None:
        self._thread.start()

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Await ``fn(*args)`` on the loop thread.  ``fn`` and its results stay loop-side."""
        if self._closed:
            raise BridgeClosed("S3 loop thread is closed")
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()
        state: dict[str, Any] = {}

        def deliver(fut: asyncio.Future[T]) -> None:  # loop thread
            if fut.cancelled():
                if "raise_cancel" in state:
                    result: outcome.Outcome[T] = outcome.capture(state["raise_cancel"])
                else:
                    result = outcome.Error(BridgeClosed("request cancelled by loop shutdown"))
            else:
                exc = fut.exception()
                result = outcome.Error(exc) if exc is not None else outcome.Value(fut.result())
            with contextlib.suppress(trio.RunFinishedError):  # trio already gone
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        def start() -> None:  # loop thread
            atask: asyncio.Task[T] = self._loop.create_task(fn(*args))  # type: ignore[arg-type]
            state["task"] = atask
            atask.add_done_callback(deliver)

        def abort(raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            def cancel() -> None:
                state["raise_cancel"] = raise_cancel
                atask = state.get("task")
                if atask is not None:
                    atask.cancel()

            self._loop.call_soon_threadsafe(cancel)
            return trio.lowlevel.Abort.FAILED

        try:
            self._loop.call_soon_threadsafe(start)
        except RuntimeError:
            raise BridgeClosed("S3 loop thread is closed") from None
        return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]

    async def stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        await trio.to_thread.run_sync(self._thread.join)


@asynccontextmanager
async def open_bridge() -> AsyncIterator[AsyncioBridge]:
    bridge = AsyncioBridge()
    bridge.start()
    try:
        yield bridge
    finally:
        with trio.CancelScope(shield=True):
            await bridge.stop()

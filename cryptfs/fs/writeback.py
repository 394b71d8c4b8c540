"""Write-back: dirty nodes uploaded once their delay has passed, in the background.

Owns: when each dirty node is due (a heap: no scan of every pending file per wake-up), the
service that uploads what is due and retries what failed with a backoff, the bounds on
uploads in flight (small files many at once, large ones few), ``sync_node`` (a node made
durable under its own lock, never ``ns``), ``flush_all`` (everything now; one failure never
cancels the others), and the hand-off with directory renames: an upload below a directory
being renamed is held back, and the rename waits for the uploads in flight under it
(``moving_dir``), so that no upload writes an old key (docs/CONCURRENCY.md).
Must not import: other parts of ``cryptfs.fs`` but ``model``, ``paths``, ``namespace`` and
``upload``.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
from collections.abc import AsyncIterator
from typing import Any

import trio

from cryptfs.errors import CryptfsError, KeyServiceUnavailable, StoreError
from cryptfs.fs.model import Background, Node, Options
from cryptfs.fs.namespace import Namespace
from cryptfs.fs.paths import Paths
from cryptfs.fs.upload import Uploader
from cryptfs.tasks import open_tasks

log = logging.getLogger(__name__)


class Writeback:
    def __init__(
        self,
        options: Options,
        paths: Paths,
        tree: Namespace,
        upload: Uploader,
        background: Background,
    ) -> None:
        self.opt = options
        self.paths = paths
        self.tree = tree
        self.upload = upload
        self.background = background
        self.upload_limit = trio.CapacityLimiter(self.opt.upload_concurrency)
        # small files are latency-bound: many in flight; their bodies are in memory, so the
        # bound is small_upload_bytes × small_upload_concurrency
        self.small_upload_limit = trio.CapacityLimiter(self.opt.small_upload_concurrency)
        self.due: dict[Node, float] = {}  # node -> when its upload is due
        # the same as a heap (stale entries are skipped): no scan of every pending file on
        # each wake-up, which made thousands of small files quadratic
        self.due_heap: list[tuple[float, int, Node]] = []
        self.due_seq = itertools.count()
        self.wake = trio.Event()
        self.stopping = False
        self.retry: dict[Node, float] = {}
        self.upload_failures = 0  # failed attempts (retried while transient)
        # uploads in flight (node -> its key) and directory prefixes being renamed: the one
        # waits for the other (``moving_dir``), neither holds ``ns`` meanwhile
        self.uploading: dict[Node, str] = {}
        self.uploads_changed = trio.Event()
        self.moving: dict[str, int] = {}
        self.moved = trio.Event()

    def not_due(self, node: Node) -> None:
        """``node`` was removed: no upload of it is due."""
        self.due.pop(node, None)

    def schedule(self, node: Node, delay: float | None = None) -> None:
        when = trio.current_time() + (self.opt.writeback_delay if delay is None else delay)
        earliest = self.due_heap[0][0] if self.due_heap else None
        self.due[node] = when
        heapq.heappush(self.due_heap, (when, next(self.due_seq), node))
        if earliest is None or when < earliest:
            self.wake.set()

    def dir_times(self, d: Node) -> None:
        """``d``'s marker is due for times its entries changed: once per write-back delay
        (a due write is not pushed back by the next change, so a directory that keeps
        changing is still written every delay)."""
        if d not in self.due:
            self.schedule(d)

    def pending(self) -> list[Node]:
        seen = [n for n in self.tree.inodes.values() if n.dirty and not n.unlinked]
        return seen

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Upload dirty files once their write-back delay has passed. Runs until cancelled."""
        task_status.started()
        async with open_tasks() as nursery:
            self.background.nursery = nursery
            while not self.stopping:
                now = trio.current_time()
                heap = self.due_heap
                while heap and heap[0][0] <= now:
                    when, _, node = heapq.heappop(heap)
                    if self.due.get(node) == when:  # else rescheduled or done meanwhile
                        del self.due[node]
                        nursery.start_soon(self.background_sync, node)
                wait = (heap[0][0] if heap else now + 3600) - now
                self.wake = trio.Event()
                with trio.move_on_after(max(wait, 0.01)):
                    await self.wake.wait()
            self.background.nursery = None
            # leaving the nursery waits for in-flight uploads: a cancelled PUT may still
            # land on the server without us learning its ETag

    def stop(self) -> None:
        """Let ``serve`` return once the uploads it started have finished."""
        self.stopping = True
        self.wake.set()

    def limit_for(self, node: Node) -> trio.CapacityLimiter:
        small = node.stage is None or node.stage.size <= self.opt.small_upload_bytes
        return self.small_upload_limit if small else self.upload_limit

    async def background_sync(self, node: Node) -> None:
        try:
            async with self.limit_for(node):
                await self.sync_node(node, settle=False)
            self.retry.pop(node, None)
            if self.upload.sweep_due and self.background.nursery is not None:
                # S3 answers again: abort what an outage left unfinished, while mounted
                self.background.nursery.start_soon(self.upload.sweep_in_background)
        except Exception as e:  # (one failure never stops the service or other uploads)
            if not self.failed(node, e):
                log.error("upload of %s failed permanently: %s", self.paths.ident(node),
                          self.describe(e))  # fmt: skip
                return
            backoff = min(60.0, self.retry.get(node, 1.0) * 2)
            self.retry[node] = backoff
            log.warning(
                "upload of %s failed (%s); staged locally, retrying in %.0f s",
                self.paths.ident(node),
                self.describe(e),
                backoff,
            )
            self.schedule(node, backoff)

    def failed(self, node: Node, e: Exception) -> bool:
        """An upload of ``node`` failed with ``e`` (the one policy of the service and of
        ``flush_all``): counted; True if it is worth trying again (S3 or KMS unreachable or
        throttling after their retries, a local I/O error: every upload asks KMS for a fresh
        data key, so a KMS volume's uploads wait for KMS like for S3); False if trying again
        cannot help (an integrity failure, a name too long, a retired key, a bug)."""
        self.upload_failures += 1
        return isinstance(e, (StoreError, OSError, KeyServiceUnavailable))

    def describe(self, e: Exception) -> str:
        """``e`` for a log line: scrubbed of names, or only its type (not one of ours)."""
        return self.paths.scrub(e) if isinstance(e, (CryptfsError, OSError)) else type(e).__name__

    async def sync_node(self, node: Node, *, settle: bool = True) -> None:
        """Make ``node`` durable in S3; returns once everything written before is uploaded
        (``settle=False``, the service's: a directory's times written once, not until its
        entries stop changing).

        Under the node's lock only, not ``ns``: its key is kept stable by ``moving_dir``
        instead (a directory rename above it waits for it, and it for such a rename), so
        that a rename queued for ``ns`` never waits for the largest upload (18.12)."""
        for _ in range(100):
            if not node.dirty or node.unlinked:
                return
            while self.held_back(self.paths.object_key(node)[0]):
                await self.moved.wait()
            async with node.lock:
                if node.unlinked or not node.dirty:
                    return
                key = self.paths.object_key(node)[0]
                if self.held_back(key):
                    continue  # a directory rename above it began while we waited
                self.uploading[node] = key
                try:
                    await self.sync_locked(node)
                finally:
                    del self.uploading[node]
                    self.uploads_changed.set()
                    self.uploads_changed = trio.Event()
                if not settle and node.only_times_pending:
                    # entries changed during the write: the next one waits for its delay
                    # (a busy directory's marker was rewritten back to back)
                    self.dir_times(node)
                    return
        raise StoreError("file keeps changing during upload")

    async def sync_locked(self, node: Node) -> None:
        change = node.change
        if node.stage is not None:
            await self.upload.upload_stage(node)
            if node.unlinked or node.stage is None:
                return
            if node.change == change:
                # synchronously: a new staged file of this node reuses the same paths
                node.stage.remove()
                node.stage = None
                node.meta_dirty = False
            return
        if node.is_dir:
            await self.upload.sync_marker(node)
        elif node.remote_etag is not None:
            await self.upload.sync_attrs(node)
        if node.change == change:
            node.meta_dirty = False

    async def flush_all(self) -> list[Node]:
        """Upload everything dirty now; returns the nodes that could not be uploaded."""
        failed: list[Node] = []

        async def one(node: Node) -> None:
            try:
                async with self.limit_for(node):
                    await self.sync_node(node)
            except Exception as e:  # one failure never cancels the other uploads
                self.failed(node, e)
                log.error(
                    "could not upload %s: %s (%s)",
                    self.paths.ident(node),
                    self.describe(e),
                    "kept staged for the next mount"
                    if node.stage is not None
                    else "a change of its attributes only, which is not staged: lost",
                )
                failed.append(node)

        async with open_tasks() as n:
            for node in self.pending():
                self.due.pop(node, None)
                n.start_soon(one, node)
        if self.upload.sweep_due:
            await self.upload.sweep()
        return failed

    @contextlib.asynccontextmanager
    async def moving_dir(self, prefix: str) -> AsyncIterator[None]:
        """Hold back uploads below ``prefix`` (a directory being renamed) and wait until
        those in flight have ended: their keys are the old ones."""
        self.moving[prefix] = self.moving.get(prefix, 0) + 1
        try:
            while any(k.startswith(prefix) for k in self.uploading.values()):
                await self.uploads_changed.wait()
            yield
        finally:
            self.moving[prefix] -= 1
            if not self.moving[prefix]:
                del self.moving[prefix]
            self.moved.set()
            self.moved = trio.Event()

    def held_back(self, key: str) -> bool:
        return any(key.startswith(p) for p in self.moving)

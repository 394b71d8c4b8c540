"""Metadata requests to S3, bounded: HEADs and LISTs of this mount share ``meta_concurrency``
slots (a walk of a big tree must not open thousands of connections at once).

Owns: the metadata limiter (``limit``, also taken around copies and batched deletes), and
what a bare HEAD or LIST means here (absent is None; a prefix is a directory only with
objects below it).
Must not import: other parts of ``cryptfs.fs`` but ``model``.
"""

from __future__ import annotations

import trio

from cryptfs.errors import NotFound
from cryptfs.store.base import Listing, ObjectInfo, ObjectStore

PAGE = 1000  # keys in one LIST answer (S3's most)


class Remote:
    def __init__(self, store: ObjectStore, concurrency: int) -> None:
        self.store = store
        self.limit = trio.CapacityLimiter(concurrency)

    async def head(self, key: str) -> ObjectInfo | None:
        async with self.limit:
            try:
                return await self.store.head(key)
            except NotFound:
                return None

    async def list(
        self, prefix: str, delimiter: str | None = "/", max_keys: int | None = None
    ) -> Listing:
        async with self.limit:
            return await self.store.list(prefix, delimiter=delimiter, max_keys=max_keys)

    async def implicit_dir(self, prefix: str) -> bool:
        """A prefix without a marker is a directory only if objects live below it.

        (SeaweedFS keeps emptied prefixes as "directories" in listings; they must not
        resurrect removed or renamed directories.  A folder placeholder, ``X/`` or one below
        it, is no object: one of them made a directory of any name, a file's too.)
        """
        return await self.has_objects(prefix)

    async def has_objects(self, prefix: str, but: tuple[str, ...] = ()) -> bool:
        """Do objects live below ``prefix`` (other than ``but``)?  One LIST page, without a
        delimiter (SeaweedFS shows the prefix of a folder whose objects are all gone as a
        common prefix).  Folder placeholders (keys ending in ``/``) are no objects; a full
        page of nothing else counts as objects, since what follows is not known (a bucket
        writer can make a thousand: the answer fails safe, a directory shown, not empty)."""
        listing = await self.list(prefix, delimiter=None, max_keys=PAGE)
        return len(listing.objects) >= PAGE or any(
            not o.key.endswith("/") and o.key not in but for o in listing.objects
        )

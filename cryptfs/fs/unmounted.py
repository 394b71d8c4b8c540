"""A file system of a volume for a tool that walks it without a mount: ``fsck``, ``import``
and the offline export (``cryptfs ls`` / ``cat`` / ``decrypt``).

Owns: the throwaway staging area such a walk needs (a temporary directory, private to the
process, removed with all it holds when the walk ends: nothing of it is recovered later).
Must not import: ``cryptfs.fuse``; other parts of ``cryptfs.fs`` but ``model`` and
``filesystem``.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from cryptfs.cache.staging import StagingArea
from cryptfs.fs.filesystem import Filesystem
from cryptfs.fs.model import Options
from cryptfs.volume import Volume


@contextlib.asynccontextmanager
async def unmounted(
    volume: Volume, options: Options | None = None, *, key_prefix: str = "", tool: str = "walk"
) -> AsyncIterator[Filesystem]:
    """``volume``'s file system, its root loaded, for the block; what it staged (a tool that
    writes, as ``import`` does, uploads with ``flush_all`` before the block ends) goes with
    it.  ``tool`` names the temporary directory."""
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"cryptfs-{tool}-"))
        staging = StagingArea(Path(tmp), volume.keys.cache, volume.chunk)
        stack.callback(staging.close)  # (first: no pool file is made while tmp is removed)
        fs = Filesystem(volume, staging, options, key_prefix=key_prefix)
        await fs.ensure_root()
        yield fs

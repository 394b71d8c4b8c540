"""Writing and reading whole files through a ``Filesystem`` (no FUSE), for tests."""

from __future__ import annotations

import os

from cryptfs.fs.filesystem import Filesystem


async def write_file(
    fs: Filesystem, parent: int, name: bytes, data: bytes, *, sync: bool = True
) -> int:
    """Create ``name`` with ``data``, close it and (``sync``) wait for the upload."""
    node, h = await fs.create(parent, name, 0o644, 0, 0)
    await fs.write(h.fh, 0, data)
    await fs.release(h.fh)
    if sync:
        await fs.sync_node(node)
    return node.ino


async def read_file(fs: Filesystem, ino: int) -> bytes:
    h = await fs.open(ino, os.O_RDONLY)
    try:
        return await fs.read(h.fh, 0, 1 << 30)
    finally:
        await fs.release(h.fh)

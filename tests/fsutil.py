"""Writing and reading whole files through a ``Filesystem`` (no FUSE), for tests."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cryptfs.crypto import Secret
from cryptfs.format.names import b64d
from cryptfs.format.volume import KeySource
from cryptfs.fs.filesystem import Filesystem
from cryptfs.fs.model import Node
from cryptfs.store.memory import MemoryStore

DATA = Path(__file__).resolve().parent / "data"


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


async def walk(fs: Filesystem, path: str) -> Node:
    """The node of ``path`` ("/a/b"), looked up component by component."""
    node = fs.root
    for comp in path.encode().strip(b"/").split(b"/"):
        node = await fs.lookup(node.ino, comp)
    return node


async def golden_store(name: str) -> tuple[MemoryStore, dict[str, Any], KeySource]:
    """A memory store holding the committed golden volume ``tests/data/NAME``, its JSON, and
    the key that opens it."""
    golden = json.loads((DATA / name).read_text())
    store = MemoryStore()
    for key, obj in golden["objects"].items():
        await store.put(key, bytes.fromhex(obj["body"]), obj["metadata"])
    return store, golden, KeySource(keyfile=Secret(b64d(golden["key_file"])))


async def kernel_walk(fs: Filesystem, ino: int, taken: list[int]) -> int:
    """``find`` over the tree below ``ino`` as the kernel does it: readdir (each entry handed
    to the kernel takes a reference, ``Filesystem.looked_up``), then into each directory;
    the inodes referenced go into ``taken``, for a later ``forget`` (as the kernel's when it
    drops its caches).  Returns the number of names seen."""
    seen = 0
    for name, node in await fs.readdir(ino):
        if name in (b".", b".."):
            continue
        fs.looked_up(node)
        taken.append(node.ino)
        seen += 1
        if node.is_dir:
            seen += await kernel_walk(fs, node.ino, taken)
    return seen

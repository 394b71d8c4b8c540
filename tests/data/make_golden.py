"""Write a golden volume for the format tests: ``python -m tests.data.make_golden OUT.json``
(``--special``: with special files, FORMAT.md §7.9; ``--segments``: files with revision-3
bodies, FORMAT.md §8.5, segments of 8 KiB; without it, revision-1 bodies as volumes made
before revision 3 hold; ``--rotated``: then rotated to the key ``KEY2``, which pins every
body, FORMAT.md §7.8, §8.5 "Pinned bodies").

Run once per format change and commit the result; tests must keep reading every golden file
ever committed (a later cryptfs must mount volumes written by an earlier one).
"""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
from pathlib import Path

import trio

from cryptfs.cache.staging import StagingArea
from cryptfs.crypto import Secret
from cryptfs.format.names import b64e
from cryptfs.format.volume import KeySource
from cryptfs.fs.filesystem import Filesystem
from cryptfs.fs.model import ROOT_INO, Options
from cryptfs.keyadmin import rotate
from cryptfs.store.memory import MemoryStore
from cryptfs.volume import Volume

KEY = bytes(range(32))
KEY2 = bytes(range(32, 64))
MTIME = 1_700_000_000_123_456_789
FILES = {
    "/hello.txt": b"hello, golden world\n",
    "/empty": b"",
    "/docs/report.pdf": bytes(range(256)) * 300,
    "/docs/" + "L" * 200: b"long name\n",
}


SPECIAL = [
    ("fifo", stat.S_IFIFO | 0o640, 0),
    ("tty", stat.S_IFCHR | 0o620, os.makedev(4, 64)),
    ("disk", stat.S_IFBLK | 0o660, os.makedev(8, 1)),
    ("socket", stat.S_IFSOCK | 0o755, 0),
]


async def build(
    special: bool = False, segments: bool = False, rotated: bool = False
) -> dict[str, object]:
    store = MemoryStore()
    vol = await Volume.create(
        store,
        KeySource(keyfile=Secret(KEY)),
        chunk_log2=12,
        encrypt_names=True,
        segment_log2=13 if segments else None,
    )
    # (the staging area's pool of spare files is refilled by a thread: it may add one late)
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        fs = Filesystem(vol, StagingArea(Path(tmp), vol.keys.cache, vol.chunk), Options())
        await fs.ensure_root()
        docs = await fs.mkdir(ROOT_INO, b"docs", 0o750, 1000, 1000)
        for path, data in FILES.items():
            parent = docs.ino if path.startswith("/docs/") else ROOT_INO
            node, h = await fs.create(parent, path.rsplit("/", 1)[1].encode(), 0o640, 1000, 1000)
            await fs.write(h.fh, 0, data)
            await fs.release(h.fh)
            await fs.setattr(node.ino, mtime_ns=MTIME)
            await fs.sync_node(node)
        await fs.symlink(ROOT_INO, b"link", b"docs/report.pdf", 1000, 1000)
        if special:  # FORMAT.md §7.9 (golden_volume_v2_special.json)
            for name, mode, rdev in SPECIAL:
                await fs.mknod(docs.ino, name.encode(), mode, rdev, 1000, 1000)
        await fs.flush_all()
    if rotated:
        await rotate(vol, to_source=KeySource(keyfile=Secret(KEY2)), settle=0)
    return {
        "key_file": b64e(KEY2 if rotated else KEY),
        "files": {p: d.hex() for p, d in FILES.items()},
        "objects": {
            k: {"body": body.hex(), "metadata": dict(md)}
            for k, (body, md, _e) in store.objects.items()
        },
    }


if __name__ == "__main__":  # OUT.json [--special] [--segments] [--rotated]
    golden = trio.run(
        build, "--special" in sys.argv, "--segments" in sys.argv, "--rotated" in sys.argv
    )
    out = json.dumps(golden, indent=1, sort_keys=True)
    Path(sys.argv[1]).write_text(out + "\n")

"""A walk of many names (``find`` over a large tree), in process: what the inode table holds
while the kernel references the names, and after it forgets them (as it does when it drops
its caches).  Shows that memory is bounded by what the kernel caches, not by every name
walked (issue 18).  The store is in memory: this measures the file system's own memory, not
S3; the tree is written once through a Filesystem, the walk is made by another.

    .venv/bin/python -m benchmarks.names [--names 200000] [--per-dir 1000]
"""

from __future__ import annotations

import argparse
import gc
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

import trio

from cryptfs.fs.filesystem import ROOT_INO
from cryptfs.store.memory import MemoryStore
from tests.fsutil import kernel_walk, write_file
from tests.unit.test_filesystem import make_fs


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


async def run(names: int, per_dir: int) -> None:
    store = MemoryStore()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        writer = await make_fs(t / "w", store, metadata_ttl=3600)  # (no relisting per create)
        started = time.monotonic()
        for d in range(-(-names // per_dir)):
            dn = await writer.mkdir(ROOT_INO, b"d%04d" % d, 0o755, 0, 0)
            for i in range(min(per_dir, names - d * per_dir)):
                await write_file(writer, dn.ino, b"file-%06d" % i, b"x")
        print(f"wrote {names} files in {time.monotonic() - started:.1f} s")
        del writer
        gc.collect()
        fs = await make_fs(t / "r", store)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        taken: list[int] = []
        started = time.monotonic()
        seen = await kernel_walk(fs, ROOT_INO, taken)
        walked = time.monotonic() - started
        held = tracemalloc.get_traced_memory()[0] - base
        print(f"walked {seen} names in {walked:.1f} s: {len(fs.inodes)} inodes, {_mib(held)}")
        fs.forget((ino, 1) for ino in taken)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0] - base
        print(f"after the kernel forgot them: {len(fs.inodes)} inodes, {_mib(after)}")
        again: list[int] = []
        started = time.monotonic()
        seen2 = await kernel_walk(fs, ROOT_INO, again)
        print(f"walked again: {seen2} names in {time.monotonic() - started:.1f} s")
        tracemalloc.stop()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"peak RSS of this process (writer, store and walk): {rss / 1024:.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--names", type=int, default=200_000)
    ap.add_argument("--per-dir", type=int, default=1000)
    a = ap.parse_args()
    trio.run(run, a.names, a.per_dir)


if __name__ == "__main__":
    main()

"""fsx-style randomised file operations through a real mount, checked against a local copy.

Random writes (inside, across and beyond the end), truncates (down and up), reads at random
offsets, fsync, close/reopen, renames and remounts; after every read and at every remount the
mount must hold exactly what the reference copy holds.  CI runs a bounded number of
operations; ``pytest --fsx-ops=20000 --fsx-seed=N tests/e2e/test_fsx.py`` runs longer or
replays a failure (the seed is printed when an assertion fails).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.e2e.conftest import Volume

pytestmark = pytest.mark.e2e

NAMES = ["a", "b", "c", "d"]
MAX_OFF = 3 << 20  # crosses 64 KiB chunks and 8 MiB parts stay rare: keep it fast


class Pair:
    """The same file opened on the mount and in the reference directory."""

    def __init__(self, mnt: Path, ref: Path, name: str) -> None:
        flags = os.O_RDWR | os.O_CREAT
        self.name = name
        self.m = os.open(mnt / name, flags, 0o644)
        self.r = os.open(ref / name, flags, 0o644)

    def close(self) -> None:
        os.close(self.m)
        os.close(self.r)


def _compare(mnt: Path, ref: Path, why: str) -> None:
    names = sorted(os.listdir(ref))
    assert sorted(os.listdir(mnt)) == names, why
    for n in names:
        want = (ref / n).read_bytes()
        got = (mnt / n).read_bytes()
        assert len(got) == len(want), f"{why}: {n} size {len(got)} != {len(want)}"
        if got != want:
            first = next(i for i, (x, y) in enumerate(zip(got, want, strict=True)) if x != y)
            raise AssertionError(f"{why}: {n} differs from byte {first}")


@pytest.mark.parametrize("extra", [[], ["--writeback-cache"]], ids=["plain", "writeback-cache"])
def test_fsx_random_operations(
    volume: Volume, tmp_path: Path, request: pytest.FixtureRequest, extra: list[str]
) -> None:
    ops = int(request.config.getoption("--fsx-ops"))
    seed_opt = request.config.getoption("--fsx-seed")
    seed = int(seed_opt) if seed_opt is not None else int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    ref = tmp_path / "ref"
    ref.mkdir()
    volume.mount(*extra)
    mnt = volume.mnt
    open_files: dict[str, Pair] = {}
    counts: dict[str, int] = {}

    def pair(name: str) -> Pair:
        if name not in open_files:
            open_files[name] = Pair(mnt, ref, name)
        return open_files[name]

    def close_all() -> None:
        for p in open_files.values():
            p.close()
        open_files.clear()

    try:
        for step in range(ops):
            op = rng.choices(
                ["write", "append", "read", "truncate", "fsync", "close", "rename", "remount"],
                weights=[30, 10, 30, 10, 4, 8, 5, 1],
            )[0]
            counts[op] = counts.get(op, 0) + 1
            name = rng.choice(NAMES)
            where = f"seed {seed}, step {step} ({op} {name})"
            if op in ("write", "append"):
                p = pair(name)
                size = os.fstat(p.r).st_size
                off = size if op == "append" else rng.randrange(0, MAX_OFF)
                data = rng.randbytes(rng.choice([1, 100, 4096, 65536, 70000, 200_000]))
                assert os.pwrite(p.m, data, off) == len(data), where
                os.pwrite(p.r, data, off)
            elif op == "read":
                p = pair(name)
                size = os.fstat(p.r).st_size
                off = rng.randrange(0, size + 10) if size else 0
                n = rng.choice([1, 4096, 65536, 300_000])
                assert os.fstat(p.m).st_size == size, where
                assert os.pread(p.m, n, off) == os.pread(p.r, n, off), where
            elif op == "truncate":
                p = pair(name)
                size = os.fstat(p.r).st_size
                new = rng.choice(
                    [0, size // 2, size + rng.randrange(1, 200_000), rng.randrange(0, MAX_OFF)]
                )
                os.ftruncate(p.m, new)
                os.ftruncate(p.r, new)
            elif op == "fsync":
                os.fsync(pair(name).m)
            elif op == "close" and name in open_files:
                open_files.pop(name).close()
            elif op == "rename":
                other = rng.choice(NAMES)
                if other == name or not (ref / name).exists():
                    continue
                close_all()
                os.rename(mnt / name, mnt / other)
                os.rename(ref / name, ref / other)
            elif op == "remount":
                close_all()
                volume.umount()
                volume.mount(*extra)
                _compare(mnt, ref, where)
        close_all()
        _compare(mnt, ref, f"seed {seed}, end")
        volume.umount()
        volume.mount(*extra)
        _compare(mnt, ref, f"seed {seed}, after the final remount")
    finally:
        close_all()
        if volume.mounted:
            volume.umount()
    print(f"fsx: seed {seed}, {ops} operations: {sorted(counts.items())}")

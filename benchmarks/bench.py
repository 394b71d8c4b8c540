"""cryptfs benchmark: workloads through a real mount vs. raw S3 on the same server, and the
same workloads through ``rclone mount`` of an rclone ``crypt`` remote and through ``s3fs``
(s3fs-fuse, no client-side encryption), all in one run.

Usage: ``make bench`` or ``python benchmarks/bench.py [--size-mib 1024] [--files 2000]``.
Starts its own SeaweedFS on free loopback ports, prints a Markdown table and writes it with
machine, versions and date to ``benchmarks/results/``.  Ratios are cryptfs / ceiling (for
throughput: higher is better; for times the ratio is ceiling-time / cryptfs-time, so 1.0
means "as fast as the ceiling" everywhere), and likewise cryptfs / each other mount (> 1:
cryptfs is faster).  Write figures run until the data is in S3 (dd conv=fsync, then
unmount, which waits for uploads), so that a mount that uploads after close is not flattered.

Rounds (``--rounds``, 3 by default): every round measures the raw ceiling and every mount
afresh (a volume, a remote and keys of its own), a different mount first in each round, so
that a machine getting slower or faster during the run favours none.  The table gives each
figure's median over the rounds, and each ratio as the median of the ratios taken within one
round (with their range); the CPU table says which process spent the time (``/proc/PID/stat``
of the daemon and of SeaweedFS, rusage of the tool).  ``--no-rclone`` / ``--no-s3fs`` leave a
column out (each is also left out when its program is not installed).

"Cold" means nothing of the data on the client: the mount is remounted (the kernel drops a
FUSE file's pages with its inode) and its cache directory emptied.  The page cache of the
machine is not dropped: SeaweedFS shares this machine, and dropping its cache would make the
mounts' reads pay for its disk reads, which the raw ceiling, measured right after its PUT,
does not.  The re-read from the local disk cache evicts that cache's files from the page
cache only (``POSIX_FADV_DONTNEED``), so it reads the disk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random  # noqa: TID251 - benchmark offsets, not secrets
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import ACCESS_KEY, SECRET_KEY, start_seaweed, stop_seaweed  # noqa: E402


def run(*cmd: str, **kw: object) -> None:
    subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ProcWatch:
    """Samples a process's peak RSS (VmHWM) and CPU time while running; the CPU figure is
    the last one read, so a daemon that exits inside the block (unmount) loses at most one
    sampling interval of it."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.peak = 0
        self.cpu = 0.0
        self._cpu0: float | None = None
        self._interval = interval
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> bool:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak = max(self.peak, int(line.split()[1]) * 1024)
            c = proc_cpu(self.pid)
        except (OSError, IndexError, ValueError):
            return False
        if self._cpu0 is None:
            self._cpu0 = c
        self.cpu = c - self._cpu0
        return True

    def _loop(self) -> None:
        while self._sample() and not self._stop.wait(self._interval):
            pass

    def __enter__(self) -> ProcWatch:
        self._sample()
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self._sample()


class Cpu:
    """CPU seconds of SeaweedFS and of the tool (the children this script waited for)
    during a block."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.server = self.tool = 0.0

    def __enter__(self) -> Cpu:
        self._s0 = proc_cpu(self.server_pid)
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._t0 = ru.ru_utime + ru.ru_stime
        return self

    def __exit__(self, *exc: object) -> None:
        self.server = proc_cpu(self.server_pid) - self._s0
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.tool = ru.ru_utime + ru.ru_stime - self._t0


def evict(root: Path) -> None:
    """Drop the page cache of the files under ``root`` (only theirs)."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


class Target:
    """A mounted file system under test: cryptfs, or rclone crypt for comparison."""

    name = ""
    mnt: Path
    cache: Path
    pid = 0
    cli_cpu = 0.0  # CPU of this target's own commands (mount, umount): not the tool's

    def mount(self) -> int:
        raise NotImplementedError

    def umount(self) -> None:
        raise NotImplementedError

    def cold(self) -> None:
        """Remounted with nothing of the data left on this host."""
        raise NotImplementedError

    def evict_cache(self) -> None:
        """The mount's local cache is read from disk next, not from the page cache."""
        evict(self.cache)

    def s3_bytes(self) -> tuple[int, int] | None:
        """Bytes this mount received from and sent to S3 so far (None: it does not say)."""
        return None


class Cryptfs(Target):
    name = "cryptfs"

    def __init__(self, endpoint: str, bucket: str, work: Path, tag: str) -> None:
        self.url = f"s3://{bucket}/bench-{tag}"
        self.endpoint = endpoint
        self.key = work / f"bench-{tag}.key"
        self.mnt = work / f"mnt-{tag}"
        self.cache = work / f"cache-{tag}"
        self.mnt.mkdir()
        self.cli("init", self.url, "--key-file", str(self.key))

    def cli(self, *args: str) -> str:
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        r = subprocess.run(
            [sys.executable, "-m", "cryptfs", *args, *(["--endpoint-url", self.endpoint]
                                                       if args[0] in ("init", "mount") else [])],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cli_cpu += ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
        return r.stdout

    def mount(self, *extra: str) -> int:
        out = self.cli(
            "mount",
            self.url,
            str(self.mnt),
            "--key-file",
            str(self.key),
            "--cache-dir",
            str(self.cache),
            *extra,
        )
        self.pid = int(out.rsplit("(pid ", 1)[1].split(")")[0])
        return self.pid

    def umount(self) -> None:
        self.cli("umount", str(self.mnt))

    def s3_bytes(self) -> tuple[int, int] | None:
        snap = json.loads(self.cli("stats", str(self.mnt), "--json"))
        return int(snap["s3_bytes_in"]), int(snap["s3_bytes_out"])

    def cold(self) -> None:
        """Nothing of the files' data left on this host: a new daemon (memory), a new FUSE
        inode (the kernel's pages of the old one went with it), no staging, no block cache."""
        self.umount()
        for d in self.cache.iterdir():
            shutil.rmtree(d / "staging", ignore_errors=True)
            shutil.rmtree(d / "blocks", ignore_errors=True)
        self.mount()


class Foreground(Target):
    """A mount that runs as a process of ours in the foreground (rclone, s3fs): measured as
    that process; unmounted by fusermount, done when the process has exited."""

    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> int:
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=self.log.open("ab"), env=env
        )
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not come up: {self.log.read_text()[-500:]}")
            time.sleep(0.05)  # noqa: TID251 - a script, no event loop
        self.pid = self.proc.pid
        return self.pid

    def umount(self) -> None:
        """Returns once the process has exited, i.e. after it finished its uploads."""
        assert self.proc is not None
        subprocess.run(["fusermount3", "-u", str(self.mnt)], check=False)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.proc.wait(600)
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # (its whole life: not the tool's)
        self.cli_cpu += ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime

    def cold(self) -> None:
        self.umount()
        self.mount()


class Rclone(Foreground):
    """``rclone mount`` of an rclone ``crypt`` remote over the same server and bucket
    (``--vfs-cache-mode writes``, uploads on close without delay)."""

    name = "rclone crypt"

    def __init__(self, endpoint: str, bucket: str, work: Path, tag: str) -> None:
        self.mnt = work / f"rmnt-{tag}"
        self.mnt.mkdir()
        self.cache = work / f"rcache-{tag}"
        self.conf = work / f"rclone-{tag}.conf"
        self.log = work / "rclone.log"
        obscure = lambda p: subprocess.run(  # noqa: E731
            ["rclone", "obscure", p], capture_output=True, text=True, check=True
        ).stdout.strip()
        self.conf.write_text(
            "[s3]\ntype = s3\nprovider = Other\n"
            f"access_key_id = {ACCESS_KEY}\nsecret_access_key = {SECRET_KEY}\n"
            f"endpoint = {endpoint}\nregion = us-east-1\n\n"
            f"[secret]\ntype = crypt\nremote = s3:{bucket}/rclone-{tag}\n"
            f"password = {obscure(os.urandom(16).hex())}\n"
            f"password2 = {obscure(os.urandom(16).hex())}\n"
        )

    def mount(self) -> int:
        return self.start(
            ["rclone", "--config", str(self.conf), "mount", "secret:", str(self.mnt),
             "--vfs-cache-mode", "writes", "--vfs-write-back", "0s",
             "--cache-dir", str(self.cache), "--allow-non-empty"],
            # rclone's S3 backend refuses AWS_CA_BUNDLE with its own HTTP transport
            env={k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"},
        )  # fmt: skip

    def cold(self) -> None:
        self.umount()
        shutil.rmtree(self.cache, ignore_errors=True)
        self.mount()


class S3fs(Foreground):
    """``s3fs`` (s3fs-fuse, Debian's package) over the same server and bucket: no client-side
    encryption, the most installed S3 mount; its defaults (no local cache directory), in the
    foreground so that its process is the one measured."""

    name = "s3fs"

    def __init__(self, endpoint: str, bucket: str, work: Path, tag: str, client: Any) -> None:
        self.mnt = work / f"smnt-{tag}"
        self.mnt.mkdir()
        self.cache = work / f"scache-{tag}"  # (unused: s3fs keeps no disk cache by default)
        self.cache.mkdir()
        self.passwd = work / f"s3fs-{tag}.passwd"
        self.passwd.write_text(f"{ACCESS_KEY}:{SECRET_KEY}\n")
        self.passwd.chmod(0o600)
        self.source = f"{bucket}:/s3fs-{tag}"
        self.endpoint = endpoint
        self.log = work / "s3fs.log"
        # s3fs mounts a prefix only once something is under it
        client.put_object(Bucket=bucket, Key=f"s3fs-{tag}/", Body=b"")

    def mount(self) -> int:
        return self.start(
            ["s3fs", self.source, str(self.mnt), "-f",
             "-o", f"url={self.endpoint},use_path_request_style,passwd_file={self.passwd}",
             "-o", "dbglevel=warn"],
        )  # fmt: skip


async def raw_s3(
    endpoint: str, bucket: str, size: int, files: int, conc: int, tag: str, server_pid: int
) -> dict[str, float]:
    """The ceiling: the same bytes as plain aiobotocore requests (keys under ``raw-<tag>/``);
    also the CPU seconds of this client (``*_cpu``) and of SeaweedFS (``*_server_cpu``)."""
    from aiobotocore.session import get_session

    from cryptfs.store.s3 import S3Options, make_config

    cfg = make_config(S3Options(endpoint_url=endpoint, max_concurrency=64))
    res: dict[str, float] = {}
    big, pre = f"raw-{tag}/big", f"raw-{tag}/small"
    cpu0: tuple[float, float] = (0.0, 0.0)

    def start() -> float:
        nonlocal cpu0
        cpu0 = (time.process_time(), proc_cpu(server_pid))
        return time.perf_counter()

    def spent(name: str) -> None:
        res[f"{name}_cpu"] = time.process_time() - cpu0[0]
        res[f"{name}_server_cpu"] = proc_cpu(server_pid) - cpu0[1]

    async with get_session().create_client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", config=cfg,
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
    ) as c:  # fmt: skip
        part = 8 << 20
        data = os.urandom(part)
        sem = asyncio.Semaphore(conc)
        t = start()
        up = await c.create_multipart_upload(Bucket=bucket, Key=big)
        parts = size // part

        async def put_part(i: int) -> dict[str, object]:
            async with sem:
                r = await c.upload_part(
                    Bucket=bucket,
                    Key=big,
                    UploadId=up["UploadId"],
                    PartNumber=i + 1,
                    Body=data,
                )
                return {"PartNumber": i + 1, "ETag": r["ETag"]}

        done = await asyncio.gather(*(put_part(i) for i in range(parts)))
        await c.complete_multipart_upload(
            Bucket=bucket,
            Key=big,
            UploadId=up["UploadId"],
            MultipartUpload={"Parts": list(done)},
        )
        res["put_mib_s"] = size / (1 << 20) / (time.perf_counter() - t)
        spent("put")

        async def get_range(i: int) -> int:
            async with sem:
                r = await c.get_object(
                    Bucket=bucket, Key=big, Range=f"bytes={i * part}-{(i + 1) * part - 1}"
                )
                async with r["Body"] as b:
                    return len(await b.read())

        t = start()
        got = sum(await asyncio.gather(*(get_range(i) for i in range(parts))))
        assert got == size
        res["get_mib_s"] = size / (1 << 20) / (time.perf_counter() - t)
        spent("get")

        small = os.urandom(4096)
        sem32 = asyncio.Semaphore(32)

        async def put_small(i: int) -> None:
            async with sem32:
                await c.put_object(Bucket=bucket, Key=f"{pre}/{i:05d}", Body=small)

        async def get_small(i: int) -> None:
            async with sem32:
                r = await c.get_object(Bucket=bucket, Key=f"{pre}/{i:05d}")
                async with r["Body"] as b:
                    await b.read()

        t = start()
        await asyncio.gather(*(put_small(i) for i in range(files)))
        res["small_put_s"] = time.perf_counter() - t
        spent("small_put")
        t = time.perf_counter()
        n = 0
        async for page in c.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{pre}/"
        ):
            n += len(page.get("Contents", []))
        res["small_list_s"] = time.perf_counter() - t
        t = start()
        await asyncio.gather(*(get_small(i) for i in range(files)))
        res["small_get_s"] = time.perf_counter() - t
        spent("small_get")

        async def rewrap_small(i: int) -> None:  # what a rotation does per object
            async with sem32:
                k = f"{pre}/{i:05d}"
                h = await c.head_object(Bucket=bucket, Key=k)
                await c.copy_object(
                    Bucket=bucket,
                    Key=k,
                    CopySource={"Bucket": bucket, "Key": k},
                    MetadataDirective="REPLACE",
                    Metadata={"x": str(i)},
                    CopySourceIfMatch=h["ETag"],
                )

        t = time.perf_counter()
        await asyncio.gather(*(rewrap_small(i) for i in range(files)))
        res["small_rewrap_per_s"] = files / (time.perf_counter() - t)
    return res


def timed(fn: object) -> float:
    t = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t


def make_source_tree(root: Path, files: int, total: int) -> None:
    per = max(1, total // files)
    for i in range(files):
        d = root / f"d{i % 30:02d}" / f"s{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}.dat").write_bytes(os.urandom(per))


def random_reads(path: Path, n: int, seed: int = 7) -> float:
    """4 KiB reads at ``n`` random aligned offsets, one at a time, as a database would
    (``POSIX_FADV_RANDOM``: no kernel read-ahead); returns reads per second."""
    size = path.stat().st_size
    rng = random.Random(seed)  # noqa: S311
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(n)]
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        t = time.perf_counter()
        for off in offsets:
            if len(os.pread(fd, 4096, off)) != 4096:
                raise RuntimeError("short read")
        return n / (time.perf_counter() - t)
    finally:
        os.close(fd)


def workloads(
    m: Target, args: argparse.Namespace, small: Path, tree: Path, server_pid: int
) -> dict[str, float]:
    """Every workload through one mounted file system; times in seconds, and for the main
    ones ``<name>_cpu`` (the daemon), ``<name>_server_cpu`` and ``<name>_tool_cpu``."""
    r: dict[str, float] = {}
    mib = args.size_mib

    @contextlib.contextmanager
    def measured(name: str) -> Iterator[None]:
        cli0 = m.cli_cpu
        with ProcWatch(m.pid) as w, Cpu(server_pid) as c:
            yield
        r[f"{name}_cpu"], r[f"{name}_rss"] = w.cpu, w.peak
        r[f"{name}_server_cpu"] = c.server
        r[f"{name}_tool_cpu"] = c.tool - (m.cli_cpu - cli0)

    m.mount()
    with measured("write"):
        t = timed(
            lambda: run(
                "dd",
                "if=/dev/zero",
                f"of={m.mnt}/big",
                "bs=1M",
                f"count={mib}",
                "conv=fsync",
                "status=none",
            )
        )
        r["write_dd_s"] = t
        r["write_s"] = t + timed(m.umount)  # until it is all in S3
    m.mount()
    m.cold()
    with measured("read"):
        r["read_s"] = timed(
            lambda: run("dd", f"if={m.mnt}/big", "of=/dev/null", "bs=1M", "status=none")
        )
    # again after a remount: only this host's disk cache (if any) is left, read from disk
    m.umount()
    m.evict_cache()
    m.mount()
    with measured("reread"):
        r["reread_s"] = timed(
            lambda: run("dd", f"if={m.mnt}/big", "of=/dev/null", "bs=1M", "status=none")
        )

    # edits of the big file, each until in S3 (issue 21): 1 MiB appended, 4 KiB written at
    # its middle, and rsync --inplace of a copy that differs in one 64 KiB region (the copy
    # made first, through the mount); for cryptfs the bytes through the client, from its own
    # counters
    local = small.parent / f"inplace-{m.name.replace(' ', '-')}"

    def local_copy() -> None:
        shutil.copyfile(m.mnt / "big", local)
        with open(local, "r+b") as f:
            f.seek(300 << 20)
            f.write(os.urandom(64 << 10))

    dd = ("dd", "if=/dev/urandom", f"of={m.mnt}/big", "conv=notrunc,fsync", "status=none")
    for name, cmd in (
        ("append", (*dd, "bs=1M", "count=1", "oflag=append")),
        ("midwrite", (*dd, "bs=4K", "count=1", f"seek={mib * 128}")),
        ("inplace", ("rsync", "--inplace", "--no-whole-file", "--fsync", str(local),
                     f"{m.mnt}/big")),
    ):  # fmt: skip
        if name == "inplace":
            local_copy()
        b0 = m.s3_bytes()
        with measured(name):
            r[f"{name}_s"] = timed(lambda: run(*cmd))  # noqa: B023
        b1 = m.s3_bytes()
        if b0 is not None and b1 is not None:
            r[f"{name}_in_mib"] = (b1[0] - b0[0]) / 2**20
            r[f"{name}_out_mib"] = (b1[1] - b0[1]) / 2**20
    local.unlink()

    m.cold()  # a fresh daemon: its peak RSS for a smaller file, to compare with the big one
    with measured("small_write"):
        run(
            "dd",
            "if=/dev/urandom",
            f"of={m.mnt}/rand",
            "bs=1M",
            f"count={args.random_mib}",
            "conv=fsync",
            "status=none",
        )
    m.cold()
    r["rand_cold"] = random_reads(m.mnt / "rand", args.random_reads)
    r["rand_warm"] = random_reads(m.mnt / "rand", args.random_reads)

    with measured("create"):
        r["create_cp_s"] = timed(lambda: run("cp", "-r", str(small), f"{m.mnt}/small"))
        r["create_s"] = r["create_cp_s"] + timed(m.umount)
    m.mount()
    m.cold()
    with measured("ls"):
        r["ls_s"] = timed(
            lambda: subprocess.run(
                ["ls", "-l", f"{m.mnt}/small"], check=True, stdout=subprocess.DEVNULL
            )
        )
    names = sorted(os.listdir(small))
    with measured("readall"):
        r["readall_s"] = timed(
            lambda: run("cat", *[f"{m.mnt}/small/{n}" for n in names], stdout=subprocess.DEVNULL)
        )

    def reported(what: str, *cmd: str) -> None:
        """``cmd``, timed whatever it ends with; a failure (what a mount left broken) is
        reported, not fatal."""
        res = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if res.returncode != 0:
            print(f"  ({m.name}: {what} exit {res.returncode}: {res.stderr.strip()[:200]})")

    def rsync(dest: str = "tree") -> None:
        reported("rsync", "rsync", "-a", f"{tree}/", f"{m.mnt}/{dest}/")

    with measured("rsync1"):
        r["rsync1_s"] = timed(rsync)
    with measured("rsync2"):
        r["rsync2_s"] = timed(rsync)
    m.cold()
    with measured("walk"):  # every name and its attributes, as backup tools begin
        r["walk_s"] = timed(
            lambda: run("find", f"{m.mnt}/tree", "-printf", "%s %T@ %m %p\\n",
                        stdout=subprocess.DEVNULL)
        )  # fmt: skip
    m.cold()
    out = Path(f"{small.parent}/out-{m.name.replace(' ', '-')}")
    with measured("copyout"):
        r["copyout_s"] = timed(lambda: reported("cp -a out", "cp", "-a", f"{m.mnt}/tree", str(out)))
    shutil.rmtree(out, ignore_errors=True)

    (m.mnt / "ren").mkdir()
    for i in range(args.rename_files):
        (m.mnt / "ren" / f"f{i}").write_bytes(b"x" * 100)
    m.cold()
    r["rename_s"] = timed(lambda: os.rename(m.mnt / "ren", m.mnt / "renamed"))
    m.umount()
    if isinstance(m, Cryptfs):
        # the no-op rsync when cryptfs trusts metadata as long as rclone does by default
        # (--dir-cache-time 5m): the first rsync no longer outlasts the metadata TTL
        m.mount("--metadata-ttl", "300")
        rsync("tree-ttl")
        r["rsync2_ttl_s"] = timed(lambda: rsync("tree-ttl"))
        m.umount()
    return r


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> str:
    """Median, and the range over the rounds when there are several."""
    m = med(xs)
    if len(xs) < 2:
        return f"{m:.2f}"
    return f"{m:.2f} ({min(xs):.2f}–{max(xs):.2f})"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every workload (median)")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--random-mib", type=int, default=256)
    ap.add_argument("--random-reads", type=int, default=2000)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--tree-files", type=int, default=3000)
    ap.add_argument("--tree-mib", type=int, default=60)
    ap.add_argument("--rename-files", type=int, default=500)
    ap.add_argument("--no-rclone", action="store_true", help="skip the rclone crypt column")
    ap.add_argument("--no-s3fs", action="store_true", help="skip the s3fs column")
    ap.add_argument(
        "--versioning",
        action="store_true",
        help="turn on the bucket's versioning (edits stage only what they write)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = ap.parse_args()
    size = args.size_mib << 20
    os.environ["AWS_ACCESS_KEY_ID"] = ACCESS_KEY
    os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
    work = Path(tempfile.mkdtemp(prefix="cryptfs-bench-"))
    server = start_seaweed(work / "s3")
    spid = server.proc.pid
    rclone = shutil.which("rclone") is not None and not args.no_rclone
    s3fs = shutil.which("s3fs") is not None and not args.no_s3fs
    raws: list[dict[str, float]] = []
    cfs: list[dict[str, float]] = []
    # the other mounts' results by name, in the order of the table's columns
    others: dict[str, list[dict[str, float]]] = {}
    if rclone:
        others["rclone crypt"] = []
    if s3fs:
        others["s3fs"] = []
    locals_: list[tuple[float, float]] = []
    started = time.time()
    try:
        c = server.client()
        c.create_bucket(Bucket="bench")
        if args.versioning:
            c.put_bucket_versioning(Bucket="bench", VersioningConfiguration={"Status": "Enabled"})
        small = work / "small"
        small.mkdir()
        for i in range(args.files):
            (small / f"f{i:05d}").write_bytes(os.urandom(4096))
        tree = work / "tree"
        make_source_tree(tree, args.tree_files, args.tree_mib << 20)
        m: Cryptfs | None = None
        for rnd in range(args.rounds):
            tag = f"r{rnd + 1}"
            print(f"round {rnd + 1}/{args.rounds}: raw S3…", flush=True)
            ceiling = raw_s3(server.endpoint, "bench", size, args.files, 4, tag, spid)
            raws.append(asyncio.run(ceiling))
            dest = f"{work}/local-{tag}/"
            locals_.append(
                (
                    timed(lambda: run("rsync", "-a", f"{tree}/", dest)),  # noqa: B023
                    timed(lambda: run("rsync", "-a", f"{tree}/", dest)),  # noqa: B023
                )
            )
            m = Cryptfs(server.endpoint, "bench", work, tag)
            targets: list[Target] = [m]
            if rclone:
                targets.append(Rclone(server.endpoint, "bench", work, tag))
            if s3fs:
                targets.append(S3fs(server.endpoint, "bench", work, tag, c))
            # each round a different mount goes first (the machine's drift favours nobody)
            targets = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
            for t in targets:
                print(f"round {rnd + 1}/{args.rounds}: {t.name} workloads…", flush=True)
                res = workloads(t, args, small, tree, spid)
                (cfs if t is m else others[t.name]).append(res)

        # master-key rotation of the last round's volume: server-side rewrap, no download
        assert m is not None
        out = m.cli(
            "rotate",
            m.url,
            "--key-file",
            str(m.key),
            "--to-key-file",
            str(work / "new.key"),
            "--endpoint-url",
            m.endpoint,
            # nothing is mounted: no window for mounts to see the new config (the default
            # 35 s of it was most of the row: 8502 objects at a steady "240/s")
            "--settle",
            "0",
        )
        line = next(x for x in out.splitlines() if x.startswith("data keys rewrapped"))
        n_rot, rate = line.split(":")[1].split()[0], float(line.split("(")[1].split("/s")[0])
        dl = next(x for x in out.splitlines() if x.startswith("bytes downloaded")).split()[-1]
    finally:
        for d in [*work.glob("mnt-*"), *work.glob("rmnt-*"), *work.glob("smnt-*")]:
            subprocess.run(["fusermount3", "-uz", str(d)], check=False, stderr=subprocess.DEVNULL)
        stop_seaweed(server)

    mib = args.size_mib
    for d in (*cfs, *(d for ds in others.values() for d in ds)):
        d["write_mib_s"] = mib / d["write_s"]
        d["read_mib_s"] = mib / d["read_s"]
        d["reread_mib_s"] = mib / d["reread_s"]
    for ceil_d, (l1, l2) in zip(raws, locals_, strict=True):
        ceil_d["local1_s"], ceil_d["local2_s"] = l1, l2
    rows: list[tuple[str, ...]] = []

    def row(label: str, key: str, ceil_key: str | None, ceil_txt: str, unit: str) -> None:
        """Medians over the rounds; each ratio is the median of the ratios within a round
        (throughput: cryptfs / other; time: other / cryptfs; > 1: cryptfs is faster)."""
        rate = unit != "s"

        def ratio(mine: float, other: float) -> float:
            return mine / other if rate else other / mine

        def fmt(v: float) -> str:
            return f"{v:.2f} s" if not rate else f"{v:.0f} {unit}"

        v = [d[key] for d in cfs]
        cells = [label, fmt(med(v))]
        if ceil_key is not None:
            cv = [d[ceil_key] for d in raws]
            rs = [ratio(a, b) for a, b in zip(v, cv, strict=True)]
            cells += [ceil_txt.format(fmt(med(cv))), spread(rs)]
        else:
            cells += ["—", "—"]
        for ds in others.values():
            ov = [d[key] for d in ds]
            cells += [fmt(med(ov)), spread([ratio(a, b) for a, b in zip(v, ov, strict=True)])]
        rows.append(tuple(cells))

    row(
        f"sequential write {mib} MiB (dd bs=1M conv=fsync, until in S3)",
        "write_mib_s",
        "put_mib_s",
        "{} (multipart PUT ×4)",
        "MiB/s",
    )
    row(
        f"sequential read {mib} MiB, cold, after remount",
        "read_mib_s",
        "get_mib_s",
        "{} (ranged GET ×4)",
        "MiB/s",
    )
    row(
        "the same read after another remount (local disk cache)",
        "reread_mib_s",
        "get_mib_s",
        "{} (ranged GET ×4)",
        "MiB/s",
    )

    def rss(ds: list[dict[str, float]]) -> str:
        keys = ("write_rss", "read_rss", "small_write_rss")
        return " / ".join(f"{max(d[k] for d in ds) / 2**20:.0f}" for k in keys) + " MiB"

    rows.append(
        (
            f"peak daemon RSS (highest of the rounds): write {mib} MiB / read it / "
            f"write {args.random_mib} MiB",
            rss(cfs),
            "—",
            "—",
            *(x for ds in others.values() for x in (rss(ds), "—")),
        )
    )
    row(f"append 1 MiB to the {mib} MiB file (dd conv=fsync)", "append_s", None, "", "s")
    row(f"write 4 KiB at the middle of the {mib + 1} MiB file (dd conv=fsync)", "midwrite_s",
        None, "", "s")  # fmt: skip
    row(f"rsync --inplace of a copy that differs in 64 KiB (the {mib + 1} MiB file)",
        "inplace_s", None, "", "s")  # fmt: skip
    for name, what in (("append", "the append"), ("midwrite", "the 4 KiB write"),
                       ("inplace", "the rsync --inplace")):  # fmt: skip
        if all(f"{name}_in_mib" in d for d in cfs):
            rows.append((
                f"bytes through the client for {what} (from S3 / to S3)",
                f"{med([d[f'{name}_in_mib'] for d in cfs]):.1f} / "
                f"{med([d[f'{name}_out_mib'] for d in cfs]):.1f} MiB",
                "—", "—", *("—" for _ in others for _ in (0, 1)),
            ))  # fmt: skip
    row(f"random 4 KiB reads in a {args.random_mib} MiB file, cold", "rand_cold", None, "",
        "reads/s")  # fmt: skip
    row("the same reads again, warm", "rand_warm", None, "", "reads/s")
    row(
        f"create {args.files} × 4 KiB (cp -r, then umount: until in S3)",
        "create_s",
        "small_put_s",
        "{} (PUT ×32)",
        "s",
    )
    row("cold ls -l of them", "ls_s", "small_list_s", "{} (LIST)", "s")
    row("read them all (cat, sequential)", "readall_s", "small_get_s", "{} (GET ×32)", "s")
    row(
        f"rsync -a of {args.tree_files} files / {args.tree_mib} MiB",
        "rsync1_s",
        "local1_s",
        "{} (local disk)",
        "s",
    )
    row("second, no-op rsync -a", "rsync2_s", "local2_s", "{} (local disk)", "s")
    ttl = [d["rsync2_ttl_s"] for d in cfs]
    rows.append(
        (
            "the no-op rsync -a with cryptfs --metadata-ttl 300 (rclone's default "
            "--dir-cache-time: 5 min)",
            f"{med(ttl):.2f} s",
            f"{med([d['local2_s'] for d in raws]):.2f} s (local disk)",
            spread([d["local2_s"] / v for d, v in zip(raws, ttl, strict=True)]),
            *(
                x
                for ds in others.values()
                for x in (
                    f"{med([d['rsync2_s'] for d in ds]):.2f} s",
                    spread([d["rsync2_s"] / v for d, v in zip(ds, ttl, strict=True)]),
                )
            ),
        )
    )
    row(f"cold find of the {args.tree_files} files (name, size, mtime, mode)", "walk_s", None,
        "", "s")  # fmt: skip
    row(f"cold cp -a of the {args.tree_files} files out of the mount", "copyout_s", None, "", "s")
    row(f"rename a directory of {args.rename_files} files", "rename_s", None, "", "s")
    ceil = raws[-1]["small_rewrap_per_s"]
    rows.append(
        (
            f"rotate: rewrap {n_rot} objects (bytes downloaded: {dl}; last round only)",
            f"{rate:.0f} obj/s",
            f"{ceil:.0f} obj/s (HEAD+COPY ×32)",
            f"{rate / ceil:.2f}",
            *(["—", "—"] * len(others)),
        )
    )

    cols = "".join(f" {n} | cryptfs vs {n} |" for n in others)
    head = (
        f"| workload | cryptfs | ceiling | ratio |{cols}\n"
        f"| --- | --- | --- | --- |{' --- | --- |' * len(others)}\n"
    )
    table = head + "".join("| " + " | ".join(r) + " |\n" for r in rows)

    # where the time went: CPU seconds per process (medians over the rounds)
    def cpu_cell(ds: list[dict[str, float]], name: str, wall_key: str) -> str:
        if not ds:
            return "—"
        parts = [med([d[wall_key] for d in ds])]
        parts += [med([d[f"{name}{k}"] for d in ds]) for k in ("_cpu", "_server_cpu", "_tool_cpu")]
        return " / ".join(f"{x:.2f}" for x in parts)

    def raw_cell(name: str, wall: list[float]) -> str:
        parts = [med(wall), med([d[f"{name}_cpu"] for d in raws]),
                 med([d[f"{name}_server_cpu"] for d in raws])]  # fmt: skip
        return " / ".join(f"{x:.2f}" for x in parts)

    cpu_rows = [
        (f"sequential write {mib} MiB", "write", "write_s",
         raw_cell("put", [mib / d["put_mib_s"] for d in raws])),
        (f"sequential read {mib} MiB, cold", "read", "read_s",
         raw_cell("get", [mib / d["get_mib_s"] for d in raws])),
        ("re-read (local disk cache)", "reread", "reread_s", "—"),
        (f"create {args.files} × 4 KiB", "create", "create_s",
         raw_cell("small_put", [d["small_put_s"] for d in raws])),
        ("cat of them", "readall", "readall_s",
         raw_cell("small_get", [d["small_get_s"] for d in raws])),
        (f"rsync -a of {args.tree_files} files", "rsync1", "rsync1_s", "—"),
        ("no-op rsync -a", "rsync2", "rsync2_s", "—"),
        (f"cold find of the {args.tree_files} files", "walk", "walk_s", "—"),
        (f"cold cp -a out of {args.tree_files} files", "copyout", "copyout_s", "—"),
    ]  # fmt: skip
    cpu_table = (
        "CPU seconds by process (medians over the rounds): wall / the mount's daemon (or the raw "
        "client) / SeaweedFS / the tool (dd, cp, cat, rsync); two cores in all\n\n"
        f"| workload | cryptfs | raw S3 |{''.join(f' {n} |' for n in others)}\n"
        f"| --- | --- | --- |{' --- |' * len(others)}\n"
        + "".join(
            f"| {label} | {cpu_cell(cfs, n, w)} | {raw_txt} |"
            + "".join(f" {cpu_cell(ds, n, w)} |" for ds in others.values())
            + "\n"
            for label, n, w, raw_txt in cpu_rows
        )
    )
    import cryptfs

    rv = (
        subprocess.run(["rclone", "version"], capture_output=True, text=True).stdout.split("\n")[0]
        if rclone
        else "no rclone"
    )  # (with --no-rclone, rclone need not be installed: the report failed at its very end)
    sv = (
        subprocess.run(["s3fs", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        if s3fs
        else "no s3fs"
    )
    meta = (
        f"cryptfs {cryptfs.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
        f"({(time.time() - started) / 60:.0f} min), "
        f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"SeaweedFS on loopback, {rv}, {sv}; sizes: {mib} MiB / "
        f"{args.files} files; {args.rounds} round(s), a different mount first in each round; "
        f"medians, ratios as median (range) of the ratios within each round; "
        f"dd write cryptfs {med([d['write_dd_s'] for d in cfs]):.2f} s"
        + "".join(f", {n} {med([d['write_dd_s'] for d in ds]):.2f} s" for n, ds in others.items())
        + " (the rest is the upload at unmount); ratios > 1 mean cryptfs is faster\n\n"
    )
    text = meta + table + "\n" + cpu_table
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(text)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

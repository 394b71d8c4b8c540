"""cryptfs benchmark: workloads through a real mount vs. raw S3 on the same server, and the
same workloads through ``rclone mount`` of an rclone ``crypt`` remote, all in one run.

Usage: ``make bench`` or ``python benchmarks/bench.py [--size-mib 1024] [--files 2000]``.
Starts its own SeaweedFS on free loopback ports, prints a Markdown table and writes it with
machine, versions and date to ``benchmarks/results/``.  Ratios are cryptfs / ceiling (for
throughput: higher is better; for times the ratio is ceiling-time / cryptfs-time, so 1.0
means "as fast as the ceiling" everywhere), and likewise cryptfs / rclone (> 1: cryptfs is
faster).  Write figures run until the data is in S3 (dd conv=fsync, then unmount, which
waits for uploads), so that a mount that uploads after close is not flattered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random  # noqa: TID251 - benchmark offsets, not secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import ACCESS_KEY, SECRET_KEY, start_seaweed, stop_seaweed  # noqa: E402


def run(*cmd: str, **kw: object) -> None:
    subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]


class PeakRss:
    """Samples a process tree's peak RSS (VmHWM of the daemon) while running."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except OSError:
                return
            self._stop.wait(0.2)

    def __enter__(self) -> PeakRss:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


class Target:
    """A mounted file system under test: cryptfs, or rclone crypt for comparison."""

    name = ""
    mnt: Path
    pid = 0

    def mount(self) -> int:
        raise NotImplementedError

    def umount(self) -> None:
        raise NotImplementedError

    def drop_caches(self) -> None:
        subprocess.run(["sync"], check=False)
        with contextlib.suppress(OSError):
            Path("/proc/sys/vm/drop_caches").write_text("3\n")


class Cryptfs(Target):
    name = "cryptfs"

    def __init__(self, endpoint: str, bucket: str, work: Path) -> None:
        self.url = f"s3://{bucket}/bench"
        self.endpoint = endpoint
        self.key = work / "bench.key"
        self.mnt = work / "mnt"
        self.cache = work / "cache"
        self.mnt.mkdir()
        self.cli("init", self.url, "--key-file", str(self.key))

    def cli(self, *args: str) -> str:
        r = subprocess.run(
            [sys.executable, "-m", "cryptfs", *args, *(["--endpoint-url", self.endpoint]
                                                       if args[0] in ("init", "mount") else [])],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return r.stdout

    def mount(self) -> int:
        out = self.cli(
            "mount",
            self.url,
            str(self.mnt),
            "--key-file",
            str(self.key),
            "--cache-dir",
            str(self.cache),
        )
        self.pid = int(out.rsplit("(pid ", 1)[1].split(")")[0])
        return self.pid

    def umount(self) -> None:
        self.cli("umount", str(self.mnt))

    def cold(self) -> None:
        """Nothing of the file's data left on this host (staging, page cache, memory)."""
        self.umount()
        self.drop_caches()
        for d in self.cache.iterdir():
            shutil.rmtree(d / "staging", ignore_errors=True)
            shutil.rmtree(d / "blocks", ignore_errors=True)
        self.mount()


class Rclone(Target):
    """``rclone mount`` of an rclone ``crypt`` remote over the same server and bucket
    (``--vfs-cache-mode writes``, uploads on close without delay)."""

    name = "rclone crypt"

    def __init__(self, endpoint: str, bucket: str, work: Path) -> None:
        self.mnt = work / "rmnt"
        self.mnt.mkdir()
        self.cache = work / "rcache"
        self.conf = work / "rclone.conf"
        self.log = work / "rclone.log"
        obscure = lambda p: subprocess.run(  # noqa: E731
            ["rclone", "obscure", p], capture_output=True, text=True, check=True
        ).stdout.strip()
        self.conf.write_text(
            "[s3]\ntype = s3\nprovider = Other\n"
            f"access_key_id = {ACCESS_KEY}\nsecret_access_key = {SECRET_KEY}\n"
            f"endpoint = {endpoint}\nregion = us-east-1\n\n"
            f"[secret]\ntype = crypt\nremote = s3:{bucket}/rclone\n"
            f"password = {obscure(os.urandom(16).hex())}\n"
            f"password2 = {obscure(os.urandom(16).hex())}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def mount(self) -> int:
        self.proc = subprocess.Popen(
            ["rclone", "--config", str(self.conf), "mount", "secret:", str(self.mnt),
             "--vfs-cache-mode", "writes", "--vfs-write-back", "0s",
             "--cache-dir", str(self.cache), "--allow-non-empty"],
            stdout=subprocess.DEVNULL, stderr=self.log.open("ab"),
            # rclone's S3 backend refuses AWS_CA_BUNDLE with its own HTTP transport
            env={k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"},
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"rclone mount did not come up: {self.log.read_text()[-500:]}")
            time.sleep(0.05)  # noqa: TID251 - a script, no event loop
        self.pid = self.proc.pid
        return self.pid

    def umount(self) -> None:
        """Returns once rclone has exited, i.e. after it finished its uploads."""
        assert self.proc is not None
        subprocess.run(["fusermount3", "-u", str(self.mnt)], check=False)
        self.proc.wait(600)

    def cold(self) -> None:
        self.umount()
        self.drop_caches()
        shutil.rmtree(self.cache, ignore_errors=True)
        self.mount()


async def raw_s3(endpoint: str, bucket: str, size: int, files: int, conc: int) -> dict[str, float]:
    from aiobotocore.session import get_session

    from cryptfs.store.s3 import S3Options, make_config

    cfg = make_config(S3Options(endpoint_url=endpoint, max_concurrency=64))
    res: dict[str, float] = {}
    async with get_session().create_client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", config=cfg,
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
    ) as c:  # fmt: skip
        part = 8 << 20
        data = os.urandom(part)
        sem = asyncio.Semaphore(conc)
        t = time.perf_counter()
        up = await c.create_multipart_upload(Bucket=bucket, Key="raw/big")
        parts = size // part

        async def put_part(i: int) -> dict[str, object]:
            async with sem:
                r = await c.upload_part(
                    Bucket=bucket,
                    Key="raw/big",
                    UploadId=up["UploadId"],
                    PartNumber=i + 1,
                    Body=data,
                )
                return {"PartNumber": i + 1, "ETag": r["ETag"]}

        done = await asyncio.gather(*(put_part(i) for i in range(parts)))
        await c.complete_multipart_upload(
            Bucket=bucket,
            Key="raw/big",
            UploadId=up["UploadId"],
            MultipartUpload={"Parts": list(done)},
        )
        res["put_mib_s"] = size / (1 << 20) / (time.perf_counter() - t)

        async def get_range(i: int) -> int:
            async with sem:
                r = await c.get_object(
                    Bucket=bucket, Key="raw/big", Range=f"bytes={i * part}-{(i + 1) * part - 1}"
                )
                async with r["Body"] as b:
                    return len(await b.read())

        t = time.perf_counter()
        got = sum(await asyncio.gather(*(get_range(i) for i in range(parts))))
        assert got == size
        res["get_mib_s"] = size / (1 << 20) / (time.perf_counter() - t)

        small = os.urandom(4096)
        sem32 = asyncio.Semaphore(32)

        async def put_small(i: int) -> None:
            async with sem32:
                await c.put_object(Bucket=bucket, Key=f"raw/small/{i:05d}", Body=small)

        async def get_small(i: int) -> None:
            async with sem32:
                r = await c.get_object(Bucket=bucket, Key=f"raw/small/{i:05d}")
                async with r["Body"] as b:
                    await b.read()

        t = time.perf_counter()
        await asyncio.gather(*(put_small(i) for i in range(files)))
        res["small_put_s"] = time.perf_counter() - t
        t = time.perf_counter()
        n = 0
        async for page in c.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix="raw/small/"
        ):
            n += len(page.get("Contents", []))
        res["small_list_s"] = time.perf_counter() - t
        t = time.perf_counter()
        await asyncio.gather(*(get_small(i) for i in range(files)))
        res["small_get_s"] = time.perf_counter() - t

        async def rewrap_small(i: int) -> None:  # what a rotation does per object
            async with sem32:
                k = f"raw/small/{i:05d}"
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


def workloads(m: Target, args: argparse.Namespace, small: Path, tree: Path) -> dict[str, float]:
    """Every workload through one mounted file system; times in seconds."""
    r: dict[str, float] = {}
    m.mount()
    mib = args.size_mib
    with PeakRss(m.pid) as rss:
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
    r["write_rss"] = rss.peak
    m.drop_caches()
    m.mount()
    m.cold()
    with PeakRss(m.pid) as rss:
        r["read_s"] = timed(
            lambda: run("dd", f"if={m.mnt}/big", "of=/dev/null", "bs=1M", "status=none")
        )
    r["read_rss"] = rss.peak
    # again after a remount: only this host's disk cache (if any) is left
    m.umount()
    m.drop_caches()
    m.mount()
    r["reread_s"] = timed(
        lambda: run("dd", f"if={m.mnt}/big", "of=/dev/null", "bs=1M", "status=none")
    )

    m.cold()  # a fresh daemon: its peak RSS for a smaller file, to compare with the big one
    with PeakRss(m.pid) as rss:
        run(
            "dd",
            "if=/dev/urandom",
            f"of={m.mnt}/rand",
            "bs=1M",
            f"count={args.random_mib}",
            "conv=fsync",
            "status=none",
        )
    r["small_write_rss"] = rss.peak
    m.cold()
    r["rand_cold"] = random_reads(m.mnt / "rand", args.random_reads)
    r["rand_warm"] = random_reads(m.mnt / "rand", args.random_reads)

    r["create_cp_s"] = timed(lambda: run("cp", "-r", str(small), f"{m.mnt}/small"))
    r["create_s"] = r["create_cp_s"] + timed(m.umount)
    m.drop_caches()
    m.mount()
    m.cold()
    r["ls_s"] = timed(
        lambda: subprocess.run(
            ["ls", "-l", f"{m.mnt}/small"], check=True, stdout=subprocess.DEVNULL
        )
    )
    names = sorted(os.listdir(small))
    r["readall_s"] = timed(
        lambda: run("cat", *[f"{m.mnt}/small/{n}" for n in names], stdout=subprocess.DEVNULL)
    )

    def rsync() -> None:
        res = subprocess.run(
            ["rsync", "-a", f"{tree}/", f"{m.mnt}/tree/"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if res.returncode != 0:
            print(f"  ({m.name}: rsync exit {res.returncode}: {res.stderr.strip()[:200]})")

    r["rsync1_s"] = timed(rsync)
    r["rsync2_s"] = timed(rsync)

    (m.mnt / "ren").mkdir()
    for i in range(args.rename_files):
        (m.mnt / "ren" / f"f{i}").write_bytes(b"x" * 100)
    m.cold()
    r["rename_s"] = timed(lambda: os.rename(m.mnt / "ren", m.mnt / "renamed"))
    m.umount()
    return r


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--random-mib", type=int, default=256)
    ap.add_argument("--random-reads", type=int, default=2000)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--tree-files", type=int, default=3000)
    ap.add_argument("--tree-mib", type=int, default=60)
    ap.add_argument("--rename-files", type=int, default=500)
    ap.add_argument("--no-rclone", action="store_true", help="skip the rclone crypt column")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = ap.parse_args()
    size = args.size_mib << 20
    os.environ["AWS_ACCESS_KEY_ID"] = ACCESS_KEY
    os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
    work = Path(tempfile.mkdtemp(prefix="cryptfs-bench-"))
    server = start_seaweed(work / "s3")
    rclone = shutil.which("rclone") is not None and not args.no_rclone
    try:
        c = server.client()
        c.create_bucket(Bucket="bench")
        raw = asyncio.run(raw_s3(server.endpoint, "bench", size, args.files, 4))
        small = work / "small"
        small.mkdir()
        for i in range(args.files):
            (small / f"f{i:05d}").write_bytes(os.urandom(4096))
        tree = work / "tree"
        make_source_tree(tree, args.tree_files, args.tree_mib << 20)
        local = work / "local"
        t_local1 = timed(lambda: run("rsync", "-a", f"{tree}/", f"{local}/"))
        t_local2 = timed(lambda: run("rsync", "-a", f"{tree}/", f"{local}/"))

        m = Cryptfs(server.endpoint, "bench", work)
        print("cryptfs workloads…", flush=True)
        cf = workloads(m, args, small, tree)
        rc: dict[str, float] = {}
        if rclone:
            print("rclone crypt workloads…", flush=True)
            rc = workloads(Rclone(server.endpoint, "bench", work), args, small, tree)

        # master-key rotation of everything above: server-side rewrap, nothing downloaded
        out = m.cli(
            "rotate",
            m.url,
            "--key-file",
            str(m.key),
            "--to-key-file",
            str(work / "new.key"),
            "--endpoint-url",
            m.endpoint,
        )
        line = next(x for x in out.splitlines() if x.startswith("data keys rewrapped"))
        n_rot, rate = line.split(":")[1].split()[0], float(line.split("(")[1].split("/s")[0])
        dl = next(x for x in out.splitlines() if x.startswith("bytes downloaded")).split()[-1]
    finally:
        for d in ("mnt", "rmnt"):
            subprocess.run(
                ["fusermount3", "-uz", str(work / d)], check=False, stderr=subprocess.DEVNULL
            )
        stop_seaweed(server)

    mib = args.size_mib
    rows: list[tuple[str, ...]] = []

    def rate_row(label: str, key: str, ceil: float | None, ceil_txt: str, unit: str) -> None:
        """Throughput rows: bigger is better; ratio = cryptfs / ceiling, cryptfs / rclone."""
        v = cf[key]
        rows.append(
            (
                label,
                f"{v:.0f} {unit}",
                ceil_txt,
                f"{v / ceil:.2f}" if ceil else "—",
                f"{rc[key]:.0f} {unit}" if rc else "—",
                f"{v / rc[key]:.2f}" if rc else "—",
            )
        )

    def time_row(label: str, key: str, ceil: float | None, ceil_txt: str) -> None:
        """Time rows: smaller is better; ratio = ceiling time / cryptfs time (1.0 = as fast)."""
        v = cf[key]
        rows.append(
            (
                label,
                f"{v:.2f} s",
                ceil_txt,
                f"{ceil / v:.2f}" if ceil else "—",
                f"{rc[key]:.2f} s" if rc else "—",
                f"{rc[key] / v:.2f}" if rc else "—",
            )
        )

    for d in (cf, rc):
        if d:
            d["write_mib_s"] = mib / d["write_s"]
            d["read_mib_s"] = mib / d["read_s"]
            d["reread_mib_s"] = mib / d["reread_s"]
    rate_row(
        f"sequential write {mib} MiB (dd bs=1M conv=fsync, until in S3)",
        "write_mib_s",
        raw["put_mib_s"],
        f"{raw['put_mib_s']:.0f} MiB/s (multipart PUT ×4)",
        "MiB/s",
    )
    rate_row(
        f"sequential read {mib} MiB, cold, after remount",
        "read_mib_s",
        raw["get_mib_s"],
        f"{raw['get_mib_s']:.0f} MiB/s (ranged GET ×4)",
        "MiB/s",
    )
    rate_row(
        "the same read after another remount (local disk cache)",
        "reread_mib_s",
        raw["get_mib_s"],
        f"{raw['get_mib_s']:.0f} MiB/s (ranged GET ×4)",
        "MiB/s",
    )
    rows.append(
        (
            f"peak daemon RSS: write {mib} MiB / read it / write {args.random_mib} MiB",
            " / ".join(f"{cf[k] / 2**20:.0f}" for k in ("write_rss", "read_rss", "small_write_rss"))
            + " MiB",
            "—",
            "—",
            " / ".join(f"{rc[k] / 2**20:.0f}" for k in ("write_rss", "read_rss", "small_write_rss"))
            + " MiB"
            if rc
            else "—",
            "—",
        )
    )
    rate_row(
        f"random 4 KiB reads in a {args.random_mib} MiB file, cold",
        "rand_cold",
        None,
        "—",
        "reads/s",
    )
    rate_row("the same reads again, warm", "rand_warm", None, "—", "reads/s")
    time_row(
        f"create {args.files} × 4 KiB (cp -r, then umount: until in S3)",
        "create_s",
        raw["small_put_s"],
        f"{raw['small_put_s']:.2f} s (PUT ×32)",
    )
    time_row(
        "cold ls -l of them", "ls_s", raw["small_list_s"], f"{raw['small_list_s']:.2f} s (LIST)"
    )
    time_row(
        "read them all (cat, sequential)",
        "readall_s",
        raw["small_get_s"],
        f"{raw['small_get_s']:.2f} s (GET ×32)",
    )
    time_row(
        f"rsync -a of {args.tree_files} files / {args.tree_mib} MiB",
        "rsync1_s",
        t_local1,
        f"{t_local1:.2f} s (local disk)",
    )
    time_row("second, no-op rsync -a", "rsync2_s", t_local2, f"{t_local2:.2f} s (local disk)")
    time_row(f"rename a directory of {args.rename_files} files", "rename_s", None, "—")
    ceil = raw["small_rewrap_per_s"]
    rows.append(
        (
            f"rotate: rewrap {n_rot} objects (bytes downloaded: {dl})",
            f"{rate:.0f} obj/s",
            f"{ceil:.0f} obj/s (HEAD+COPY ×32)",
            f"{rate / ceil:.2f}",
            "—",
            "—",
        )
    )

    head = (
        "| workload | cryptfs | ceiling | ratio | rclone crypt | cryptfs vs rclone |\n"
        "| --- | --- | --- | --- | --- | --- |\n"
    )
    table = head + "".join("| " + " | ".join(row) + " |\n" for row in rows)
    import cryptfs

    rv = subprocess.run(["rclone", "version"], capture_output=True, text=True).stdout.split("\n")[0]
    meta = (
        f"cryptfs {cryptfs.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"SeaweedFS on loopback, {rv if rclone else 'no rclone'}; sizes: {mib} MiB / "
        f"{args.files} files; dd write cryptfs {cf['write_dd_s']:.2f} s"
        + (f", rclone {rc['write_dd_s']:.2f} s" if rc else "")
        + " (the rest is the upload at unmount); ratios > 1 mean cryptfs is faster\n\n"
    )
    print(meta + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(meta + table)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

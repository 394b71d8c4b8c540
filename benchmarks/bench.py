"""cryptfs benchmark: workloads through a real mount vs. raw S3 on the same server, one run.

Usage: ``make bench`` or ``python benchmarks/bench.py [--size-mib 1024] [--files 2000]``.
Starts its own SeaweedFS on free loopback ports, prints a Markdown table and writes it with
machine, versions and date to ``benchmarks/results/``.  Ratios are cryptfs / ceiling (for
throughput: higher is better; for times the ratio is ceiling-time / cryptfs-time, so 1.0
means "as fast as the ceiling" everywhere).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
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


class Mount:
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
        out = self.cli("mount", self.url, str(self.mnt), "--key-file", str(self.key),
                       "--cache-dir", str(self.cache))
        return int(out.rsplit("(pid ", 1)[1].split(")")[0])

    def umount(self) -> None:
        self.cli("umount", str(self.mnt))

    def drop_caches(self) -> None:
        subprocess.run(["sync"], check=False)
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        except OSError:
            pass


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
                r = await c.upload_part(Bucket=bucket, Key="raw/big", UploadId=up["UploadId"],
                                        PartNumber=i + 1, Body=data)
                return {"PartNumber": i + 1, "ETag": r["ETag"]}

        done = await asyncio.gather(*(put_part(i) for i in range(parts)))
        await c.complete_multipart_upload(Bucket=bucket, Key="raw/big", UploadId=up["UploadId"],
                                          MultipartUpload={"Parts": list(done)})
        res["put_mib_s"] = size / (1 << 20) / (time.perf_counter() - t)

        async def get_range(i: int) -> int:
            async with sem:
                r = await c.get_object(Bucket=bucket, Key="raw/big",
                                       Range=f"bytes={i * part}-{(i + 1) * part - 1}")
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
        async for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                      Prefix="raw/small/"):
            n += len(page.get("Contents", []))
        res["small_list_s"] = time.perf_counter() - t
        t = time.perf_counter()
        await asyncio.gather(*(get_small(i) for i in range(files)))
        res["small_get_s"] = time.perf_counter() - t

        async def rewrap_small(i: int) -> None:  # what a rotation does per object
            async with sem32:
                k = f"raw/small/{i:05d}"
                h = await c.head_object(Bucket=bucket, Key=k)
                await c.copy_object(Bucket=bucket, Key=k, CopySource={"Bucket": bucket, "Key": k},
                                    MetadataDirective="REPLACE", Metadata={"x": str(i)},
                                    CopySourceIfMatch=h["ETag"])

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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--tree-files", type=int, default=3000)
    ap.add_argument("--tree-mib", type=int, default=60)
    ap.add_argument("--rename-files", type=int, default=500)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = ap.parse_args()
    size = args.size_mib << 20
    os.environ["AWS_ACCESS_KEY_ID"] = ACCESS_KEY
    os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
    work = Path(tempfile.mkdtemp(prefix="cryptfs-bench-"))
    server = start_seaweed(work / "s3")
    rows: list[tuple[str, str, str, str]] = []
    try:
        c = server.client()
        c.create_bucket(Bucket="bench")
        raw = asyncio.run(raw_s3(server.endpoint, "bench", size, args.files, 4))
        m = Mount(server.endpoint, "bench", work)

        pid = m.mount()
        with PeakRss(pid) as rss_w:
            t = timed(lambda: run("dd", "if=/dev/zero", f"of={m.mnt}/big", "bs=1M",
                                  f"count={args.size_mib}", "conv=fsync", "status=none"))
        w = args.size_mib / t
        m.umount()
        m.drop_caches()
        shutil.rmtree(m.cache / os.listdir(m.cache)[0] / "staging", ignore_errors=True)
        pid = m.mount()
        with PeakRss(pid) as rss_r:
            t = timed(lambda: run("dd", f"if={m.mnt}/big", "of=/dev/null", "bs=1M", "status=none"))
        r = args.size_mib / t
        rows.append((f"sequential write {args.size_mib} MiB (dd bs=1M conv=fsync)",
                     f"{w:.0f} MiB/s", f"{raw['put_mib_s']:.0f} MiB/s", f"{w / raw['put_mib_s']:.2f}"))
        rows.append((f"sequential read {args.size_mib} MiB, cold, after remount",
                     f"{r:.0f} MiB/s", f"{raw['get_mib_s']:.0f} MiB/s", f"{r / raw['get_mib_s']:.2f}"))
        rows.append(("peak daemon RSS during write / read",
                     f"{rss_w.peak / 2**20:.0f} / {rss_r.peak / 2**20:.0f} MiB", "—", "—"))

        # small files
        src = work / "small"
        src.mkdir()
        for i in range(args.files):
            (src / f"f{i:05d}").write_bytes(os.urandom(4096))
        t_create = timed(lambda: run("cp", "-r", str(src), f"{m.mnt}/small"))
        m.umount()
        t_flushed = t_create  # uploads happen after close; umount waits for them
        m.mount()
        t_ls = timed(lambda: subprocess.run(["ls", "-l", f"{m.mnt}/small"], check=True,
                                            stdout=subprocess.DEVNULL))
        t_read = timed(lambda: run("cat", *[f"{m.mnt}/small/f{i:05d}" for i in range(args.files)],
                                   stdout=subprocess.DEVNULL))
        rows.append((f"create {args.files} × 4 KiB (cp -r, before upload)", f"{t_flushed:.2f} s",
                     f"{raw['small_put_s']:.2f} s (PUT ×32)",
                     f"{raw['small_put_s'] / t_flushed:.2f}"))
        rows.append(("cold ls -l of them", f"{t_ls:.2f} s", f"{raw['small_list_s']:.2f} s (LIST)",
                     f"{raw['small_list_s'] / t_ls:.2f}"))
        rows.append(("read them all (cat, sequential)", f"{t_read:.2f} s",
                     f"{raw['small_get_s']:.2f} s (GET ×32)", f"{raw['small_get_s'] / t_read:.2f}"))

        # rsync of a source tree
        tree = work / "tree"
        make_source_tree(tree, args.tree_files, args.tree_mib << 20)
        local = work / "local"
        t_local1 = timed(lambda: run("rsync", "-a", f"{tree}/", f"{local}/"))
        t_local2 = timed(lambda: run("rsync", "-a", f"{tree}/", f"{local}/"))
        t_rs1 = timed(lambda: run("rsync", "-a", f"{tree}/", f"{m.mnt}/tree/"))
        t_rs2 = timed(lambda: run("rsync", "-a", f"{tree}/", f"{m.mnt}/tree/"))
        rows.append((f"rsync -a of {args.tree_files} files / {args.tree_mib} MiB",
                     f"{t_rs1:.2f} s", f"{t_local1:.2f} s (local disk)",
                     f"{t_local1 / t_rs1:.2f}"))
        rows.append(("second, no-op rsync -a", f"{t_rs2:.2f} s", f"{t_local2:.2f} s (local disk)",
                     f"{t_local2 / t_rs2:.2f}"))

        # directory rename
        (m.mnt / "ren").mkdir()
        for i in range(args.rename_files):
            (m.mnt / "ren" / f"f{i}").write_bytes(b"x" * 100)
        m.umount()
        m.mount()
        t_ren = timed(lambda: os.rename(m.mnt / "ren", m.mnt / "renamed"))
        rows.append((f"rename a directory of {args.rename_files} files", f"{t_ren:.2f} s", "—",
                     "—"))
        m.umount()

        # master-key rotation of everything above: server-side rewrap, nothing downloaded
        out = m.cli("rotate", m.url, "--key-file", str(m.key), "--to-key-file",
                    str(work / "new.key"), "--endpoint-url", m.endpoint)
        line = next(x for x in out.splitlines() if x.startswith("data keys rewrapped"))
        n_rot, rate = line.split(":")[1].split()[0], float(line.split("(")[1].split("/s")[0])
        dl = next(x for x in out.splitlines() if x.startswith("bytes downloaded")).split()[-1]
        ceil = raw["small_rewrap_per_s"]
        rows.append((f"rotate: rewrap {n_rot} objects (bytes downloaded: {dl})",
                     f"{rate:.0f} obj/s", f"{ceil:.0f} obj/s (HEAD+COPY ×32)",
                     f"{rate / ceil:.2f}"))
    finally:
        subprocess.run(["fusermount3", "-uz", str(work / "mnt")], check=False,
                       stderr=subprocess.DEVNULL)
        stop_seaweed(server)

    head = "| workload | cryptfs | ceiling | ratio |\n| --- | --- | --- | --- |\n"
    table = head + "".join(f"| {a} | {b} | {c} | {d} |\n" for a, b, c, d in rows)
    import cryptfs

    meta = (
        f"cryptfs {cryptfs.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"SeaweedFS on loopback, sizes: {args.size_mib} MiB / {args.files} files\n\n"
    )
    print(meta + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(meta + table)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

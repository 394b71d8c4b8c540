"""The composition root of a mount: builds store, volume, filesystem and FUSE adapter, owns the
trio nursery, handles signals and readiness.

Resource handling:
    The mount is torn down in ``finally`` (``pyfuse3.close``); after it, every dirty file is
    uploaded (bounded by ``flush_timeout``); whatever could not be uploaded stays staged with a
    journal and is uploaded by the next mount.
Error handling:
    A first SIGTERM/SIGINT unmounts gracefully and flushes; a second one abandons the flush
    (staged data is kept) and exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from cryptfs.cache.blocks import BlockCache
from cryptfs.cache.staging import StagingArea
from cryptfs.errors import CryptfsError, UsageError
from cryptfs.format.volume import KeySource
from cryptfs.fs.filesystem import Filesystem
from cryptfs.fs.model import Options
from cryptfs.fuse.ops import Operations, mount_options, mounted, request_unmount, serve
from cryptfs.hardening import disable_core_dumps
from cryptfs.runstate import ensure_runtime_dir, state_file, write_state
from cryptfs.session import Remote, open_remote, open_volume
from cryptfs.stats import Rates, serve_metrics, serve_socket
from cryptfs.store.s3 import S3Location

log = logging.getLogger(__name__)


@dataclass
class MountConfig:
    location: S3Location
    mountpoint: Path
    source: KeySource
    remote: Remote
    cache_dir: Path
    fuse_options: list[str] = field(default_factory=list)
    fs: Options = field(default_factory=Options)
    flush_timeout: float = 600.0
    config_interval: float = 30.0  # re-read the volume config (keyslots, rotation) this often
    metrics_address: str | None = None  # HOST:PORT for Prometheus, off by default
    read_ahead_kb: int = 4096  # the kernel's read-ahead for this mount (0: leave it)
    writeback_cache: bool = False  # kernel write-back caching (single-host volumes only)
    cache_size: int = 2 << 30  # encrypted chunks kept on the cache disk (0: none)


def check_mountpoint(mp: Path) -> None:
    if not mp.exists():
        raise UsageError(f"mount point {mp} does not exist")
    if not mp.is_dir():
        raise UsageError(f"mount point {mp} is not a directory")
    if os.path.ismount(mp):
        raise UsageError(f"{mp} is already a mount point")
    if any(mp.iterdir()):
        raise UsageError(f"mount point {mp} is not empty")


def sd_notify(message: str) -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
        s.sendto(message.encode(), addr)


def _lock_cache(volume_dir: Path) -> int:
    volume_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(volume_dir, 0o700)
    fd = os.open(volume_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(
            f"cache directory {volume_dir} is in use by another mount of this volume"
        ) from None
    return fd


def _tune_malloc() -> None:
    """glibc raises its mmap threshold after large frees and gives every thread an arena, so
    the multi-MiB buffers of downloads and uploads (freed by worker threads) stay in the
    process: 30 % more peak RSS in a 512 MiB read.  A fixed threshold stops that; two
    arenas are plenty for one trio and one asyncio thread.

    The threshold sits just above the largest buffer of one request, a part of 8 MiB and its
    tags (``Options.fetch_unit``, ``part_size``): a GET body, a FUSE read and its reply then
    reuse heap memory instead of a fresh mmap each, whose page faults (zeroing 2048 pages per
    8 MiB) were 0.5 s of CPU per GiB of a cold read.  Free memory above 32 MiB at the top of
    the heap goes back to the system (``M_TRIM_THRESHOLD``); a sequential read's memory is
    bounded by its read-ahead window (``Fetcher.read_remote``), peak RSS 150-175 MiB for
    1 GiB measured."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, (9 << 20) + (64 << 10))  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 32 << 20)  # M_TRIM_THRESHOLD
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc
        pass


def _raise_open_file_limit() -> None:
    """Every staged file (dirty, waiting for its upload) holds a descriptor: ``cp -r`` of a
    few thousand small files has as many staged at once.  systemd starts services with a
    soft limit of 1024 (and a hard one of 524288), which would make the 1025th create fail
    with EMFILE: raise the soft limit to the hard one, as Go programs (rclone) do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


async def run_mount(cfg: MountConfig, ready: Callable[[], None]) -> int:
    """Mount and serve until unmounted; returns the number of files left staged."""
    check_mountpoint(cfg.mountpoint)
    disable_core_dumps()  # (cli.main did already; for a daemon started another way)
    ensure_runtime_dir()  # refused before anything is opened if it cannot be trusted
    _tune_malloc()
    _raise_open_file_limit()
    async with open_remote(cfg.location, cfg.remote) as (store, kms):
        volume = await open_volume(store, kms, cfg.source, cfg.remote)
        vdir = cfg.cache_dir / volume.volume_id.hex()
        cfg.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = _lock_cache(vdir)
        try:
            staging = StagingArea(vdir / "staging", volume.keys.cache, volume.chunk)
            blocks = None
            if cfg.cache_size > 0:
                blocks = BlockCache(vdir / "blocks", cfg.cache_size, volume.chunk)
            fs = Filesystem(volume, staging, cfg.fs, key_prefix=cfg.location.prefix, blocks=blocks)
            await fs.ensure_root()
            recovered = await fs.recover()
            if recovered:
                log.info("uploaded %d file(s) staged by an earlier run", recovered)
            try:
                return await _serve(cfg, fs, ready)
            finally:
                staging.close()
        finally:
            volume.keyring.close()  # unwrapped data keys leave memory with the mount
            os.close(lock_fd)


def _snapshot_fn(cfg: MountConfig, fs: Filesystem, rates: Rates) -> Callable[[], dict[str, Any]]:
    started = time.monotonic()
    store: Any = fs.store
    kms = fs.vol.keyring.kms

    def snapshot() -> dict[str, Any]:
        snap: dict[str, Any] = fs.counters()
        rate_in, rate_out = rates.current()
        snap.update(
            location=str(cfg.location),
            mountpoint=str(cfg.mountpoint),
            pid=os.getpid(),
            uptime_seconds=int(time.monotonic() - started),
            staging_bytes=fs.staging.disk_bytes(),
            s3_requests=store.requests,
            s3_errors=store.errors,
            s3_bytes_in=store.bytes_in,
            s3_bytes_out=store.bytes_out,
            kms_requests=kms.calls if kms is not None else 0,
            dek_cache_entries=len(fs.vol.keyring.cache),
            rate_in=rate_in,
            rate_out=rate_out,
        )
        return snap

    return snapshot


async def _sample_rates(fs: Filesystem, rates: Rates) -> None:
    store: Any = fs.store
    while True:
        rates.sample(store.bytes_in, store.bytes_out)
        await trio.sleep(2)


def _set_read_ahead(dev: int, kb: int) -> None:
    """The kernel reads ahead 128 KiB on a FUSE mount by default, in 128 KiB requests; a
    larger window makes it ask for up to 1 MiB per request, several in flight, which is what
    S3 needs.  Needs root (sysfs); otherwise the kernel's default stays."""
    path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    try:
        path.write_text(f"{kb}\n")
    except OSError as e:
        log.info("kernel read-ahead left at its default (%s: %s)", path, e.strerror)


async def _announce_when_live(cfg: MountConfig, ready: Callable[[], None]) -> None:
    """READY only once the mount answers: a worker thread stats the mount point, which
    returns only when our FUSE loop serves requests (never do this from the trio thread)."""
    st = await trio.to_thread.run_sync(os.stat, cfg.mountpoint, abandon_on_cancel=True)
    if cfg.read_ahead_kb > 0:
        _set_read_ahead(st.st_dev, cfg.read_ahead_kb)
    log.info("mounted %s at %s", cfg.location, cfg.mountpoint)
    ready()
    sd_notify("READY=1")


async def _serve(cfg: MountConfig, fs: Filesystem, ready: Callable[[], None]) -> int:
    ops = Operations(fs, writeback_cache=cfg.writeback_cache)
    # never touch the mount point from this process once mounted: the kernel would ask us
    # (the only FUSE server) before the main loop runs, and deadlock
    pidfile = state_file(cfg.mountpoint, "pid")
    statusfile = state_file(cfg.mountpoint, "status")
    ensure_runtime_dir()
    statusfile.unlink(missing_ok=True)
    write_state(pidfile, f"{os.getpid()}\n")
    options = mount_options(str(cfg.location), cfg.fuse_options)
    force = trio.CancelScope()
    state = {"mounted": True}
    rates = Rates()
    snapshot = _snapshot_fn(cfg, fs, rates)
    try:
        async with trio.open_nursery() as outer:
            watcher = trio.CancelScope()
            outer.start_soon(_watch_signals, force, watcher, state)
            # helpers that live through the final flush (stats show its progress)
            helpers = await outer.start(_helpers, cfg, fs, rates, snapshot)
            with mounted(ops, str(cfg.mountpoint), options):
                async with trio.open_nursery() as nursery:
                    await nursery.start(fs.serve_writeback)
                    announce = trio.CancelScope()

                    async def announce_task() -> None:
                        with announce:
                            await _announce_when_live(cfg, ready)

                    nursery.start_soon(announce_task)
                    await serve()
                    announce.cancel()
                    fs.stop_writeback()
            state["mounted"] = False
            sd_notify("STOPPING=1")
            pending = len(fs.pending())
            if pending:
                log.info("unmounted; uploading %d pending file(s)", pending)
                with force, trio.move_on_after(cfg.flush_timeout):
                    await fs.flush_all()
            watcher.cancel()
            helpers.cancel()
    finally:
        # also when serving ended in an error: umount then says what stayed behind
        left = _report(fs, statusfile, pidfile)
    return left


def _report(fs: Filesystem, statusfile: Path, pidfile: Path) -> int:
    """Write what the unmount left for ``cryptfs umount`` (which names it: the status file is
    the owner's, mode 0600, unlike the log); returns the number of files left staged."""
    left = fs.left_behind()
    staged, lost = left["staged"], left["lost"]
    status = {
        "pending": len(staged) + len(lost),
        "staged": [os.fsdecode(p) for p in staged],
        "lost": [os.fsdecode(p) for p in lost],
    }
    write_state(statusfile, json.dumps(status) + "\n")
    pidfile.unlink(missing_ok=True)
    if staged:
        log.warning("%d file(s) not uploaded; kept staged, uploaded at the next mount", len(staged))
    if lost:
        log.error("%d change(s) of attributes only not uploaded, and lost", len(lost))
    if not staged and not lost:
        log.info("unmounted cleanly; nothing pending")
    return len(staged) + len(lost)


async def _helpers(
    cfg: MountConfig,
    fs: Filesystem,
    rates: Rates,
    snapshot: Callable[[], dict[str, Any]],
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Config watch, stats socket, metrics endpoint, rate sampling; cancelled via the scope
    handed back through ``task_status``."""
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as n:
            n.start_soon(_watch_config, fs, cfg.config_interval)
            n.start_soon(_sample_rates, fs, rates)
            await n.start(serve_socket, state_file(cfg.mountpoint, "sock"), snapshot)
            if cfg.metrics_address:
                await n.start(serve_metrics, cfg.metrics_address, snapshot)
            task_status.started(scope)


async def _watch_config(fs: Filesystem, interval: float) -> None:
    """Follow config changes made elsewhere: a rotation there must not leave this mount
    wrapping new files under a retired key (see docs/OPERATIONS.md, rotation)."""
    while True:
        await trio.sleep(interval)
        try:
            await fs.vol.reload_config()
        except CryptfsError as e:
            log.warning("could not re-read the volume config: %s", e)


async def _watch_signals(
    force: trio.CancelScope, scope: trio.CancelScope, state: dict[str, bool]
) -> None:
    """First SIGTERM/SIGINT: unmount gracefully (then flush). Next one: abandon the flush."""
    with scope, trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for sig in signals:
            if state["mounted"]:
                log.info("signal %d: unmounting and flushing (again to abandon the flush)", sig)
                state["mounted"] = False
                request_unmount()
            else:
                log.warning("signal %d: abandoning the flush; staged data is kept", sig)
                force.cancel()

"""Visibility of a running mount: counters, ``cryptfs stats`` over a unix socket, and an
optional Prometheus text endpoint.

Owns: the stats socket (``<runtime dir>/<hash>.sock``, mode 0600 in a 0700 directory) and the
metrics listener.  Both only *read* counters; neither can change the mount.
Error handling:
    A client that misbehaves is dropped; serving stats never fails the mount.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from cryptfs.metrics import CONTENT_TYPE_LATEST, exposition

log = logging.getLogger(__name__)

Snapshot = Callable[[], dict[str, Any]]


class Rates:
    """Throughput over the last ~10 s from periodic samples of the byte counters."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int, int]] = deque(maxlen=6)

    def sample(self, bytes_in: int, bytes_out: int) -> None:
        self._samples.append((time.monotonic(), bytes_in, bytes_out))

    def current(self) -> tuple[float, float]:
        if len(self._samples) < 2:
            return 0.0, 0.0
        (t0, i0, o0), (t1, i1, o1) = self._samples[0], self._samples[-1]
        dt = max(t1 - t0, 1e-6)
        return (i1 - i0) / dt, (o1 - o0) / dt


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def human_text(s: dict[str, Any]) -> str:
    lookups = s["cache_hits"] + s["cache_misses"]
    hit = f"{100 * s['cache_hits'] / lookups:.0f} %" if lookups else "—"
    rows = [
        ("mount", f"{s['location']} at {s['mountpoint']} "
                  f"(pid {s['pid']}, up {s['uptime_seconds']} s)"),
        ("pending uploads", f"{s['pending_files']} file(s), {_size(s['pending_bytes'])}"),
        ("uploaded", f"{s['uploads']} file(s), {_size(s['upload_bytes'])} "
                     f"({_size(s.get('upload_copied_bytes', 0))} copied on the server); "
                     f"{s['upload_failures']} failed attempt(s), {s['conflicts']} conflict(s)"),
        ("staging (disk)", _size(s["staging_bytes"])),
        ("block cache (disk)", f"{_size(s['disk_cache_bytes'])} of "
                              f"{_size(s['disk_cache_limit_bytes'])}, "
                              f"{s['disk_cache_hits']} chunk(s) served"),
        ("memory cache", f"{_size(s['cache_bytes'])} of {_size(s['cache_limit_bytes'])}, "
                         f"hit rate {hit}"),
        ("S3", f"{s['s3_requests']} requests, {s['s3_errors']} errors, "
               f"in {_size(s['s3_bytes_in'])}, out {_size(s['s3_bytes_out'])}"),
        ("throughput (10 s)", f"in {_size(s['rate_in'])}/s, out {_size(s['rate_out'])}/s"),
        ("KMS", f"{s['kms_requests']} requests, {s['dek_cache_entries']} data key(s) cached"),
        ("integrity failures", str(s["integrity_failures"])),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + "\n"


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def serve_socket(path: Path, snapshot: Snapshot, *, task_status: Any) -> None:
    """Answer every connection on unix socket ``path`` with one JSON snapshot."""
    _remove(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(8)
    listener = trio.SocketListener(sock)

    async def answer(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, OSError):
            async with stream:
                await stream.send_all(json.dumps(snapshot()).encode() + b"\n")

    try:
        task_status.started()
        await trio.serve_listeners(answer, [listener])
    finally:
        _remove(path)


async def serve_metrics(address: str, snapshot: Snapshot, *, task_status: Any) -> None:
    """Any GET returns the Prometheus text exposition (``cryptfs.metrics``).  HTTP/1.0 on a
    trio listener, not prometheus-client's own server: that one answers from a thread of its
    own, and the snapshot must be taken on the trio thread, which owns what it reads."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--metrics-address must be HOST:PORT, got {address!r}")
    listeners = await trio.open_tcp_listeners(int(port), host=host.strip("[]"))

    async def answer(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, OSError, trio.TooSlowError):
            async with stream:
                with trio.fail_after(5):
                    request = b""
                    while b"\r\n\r\n" not in request and len(request) < 8192:
                        data = await stream.receive_some(4096)
                        if not data:
                            return
                        request += data
                body = exposition(snapshot)  # (prometheus-client: escaping, histograms)
                head = (
                    f"HTTP/1.0 200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                ).encode()
                await stream.send_all(head + body)

    task_status.started()
    log.info("metrics on http://%s/metrics", address)
    await trio.serve_listeners(answer, listeners)


def read_socket(path: Path, timeout: float = 5.0) -> dict[str, Any]:
    """The client side (blocking; for the CLI)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    result: dict[str, Any] = json.loads(data)
    return result

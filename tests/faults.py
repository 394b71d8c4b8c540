"""A fault-injecting HTTP proxy on loopback, in front of a real server (moto, SeaweedFS).

``FaultProxy(target).fail_next(n, status, body)`` answers the next ``n`` requests itself
(throttling, 5xx, resets) instead of forwarding them; every request is counted.
"""

from __future__ import annotations

import http.client
import random
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

import trio

from cryptfs.errors import StoreUnavailable
from cryptfs.store.base import ObjectInfo


class FaultProxy:
    def __init__(self, target: str) -> None:
        u = urlparse(target)
        self.target_host, self.target_port = u.hostname or "127.0.0.1", u.port or 80
        self.requests = 0
        self._faults: list[tuple[int, bytes, dict[str, str]]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                with proxy._lock:
                    proxy.requests += 1
                    fault = proxy._faults.pop(0) if proxy._faults else None
                if fault is not None:
                    status, payload, headers = fault
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.target_host, proxy.target_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail_next(
        self, n: int, status: int, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> None:
        with self._lock:
            self._faults += [(status, body, headers or {})] * n

    @contextmanager
    def running(self) -> Iterator[FaultProxy]:
        t = threading.Thread(target=self._server.serve_forever, daemon=True)
        t.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()


class FaultyStore:
    """An ``ObjectStore`` wrapper that injects what real networks do: errors before a request
    reaches the server, errors *after* it took effect (the answer lost), latency, short
    (truncated) GET bodies and flipped bits in them.  ``rate`` is the probability per call;
    ``rng`` a seeded ``random.Random`` so that a failure can be replayed."""

    def __init__(self, inner: Any, rng: random.Random, rate: float = 0.2) -> None:
        self.inner = inner
        self.rng = rng
        self.rate = rate
        self.injected: dict[str, int] = {}

    def _note(self, what: str) -> None:
        self.injected[what] = self.injected.get(what, 0) + 1

    async def _around(self, name: str, call: Callable[[], Awaitable[Any]]) -> Any:
        if self.rng.random() < self.rate / 3:
            await trio.sleep(self.rng.random() * 0.02)
            self._note("latency")
        if self.rng.random() < self.rate:
            self._note(f"{name}: reset before")
            raise StoreUnavailable(f"injected: connection reset before {name}")
        result = await call()
        if name != "get" and self.rng.random() < self.rate / 2:
            self._note(f"{name}: answer lost")
            raise StoreUnavailable(f"injected: {name} done, answer lost")
        return result

    async def get(self, key: str, start: int | None = None, end: int | None = None,
                  if_match: str | None = None) -> tuple[ObjectInfo, bytes]:  # fmt: skip
        info, data = await self._around("get", lambda: self.inner.get(key, start, end, if_match))
        roll = self.rng.random()
        if data and roll < self.rate / 2:
            self._note("get: truncated body")
            data = data[: self.rng.randrange(len(data))]
        elif data and roll < self.rate:
            self._note("get: flipped bit")
            i = self.rng.randrange(len(data))
            data = data[:i] + bytes([data[i] ^ (1 << self.rng.randrange(8))]) + data[i + 1 :]
        return info, data

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)
        if name in ("head", "put", "create_multipart", "upload_part", "complete_multipart",
                    "abort_multipart", "copy", "delete", "delete_many", "list",
                    "list_uploads"):  # fmt: skip

            async def wrapped(*a: Any, **kw: Any) -> Any:
                return await self._around(name, lambda: method(*a, **kw))

            return wrapped
        return method

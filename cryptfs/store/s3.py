"""``ObjectStore`` on S3, running on the bridge's asyncio loop thread: every request of the
store through one transport (``store.lean``: signed here, one retry policy, one builder of
SSE headers, ``Sse``); aiobotocore for what it does best and only that: the credential
chain, the endpoint and region it resolves, and the bucket probe at open (one HeadBucket
with botocore's own short retry policy, so a dead endpoint is reported in seconds).

Owns: the aiobotocore client, request concurrency and the store's counters; every failed
request goes through ``store.classify``.
Must not import: fs, fuse, format.

Resource handling:
    ``open_s3_store()`` creates the client on the loop thread and closes it there.  Response
    bodies are read and closed inside the submitted coroutine; only bytes and dicts cross.
Error handling:
    The transport retries transient errors (full-jitter exponential backoff, bounded
    attempts, connect and read timeouts so no call blocks forever: botocore's standard mode);
    whatever is left is mapped by ``store.classify``.
"""

from __future__ import annotations

import contextlib
import html
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote, urlparse

import trio
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from cryptfs.errors import (
    BucketNotFound,
    NotFound,
    PreconditionFailed,
    StoreError,
    StoreUnavailable,
    UsageError,
)
from cryptfs.metrics import S3_SECONDS
from cryptfs.store.base import Listing, ObjectInfo
from cryptfs.store.bridge import AsyncioBridge, open_bridge
from cryptfs.store.classify import FAILURES, classify
from cryptfs.store.lean import (
    LeanS3,
    addressing_style,
    content_md5,
    copy_etag,
    delete_body,
    http_date,
    parse_delete_errors,
    parse_list_page,
    parse_uploads_page,
    xml_text,
)
from cryptfs.store.sse import Sse
from cryptfs.tasks import open_tasks

log = logging.getLogger(__name__)


def _version(headers: Mapping[str, str]) -> str | None:
    """The version id an answer names: None where versioning is off (S3 says "null" for a
    version written before it was turned on, which no request can name either)."""
    v = headers.get("x-amz-version-id")
    return None if not v or v == "null" else v


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or ends with "/"

    @classmethod
    def parse(cls, url: str) -> S3Location:
        u = urlparse(url)
        if u.scheme != "s3" or not u.netloc:
            raise UsageError(f"expected s3://BUCKET[/PREFIX], got {url!r}")
        if len(u.netloc) < 3:
            raise UsageError("bucket names have at least 3 characters")
        prefix = u.path.strip("/")
        return cls(u.netloc, prefix + "/" if prefix else "")

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = None
    region: str | None = None
    max_concurrency: int = 32
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_attempts: int = 5
    verify: bool | str = True  # False, True or a CA bundle path
    addressing_style: str = "auto"  # "path", "virtual" or "auto" (store/lean.py)


class S3Store:
    def __init__(
        self,
        bridge: AsyncioBridge,
        client: Any,
        loc: S3Location,
        limit: int,
        lean: LeanS3,
        sse: Sse | None = None,
    ) -> None:
        self._bridge = bridge
        self._client = client
        self._lean = lean  # object requests, without botocore's per-request cost
        self.loc = loc
        self._limiter = trio.CapacityLimiter(limit)
        self.requests = 0
        self.sse = sse
        self.secure = True  # the endpoint in use is https (set by ``open_s3_store``)
        self.copy_max = 5 << 30  # CopyObject's limit
        self.copy_part = 1 << 30
        self.bytes_in = 0  # body bytes downloaded
        self.bytes_out = 0  # body bytes uploaded
        self.errors = 0  # failed requests (after botocore's retries), 404/412 excluded

    @property
    def bridge(self) -> AsyncioBridge:
        return self._bridge

    def with_prefix(self, prefix: str) -> S3Store:
        """The same client and loop, rooted at another prefix of the bucket."""
        p = prefix.strip("/")
        loc = S3Location(self.loc.bucket, p + "/" if p else "")
        other = S3Store(
            self._bridge, self._client, loc, int(self._limiter.total_tokens), self._lean, self.sse
        )
        other.secure = self.secure
        return other

    def set_sse(self, sse: Sse | None) -> None:
        """Apply server-side encryption to every later call; SSE-C needs HTTPS."""
        if sse is not None and sse.mode == "c" and not self.secure:
            raise UsageError(
                "SSE-C needs an https:// endpoint: over http the customer key would cross "
                "the network in clear"
            )
        self.sse = sse

    def _check(self, resp: Mapping[str, Any], what: str) -> None:
        if self.sse is not None:
            self.sse.check(resp, what)

    def _k(self, key: str) -> str:
        return self.loc.prefix + key

    async def _call(
        self, op: str, what: str, fn: Any, *args: Any, keys: tuple[str, ...] | None = None
    ) -> Any:
        """``fn(*args)`` on the loop thread, timed as S3 operation ``op``; failures as domain
        errors about ``what``, which names the object ``keys`` (default: ``what`` is a key)."""
        async with self._limiter:
            self.requests += 1
            start = time.monotonic()
            try:
                return await self._bridge.run(fn, *args)
            except FAILURES as e:
                err = classify(e, what, (what,) if keys is None else keys)
                if not isinstance(err, NotFound | PreconditionFailed):
                    self.errors += 1  # answers that are part of the protocol are not errors
                raise err from None
            finally:
                S3_SECONDS.labels(op).observe(time.monotonic() - start)

    def _meta_headers(self, metadata: Mapping[str, str]) -> dict[str, str]:
        """Headers of a new object (PUT, destination of a copy): metadata, type, SSE."""
        hdr = {f"x-amz-meta-{k}": v for k, v in metadata.items()}
        hdr["Content-Type"] = "application/octet-stream"
        hdr.update(self._sse_headers(True))
        return hdr

    def _sse_headers(self, create: bool) -> dict[str, str]:
        if self.sse is None:
            return {}
        return self.sse.create_headers() if create else self.sse.access_headers()

    async def head(self, key: str, *, version_id: str | None = None) -> ObjectInfo:
        query = {"versionId": version_id} if version_id is not None else None

        async def op() -> ObjectInfo:
            a = await self._lean.request(
                "HEAD", self.loc.bucket, self._k(key), self._sse_headers(False), None, query
            )
            self._check(a.sse(), key)
            h = a.headers
            return ObjectInfo(
                key,
                int(h["Content-Length"]),
                h["ETag"],
                a.metadata(),
                http_date(h.get("Last-Modified", "")),
                _version(h),
            )

        return await self._call("head", key, op)  # type: ignore[no-any-return]

    async def get(
        self,
        key: str,
        start: int | None = None,
        end: int | None = None,
        if_match: str | None = None,
        *,
        version_id: str | None = None,
    ) -> tuple[ObjectInfo, bytes]:
        query = {"versionId": version_id} if version_id is not None else None
        rng = None
        if start is not None or end is not None:
            rng = f"bytes={start or 0}-{'' if end is None else end - 1}"

        async def op() -> tuple[ObjectInfo, bytes]:
            hdr = self._sse_headers(False)
            if rng is not None:
                hdr["Range"] = rng
            if if_match is not None:
                hdr["If-Match"] = if_match
            a = await self._lean.request("GET", self.loc.bucket, self._k(key), hdr, None, query)
            self._check(a.sse(), key)
            data = a.body
            h = a.headers
            size = int(h.get("Content-Length", len(data)))
            if len(data) != size:  # aiohttp reads to EOF: a cut body must not pass as whole
                raise StoreUnavailable(
                    f"S3 body of {key} truncated ({len(data)} of {size})", object_keys=(key,)
                )
            self.bytes_in += len(data)
            cr = h.get("Content-Range")
            if cr:
                size = int(cr.rsplit("/", 1)[1])
            return ObjectInfo(key, size, h["ETag"], a.metadata(), version_id=_version(h)), data

        return await self._call("get", key, op)  # type: ignore[no-any-return]

    async def put(
        self,
        key: str,
        body: bytes,
        metadata: Mapping[str, str],
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        async def op() -> str:
            hdr = self._meta_headers(metadata)
            if if_match is not None:
                hdr["If-Match"] = if_match
            if if_none_match:
                hdr["If-None-Match"] = "*"
            a = await self._lean.request("PUT", self.loc.bucket, self._k(key), hdr, body)
            self._check(a.sse(), key)
            self.bytes_out += len(body)
            return a.headers["ETag"]

        return await self._call("put", key, op)  # type: ignore[no-any-return]

    async def create_multipart(self, key: str, metadata: Mapping[str, str]) -> str:
        async def op() -> str:
            a = await self._lean.request(
                "POST", self.loc.bucket, self._k(key), self._meta_headers(metadata), None,
                {"uploads": ""},
            )  # fmt: skip
            return xml_text(a.body, "UploadId")

        return await self._call("create_multipart", key, op)  # type: ignore[no-any-return]

    async def upload_part(
        self, key: str, upload_id: str, number: int, data: bytes | memoryview
    ) -> str:
        async def op() -> str:
            a = await self._lean.request(
                "PUT",
                self.loc.bucket,
                self._k(key),
                self._sse_headers(False),
                data,
                {"partNumber": str(number), "uploadId": upload_id},
            )
            self.bytes_out += len(data)
            return a.headers["ETag"]

        return await self._call("upload_part", f"{key} part {number}", op, keys=(key,))  # type: ignore[no-any-return]

    async def complete_multipart(
        self,
        key: str,
        upload_id: str,
        etags: list[str],
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        async def op() -> str:
            parts = "".join(
                f"<Part><PartNumber>{i + 1}</PartNumber><ETag>{html.escape(e)}</ETag></Part>"
                for i, e in enumerate(etags)
            )
            body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
            hdr = self._sse_headers(False)
            if if_match is not None:
                hdr["If-Match"] = if_match
            if if_none_match:
                hdr["If-None-Match"] = "*"
            # (it can fail after its 200 status line, as CopyObject: the error is the body)
            a = await self._lean.request(
                "POST", self.loc.bucket, self._k(key), hdr, body, {"uploadId": upload_id},
                error_in_200=True,
            )  # fmt: skip
            return xml_text(a.body, "ETag")

        return await self._call("complete_multipart", key, op)  # type: ignore[no-any-return]

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        async def op() -> None:
            await self._lean.request(
                "DELETE", self.loc.bucket, self._k(key), {}, None, {"uploadId": upload_id}
            )

        await self._call("abort_multipart", key, op)

    async def list_uploads(self, prefix: str) -> list[tuple[str, str, float]]:
        plen = len(self.loc.prefix)

        async def op() -> list[tuple[str, str, float]]:
            out: list[tuple[str, str, float]] = []
            q = {"uploads": "", "prefix": self._k(prefix), "encoding-type": "url"}
            while True:
                a = await self._lean.request("GET", self.loc.bucket, "", {}, None, q)
                page = parse_uploads_page(a.body)
                out += [(k[plen:], uid, when) for k, uid, when in page.uploads]
                if page.next is None:
                    return out
                q["key-marker"], q["upload-id-marker"] = page.next

        what = f"uploads under {prefix or '/'}"
        return await self._call("list_uploads", what, op, keys=(prefix,))  # type: ignore[no-any-return]

    async def copy(
        self,
        src: str,
        dst: str,
        metadata: Mapping[str, str],
        *,
        if_match: str | None = None,
        size: int | None = None,
    ) -> str:
        """Server-side copy with new metadata; objects over ``copy_max`` (5 GiB, the limit of
        CopyObject) are copied part by part with UploadPartCopy (needs ``size``)."""
        if size is not None and size > self.copy_max:
            return await self._multipart_copy(src, dst, metadata, if_match, size)

        async def op() -> str:
            hdr = self._meta_headers(metadata)
            hdr["x-amz-copy-source"] = quote(f"{self.loc.bucket}/{self._k(src)}", safe="/~")
            hdr["x-amz-metadata-directive"] = "REPLACE"
            if self.sse is not None:
                hdr.update(self.sse.copy_source_headers())
            if if_match is not None:
                hdr["x-amz-copy-source-if-match"] = if_match
            a = await self._lean.request(
                "PUT", self.loc.bucket, self._k(dst), hdr, error_in_200=True
            )
            return copy_etag(a.body)

        return await self._call("copy", f"{src} -> {dst}", op, keys=(src, dst))  # type: ignore[no-any-return]

    async def upload_part_copy(
        self,
        key: str,
        upload_id: str,
        number: int,
        src: str,
        start: int,
        end: int,
        *,
        if_match: str | None = None,
        src_version: str | None = None,
    ) -> str:
        async def op() -> str:
            hdr = self._sse_headers(False)
            hdr["x-amz-copy-source"] = quote(f"{self.loc.bucket}/{self._k(src)}", safe="/~")
            if src_version is not None:
                hdr["x-amz-copy-source"] += "?versionId=" + quote(src_version, safe="")
            hdr["x-amz-copy-source-range"] = f"bytes={start}-{end - 1}"
            if self.sse is not None:
                hdr.update(self.sse.copy_source_headers())
            if if_match is not None:
                hdr["x-amz-copy-source-if-match"] = if_match
            r = await self._lean.request(
                "PUT", self.loc.bucket, self._k(key), hdr, None,
                {"partNumber": str(number), "uploadId": upload_id}, error_in_200=True,
            )  # fmt: skip
            return copy_etag(r.body)

        what = f"{src} -> {key} part {number}"
        return await self._call("upload_part_copy", what, op, keys=(src, key))  # type: ignore[no-any-return]

    async def _multipart_copy(
        self, src: str, dst: str, metadata: Mapping[str, str], if_match: str | None, size: int
    ) -> str:
        upload_id = await self.create_multipart(dst, metadata)
        try:
            ranges = [(a, min(a + self.copy_part, size)) for a in range(0, size, self.copy_part)]
            etags: list[str] = [""] * len(ranges)

            async def part(i: int, a: int, b: int) -> None:
                etags[i] = await self.upload_part_copy(
                    dst, upload_id, i + 1, src, a, b, if_match=if_match
                )

            async with open_tasks() as nursery:
                for i, (a, b) in enumerate(ranges):
                    nursery.start_soon(part, i, a, b)
            # in place: the object must still be the one whose parts were copied
            return await self.complete_multipart(
                dst, upload_id, etags, if_match=if_match if src == dst else None
            )
        except BaseException:
            with trio.CancelScope(shield=True), contextlib.suppress(StoreError):
                await self.abort_multipart(dst, upload_id)
            raise

    async def delete(self, key: str) -> None:
        async def op() -> None:
            await self._lean.request("DELETE", self.loc.bucket, self._k(key), {})

        await self._call("delete", key, op)

    async def delete_many(self, keys: Sequence[str]) -> None:
        """DeleteObjects, 1000 keys a request (quiet: only failures are answered)."""

        async def op(batch: Sequence[str]) -> None:
            body = delete_body([self._k(k) for k in batch])
            hdr = {"Content-MD5": content_md5(body), "Content-Type": "application/xml"}
            a = await self._lean.request("POST", self.loc.bucket, "", hdr, body, {"delete": ""})
            errors = [e for e in parse_delete_errors(a.body) if e[1] != "NoSuchKey"]
            if errors:
                key, code, message = errors[0]
                raise StoreError(
                    f"{key}: {code}: {message}"
                    + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""),
                    object_keys=(key,),
                )

        # S3 takes at most 1000 keys a request; a server deletes one request's keys one
        # after another, so a few hundred go as up to four requests at once (500 keys on
        # SeaweedFS: 0.16 s in one request, 0.11 s in four)
        size = min(1000, max(100, -(-len(keys) // 4)))
        batches = [keys[i : i + size] for i in range(0, len(keys), size)]
        if len(batches) == 1:
            await self._call("delete_many", batches[0][0], op, batches[0])
            return
        limit = trio.CapacityLimiter(4)

        async def one(batch: Sequence[str]) -> None:
            async with limit:
                await self._call("delete_many", batch[0], op, batch)

        async with open_tasks() as n:
            for b in batches:
                n.start_soon(one, b)

    async def list(
        self, prefix: str, delimiter: str | None = "/", max_keys: int | None = None
    ) -> Listing:
        plen = len(self.loc.prefix)

        async def op() -> Listing:
            objs: list[ObjectInfo] = []
            prefixes: list[str] = []
            q = {"list-type": "2", "prefix": self._k(prefix), "encoding-type": "url"}
            if delimiter:
                q["delimiter"] = delimiter
            if max_keys is not None:
                q["max-keys"] = str(max_keys)
            while True:
                a = await self._lean.request("GET", self.loc.bucket, "", {}, query=q)
                page = parse_list_page(a.body)
                objs.extend(ObjectInfo(k[plen:], n, e, {}, m) for k, n, e, m in page.objects)
                prefixes.extend(p[plen:] for p in page.prefixes)
                enough = max_keys is not None and len(objs) + len(prefixes) >= max_keys
                if page.next_token is None or enough:
                    return Listing(objs, prefixes)
                q["continuation-token"] = page.next_token

        return await self._call("list", prefix or "/", op, keys=(prefix,))  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        pass


def make_config(opts: S3Options, style: str = "path") -> AioConfig:
    return AioConfig(
        max_pool_connections=opts.max_concurrency,
        connect_timeout=opts.connect_timeout,
        read_timeout=opts.read_timeout,
        retries={"mode": "standard", "total_max_attempts": opts.max_attempts},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": style, "payload_signing_enabled": False},
    )


@asynccontextmanager
async def open_s3_store(loc: S3Location, opts: S3Options) -> AsyncIterator[S3Store]:
    """An S3 store on its own loop thread; checks the bucket is reachable before yielding.

    The check uses a client with one retry and a short connect timeout, so a wrong or dead
    endpoint is reported in seconds; the store itself keeps the patient retry policy.
    """
    async with open_bridge() as bridge:
        stack = AsyncExitStack()

        # the endpoint botocore will use: --endpoint-url (AWS_ENDPOINT_URL is folded into it by
        # the command line), else AWS_ENDPOINT_URL_S3; else AWS's own
        endpoint = opts.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or None
        try:
            style = addressing_style(opts.addressing_style, endpoint, loc.bucket)
        except ValueError as e:
            raise UsageError(str(e)) from None

        def client_kw(o: S3Options) -> dict[str, Any]:
            session = get_session()
            kw: dict[str, Any] = {"config": make_config(o, style), "verify": o.verify}
            if o.endpoint_url:
                kw["endpoint_url"] = o.endpoint_url
            kw["region_name"] = o.region or session.get_config_variable("region") or "us-east-1"
            return kw

        session = get_session()

        async def create() -> tuple[Any, LeanS3]:
            client = await stack.enter_async_context(session.create_client("s3", **client_kw(opts)))
            lean = LeanS3(
                session,
                client.meta.endpoint_url,
                client.meta.region_name,
                limit=opts.max_concurrency,
                connect_timeout=opts.connect_timeout,
                read_timeout=opts.read_timeout,
                attempts=opts.max_attempts,
                verify=opts.verify,
                style=style,
            )
            await lean.open()
            stack.push_async_callback(lean.aclose)
            return client, lean

        async def probe() -> None:
            quick = replace(opts, max_attempts=2, connect_timeout=min(5.0, opts.connect_timeout))
            async with get_session().create_client("s3", **client_kw(quick)) as c:
                await c.head_bucket(Bucket=loc.bucket)

        try:
            client, lean = await bridge.run(create)
            store = S3Store(bridge, client, loc, opts.max_concurrency, lean)
            # the endpoint botocore resolved, as the requests use it: --endpoint-url, else
            # AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else the profile's endpoint_url
            store.secure = urlparse(str(client.meta.endpoint_url)).scheme.lower() == "https"
            try:
                await store._call("head_bucket", loc.bucket, probe, keys=())
            except NotFound:
                raise BucketNotFound(f"bucket {loc.bucket!r} does not exist") from None
            yield store
        finally:
            with trio.CancelScope(shield=True):
                await bridge.run(stack.aclose)

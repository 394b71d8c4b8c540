"""In-memory ``ObjectStore`` for unit tests of the upper layers (never the only S3 test)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import trio

from cryptfs.errors import NotFound, PreconditionFailed, StoreError
from cryptfs.store.base import Listing, ObjectInfo


def _etag(data: bytes) -> str:
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


class MemoryStore:
    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, dict[str, str], str]] = {}
        self._uploads: dict[str, tuple[str, dict[str, str], dict[int, bytes]]] = {}
        self._n = 0
        self._started: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.part_bytes = 0  # bytes of parts uploaded (not copied): what went through the client
        self.get_bytes = 0  # bytes GETs returned
        self.min_part = 0  # S3's least part but the last (5 MiB there), checked at completion
        # versioning on: every version written is kept by id (as S3 keeps them), readable and
        # copyable by it after later writes and deletes
        self.versioned = False
        self.versions: dict[str, tuple[bytes, dict[str, str], str]] = {}
        self.version_of: dict[str, str] = {}  # key -> the id of its current version
        # Last-Modified: a logical clock (S3's has one-second resolution; tests need order)
        self.modified: dict[str, float] = {}
        self._tick = 1_000_000.0

    def _touch(self, key: str) -> None:
        self._tick += 1.0
        self.modified[key] = self._tick

    def _count(self, op: str) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1

    def _info(
        self, key: str, if_match: str | None = None, version_id: str | None = None
    ) -> ObjectInfo:
        """``key``'s object (or ``version_id`` of it); ``if_match``: only that version of it
        (else PreconditionFailed)."""
        try:
            if version_id is not None:
                data, md, etag = self.versions[version_id]
                if not version_id.startswith(key + "#"):
                    raise KeyError(version_id)
            else:
                data, md, etag = self.objects[key]
        except KeyError:
            raise NotFound(key, object_keys=(key,)) from None
        if if_match is not None and etag != if_match:
            raise PreconditionFailed(key, object_keys=(key,))
        vid = version_id or self.version_of.get(key)
        return ObjectInfo(key, len(data), etag, dict(md), self.modified.get(key, 0.0), vid)

    def _data(self, key: str, version_id: str | None) -> bytes:
        return (self.versions[version_id] if version_id else self.objects[key])[0]

    def _set(self, key: str, obj: tuple[bytes, dict[str, str], str]) -> None:
        self.objects[key] = obj
        if self.versioned:
            self._n += 1
            vid = f"{key}#{self._n}"
            self.versions[vid] = obj
            self.version_of[key] = vid

    def _drop(self, key: str) -> None:
        self.objects.pop(key, None)
        self.version_of.pop(key, None)  # (a delete marker: its versions stay)

    def _check(self, key: str, if_match: str | None, if_none_match: bool) -> None:
        cur = self.objects.get(key)
        if if_none_match and cur is not None:
            raise PreconditionFailed(key, object_keys=(key,))
        if if_match is not None and (cur is None or cur[2] != if_match):
            raise PreconditionFailed(key, object_keys=(key,))

    async def head(self, key: str, *, version_id: str | None = None) -> ObjectInfo:
        self._count("head")
        await trio.lowlevel.checkpoint()
        return self._info(key, None, version_id)

    async def get(
        self,
        key: str,
        start: int | None = None,
        end: int | None = None,
        if_match: str | None = None,
        *,
        version_id: str | None = None,
    ) -> tuple[ObjectInfo, bytes]:
        self._count("get")
        await trio.lowlevel.checkpoint()
        info = self._info(key, if_match, version_id)
        data = self._data(key, version_id)
        out = data[start or 0 : end if end is not None else len(data)]
        self.get_bytes += len(out)
        return info, out

    async def put(
        self,
        key: str,
        body: bytes,
        metadata: Mapping[str, str],
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        self._count("put")
        await trio.lowlevel.checkpoint()
        self._check(key, if_match, if_none_match)
        etag = _etag(body)
        self._set(key, (bytes(body), dict(metadata), etag))
        self._touch(key)
        return etag

    async def create_multipart(self, key: str, metadata: Mapping[str, str]) -> str:
        self._n += 1
        uid = f"u{self._n}"
        self._uploads[uid] = (key, dict(metadata), {})
        self._tick += 1.0  # the same clock as Last-Modified (S3 dates uploads by its own)
        self._started[uid] = self._tick
        return uid

    async def upload_part(
        self, key: str, upload_id: str, number: int, data: bytes | memoryview
    ) -> str:
        self._count("upload_part")
        await trio.lowlevel.checkpoint()
        kept = self._uploads[upload_id][2][number] = bytes(data)
        self.part_bytes += len(kept)
        return _etag(kept)

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
        self._count("upload_part_copy")
        await trio.lowlevel.checkpoint()
        info = self._info(src, if_match, src_version)
        if not 0 <= start < end <= info.size:
            raise StoreError(f"copy range {start}-{end} outside {src}")
        kept = self._uploads[upload_id][2][number] = self._data(src, src_version)[start:end]
        return _etag(kept)

    async def complete_multipart(
        self,
        key: str,
        upload_id: str,
        etags: list[str],
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        self._count("complete_multipart")
        self._check(key, if_match, if_none_match)
        k, md, parts = self._uploads[upload_id]
        if any(len(parts[i]) < self.min_part for i in sorted(parts)[:-1]):
            raise StoreError("EntityTooSmall: a part but the last is below the least size")
        del self._uploads[upload_id]
        body = b"".join(parts[i] for i in sorted(parts))
        etag = _etag(body)[:-1] + f'-{len(parts)}"'
        self._set(k, (body, md, etag))
        self._touch(k)
        return etag

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        self._uploads.pop(upload_id, None)

    async def list_uploads(self, prefix: str) -> list[tuple[str, str, float]]:
        await trio.lowlevel.checkpoint()
        return [
            (k, uid, self._started.get(uid, 0.0))
            for uid, (k, _md, _parts) in self._uploads.items()
            if k.startswith(prefix)
        ]

    async def copy(
        self,
        src: str,
        dst: str,
        metadata: Mapping[str, str],
        *,
        if_match: str | None = None,
        size: int | None = None,
    ) -> str:
        self._count("copy")
        await trio.lowlevel.checkpoint()
        info = self._info(src, if_match)
        data = self.objects[src][0]
        self._set(dst, (data, dict(metadata), info.etag))  # as S3: same body, same ETag
        self._touch(dst)
        return info.etag

    async def delete(self, key: str) -> None:
        self._count("delete")
        await trio.lowlevel.checkpoint()
        self._drop(key)

    async def delete_many(self, keys: Sequence[str]) -> None:
        for i in range(0, len(keys), 1000):
            self._count("delete_many")
            await trio.lowlevel.checkpoint()
            for key in keys[i : i + 1000]:
                self._drop(key)

    async def list(
        self, prefix: str, delimiter: str | None = "/", max_keys: int | None = None
    ) -> Listing:
        self._count("list")
        await trio.lowlevel.checkpoint()
        objs: list[ObjectInfo] = []
        prefixes: set[str] = set()
        for key in sorted(self.objects):
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix) :]
            if delimiter and delimiter in rest:
                prefixes.add(prefix + rest.split(delimiter, 1)[0] + delimiter)
            else:
                data, _md, etag = self.objects[key]
                objs.append(ObjectInfo(key, len(data), etag, {}, self.modified.get(key, 0.0)))
            if max_keys is not None and len(objs) + len(prefixes) >= max_keys:
                break
        return Listing(objs, sorted(prefixes))

    async def aclose(self) -> None:
        pass

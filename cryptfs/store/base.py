"""The ``ObjectStore`` protocol every backend implements (S3, in-memory fake, fault injector).

Keys are relative to the volume's prefix; backends add bucket and prefix.  Backends raise only
``cryptfs.errors.StoreError`` subclasses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


def bare_etag(etag: str) -> str:
    """An ETag without the quotes some answers put around it (a listing's and a copy's
    answer for one version then compare equal)."""
    return etag.strip('"')


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    modified: float = 0.0  # Last-Modified, epoch seconds (HEAD/GET; 0 when unknown)
    # S3's id of this version, on a bucket with versioning on (HEAD/GET; None elsewhere, and
    # for a version written before versioning was turned on: S3's "null")
    version_id: str | None = None


@dataclass(frozen=True)
class Listing:
    objects: list[ObjectInfo]
    prefixes: list[str]


class ObjectStore(Protocol):
    async def head(self, key: str, *, version_id: str | None = None) -> ObjectInfo:
        """``key``'s object now, or (``version_id``) that version of it, which no later write
        changes (a bucket with versioning on)."""
        ...

    async def get(
        self,
        key: str,
        start: int | None = None,
        end: int | None = None,
        if_match: str | None = None,
        *,
        version_id: str | None = None,
    ) -> tuple[ObjectInfo, bytes]:
        """Bytes [start, end) (whole object when both are None) and the object's info.

        ``info.size`` is always the full object size.
        """
        ...

    async def put(
        self,
        key: str,
        body: bytes,
        metadata: Mapping[str, str],
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str: ...

    async def create_multipart(self, key: str, metadata: Mapping[str, str]) -> str: ...

    async def upload_part(
        self, key: str, upload_id: str, number: int, data: bytes | memoryview
    ) -> str:
        """Upload one part; ``data`` is the caller's again once this returns (or raises): a
        store that keeps it must copy it."""
        ...

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
        """Part ``number`` of ``key``'s upload is bytes [start, end) of object ``src``, copied
        by the server (UploadPartCopy); ``if_match``: only from that version of ``src``
        (PreconditionFailed otherwise); ``src_version``: from that version id of it."""
        ...

    async def complete_multipart(
        self,
        key: str,
        upload_id: str,
        etags: list[str],
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str: ...

    async def abort_multipart(self, key: str, upload_id: str) -> None: ...

    async def list_uploads(self, prefix: str) -> list[tuple[str, str, float]]:
        """Multipart uploads in progress under ``prefix``: (key, upload id, started, epoch s)."""
        ...

    async def copy(
        self,
        src: str,
        dst: str,
        metadata: Mapping[str, str],
        *,
        if_match: str | None = None,
        size: int | None = None,
    ) -> str: ...

    async def delete(self, key: str) -> None: ...

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Delete ``keys`` (absent ones are no error): at most 1000 keys a request, a few
        requests at once."""
        ...

    async def list(
        self, prefix: str, delimiter: str | None = "/", max_keys: int | None = None
    ) -> Listing: ...

    async def aclose(self) -> None: ...

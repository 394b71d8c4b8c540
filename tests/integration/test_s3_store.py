"""The S3 store and the whole filesystem against a real SeaweedFS server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from cryptfs.cache.staging import StagingArea
from cryptfs.crypto import Secret
from cryptfs.errors import BucketNotFound, NotFound, PreconditionFailed, StoreUnavailable
from cryptfs.format.volume import KeySource
from cryptfs.fs.filesystem import Filesystem
from cryptfs.fs.model import ROOT_INO, Options
from cryptfs.store.s3 import S3Location, S3Options, open_s3_store
from cryptfs.volume import Volume
from tests.conftest import S3Server, free_ports
from tests.fsutil import read_file, write_file

pytestmark = pytest.mark.integration


async def test_store_semantics(s3server: S3Server, bucket: str) -> None:
    loc = S3Location.parse(f"s3://{bucket}/pre/fix")
    async with open_s3_store(loc, S3Options(endpoint_url=s3server.endpoint)) as s:
        etag = await s.put("a/b", b"0123456789", {"cfs": "1"}, if_none_match=True)
        with pytest.raises(PreconditionFailed):
            await s.put("a/b", b"x", {}, if_none_match=True)
        with pytest.raises(PreconditionFailed):
            await s.put("a/b", b"x", {}, if_match='"0000"')
        info, data = await s.get("a/b", 2, 5)
        assert data == b"234" and info.size == 10 and info.metadata == {"cfs": "1"}
        with pytest.raises(PreconditionFailed):
            await s.get("a/b", 0, 1, if_match='"0000"')
        new = await s.copy("a/b", "a/c", {"cfs": "2"}, if_match=etag)
        assert new
        assert (await s.head("a/c")).metadata == {"cfs": "2"}
        with pytest.raises(PreconditionFailed):
            await s.copy("a/b", "a/d", {}, if_match='"0000"')
        await s.put("a/sub/x", b"", {})
        listing = await s.list("a/")
        assert [o.key for o in listing.objects] == ["a/b", "a/c"]
        assert listing.prefixes == ["a/sub/"]
        uid = await s.create_multipart("mp", {"cfs": "1"})
        e1 = await s.upload_part("mp", uid, 1, b"a" * (5 << 20))
        e2 = await s.upload_part("mp", uid, 2, b"b" * 10)
        await s.complete_multipart("mp", uid, [e1, e2], if_none_match=True)
        assert (await s.head("mp")).size == (5 << 20) + 10
        await s.delete("a/b")
        with pytest.raises(NotFound):
            await s.head("a/b")
        raw = s3server.client().head_object(Bucket=bucket, Key="pre/fix/a/c")
        assert raw["ContentLength"] == 10
        # keys that must be encoded (signing, URLs, the copy source, url-encoded listings)
        odd = "odd/we ird+%20=é~!*'();:@&$,?#[]"
        await s.put(odd, b"v", {"cfs": "1"})
        await s.copy(odd, odd + " copy", {"cfs": "3"})
        assert [o.key for o in (await s.list("odd/")).objects] == [odd, odd + " copy"]
        assert (await s.get(odd + " copy"))[1] == b"v"
        await s.delete(odd)
        assert [o.key for o in (await s.list("odd/", delimiter=None)).objects] == [odd + " copy"]
        # max_keys bounds a listing
        for i in range(7):
            await s.put(f"many/{i}", b"", {})
        assert len((await s.list("many/", max_keys=3)).objects) == 3
        for i in range(5):  # subdirectories count towards max_keys (rmdir's emptiness check)
            await s.put(f"deep/d{i}/x", b"", {})
        few = await s.list("deep/", max_keys=2)
        assert 1 <= len(few.prefixes) <= 2 and not few.objects
        s_all = await s.list("many/")
        assert [o.key for o in s_all.objects] == [f"many/{i}" for i in range(7)]
        # DeleteObjects: absent keys are no error, odd keys are encoded, others stay
        await s.delete_many([f"many/{i}" for i in range(5)] + ["many/absent", odd + " copy"])
        assert [o.key for o in (await s.list("many/")).objects] == ["many/5", "many/6"]
        assert not (await s.list("odd/", delimiter=None)).objects
        # a few hundred keys go as several requests at once: all of them, and only them
        async with trio.open_nursery() as n:
            for i in range(450):
                n.start_soon(s.put, f"lots/{i:03d}", b"", {})
        before = s.requests
        await s.delete_many([f"lots/{i:03d}" for i in range(440)])
        assert s.requests - before == 4
        assert [o.key for o in (await s.list("lots/")).objects] == [
            f"lots/{i:03d}" for i in range(440, 450)
        ]


async def test_upload_part_copy_takes_ranges_of_one_version(
    s3server: S3Server, bucket: str
) -> None:
    """What edits that copy untouched segments need of the server (FORMAT.md §8.5, §8.8):
    a multipart upload whose parts are ranges of another object copied server-side, beside
    parts uploaded; only from the version named (If-Match on the copy source), else 412; a
    part of 5 MiB or more copied from inside an object, the last part short."""
    loc = S3Location.parse(f"s3://{bucket}/upc")
    async with open_s3_store(loc, S3Options(endpoint_url=s3server.endpoint)) as s:
        old = os.urandom((12 << 20) + 777)
        etag = await s.put("src", old, {"cfs": "1"})
        uid = await s.create_multipart("dst", {"cfs": "2"})
        e1 = await s.upload_part_copy("dst", uid, 1, "src", 1000, 1000 + (6 << 20), if_match=etag)
        new = os.urandom(5 << 20)  # (every part but the last: 5 MiB at least)
        e2 = await s.upload_part("dst", uid, 2, new)
        e3 = await s.upload_part_copy("dst", uid, 3, "src", 9 << 20, len(old), if_match=etag)
        with pytest.raises(PreconditionFailed):
            await s.upload_part_copy("dst", uid, 4, "src", 0, 100, if_match='"0000"')
        await s.complete_multipart("dst", uid, [e1, e2, e3], if_none_match=True)
        want = old[1000 : 1000 + (6 << 20)] + new + old[9 << 20 :]
        info, got = await s.get("dst", 0, len(want))
        assert got == want and info.size == len(want) and info.metadata == {"cfs": "2"}
        # the source replaced: a copy that names the version it expected is refused
        await s.put("src", b"replaced" * 1000, {})
        uid2 = await s.create_multipart("dst2", {})
        with pytest.raises(PreconditionFailed):
            await s.upload_part_copy("dst2", uid2, 1, "src", 0, 100, if_match=etag)
        await s.abort_multipart("dst2", uid2)


async def test_missing_bucket_and_unreachable_endpoint(s3server: S3Server) -> None:
    with pytest.raises(BucketNotFound):
        async with open_s3_store(
            S3Location.parse("s3://no-such-bucket-x"), S3Options(endpoint_url=s3server.endpoint)
        ):
            pass
    port = free_ports(1)[0]
    with pytest.raises(StoreUnavailable):
        async with open_s3_store(
            S3Location.parse("s3://abc"),
            S3Options(endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1, connect_timeout=2),
        ):
            pass


@pytest.mark.parametrize("segment_log2", [None, 20, 23])
async def test_filesystem_over_s3_large_file_multipart(
    s3server: S3Server, bucket: str, tmp_path: Path, segment_log2: int | None
) -> None:
    """A multipart upload to SeaweedFS, read back by ranges: a revision-1 body (runs of
    chunks), or revision 3 with segments of 1 MiB (parts of 5 segments, the last 6 with the
    trailer) or 8 MiB (one per part; the last one short); then edited in place."""
    loc = S3Location.parse(f"s3://{bucket}/vol{segment_log2}")
    src = KeySource(keyfile=Secret(os.urandom(32)))
    data = os.urandom((20 << 20) + 12345)
    async with open_s3_store(loc, S3Options(endpoint_url=s3server.endpoint)) as store:
        vol = await Volume.create(
            store, src, chunk_log2=16, encrypt_names=True, segment_log2=segment_log2
        )
        staging = StagingArea(tmp_path / "st", vol.keys.cache, vol.chunk)
        fs = Filesystem(
            vol,
            staging,
            Options(multipart_threshold=4 << 20, part_size=5 << 20),
            key_prefix=loc.prefix,
        )
        await fs.ensure_root()
        node, h = await fs.create(ROOT_INO, b"big", 0o644, 0, 0)
        for off in range(0, len(data), 1 << 20):
            await fs.write(h.fh, off, data[off : off + (1 << 20)])
        await fs.release(h.fh)
        await fs.sync_node(node)
        assert "-" in (node.remote_etag or "")  # multipart ETag
        parts = {None: 5, 20: 4, 23: 3}[segment_log2]  # (80 chunks; 5 segments, the last 6; 1)
        assert node.remote_etag.strip('"').endswith(f"-{parts}")  # type: ignore[union-attr]
        assert node.attrs.body == (1 if segment_log2 is None else 3)
        vol2 = await Volume.open(store, src)
        fs2 = Filesystem(
            vol2, StagingArea(tmp_path / "st2", vol2.keys.cache, vol2.chunk), key_prefix=loc.prefix
        )
        n2 = await fs2.lookup(ROOT_INO, b"big")
        h2 = await fs2.open(n2.ino, os.O_RDONLY)
        got = bytearray()
        while len(got) < len(data):
            chunk = await fs2.read(h2.fh, len(got), 1 << 20)
            assert chunk
            got += chunk
        assert bytes(got) == data
        assert await fs2.read(h2.fh, 7_000_000, 4096) == data[7_000_000:7_004_096]
        fs3 = Filesystem(  # (cold, by ranges across segment boundaries, last one first)
            vol2, StagingArea(tmp_path / "st3", vol2.keys.cache, vol2.chunk), key_prefix=loc.prefix
        )
        h3 = await fs3.open((await fs3.lookup(ROOT_INO, b"big")).ino, os.O_RDONLY)
        for off in (len(data) - 5000, (16 << 20) - 3000, (1 << 20) - 100, 0):
            assert await fs3.read(h3.fh, off, 6000) == data[off : off + 6000]
        assert fs3.integrity_failures == 0
        # an edit: 4 KiB into the middle and 1 MiB appended; the segments neither touches
        # are copied by SeaweedFS (UploadPartCopy of ranges, If-Match), S3's part rules kept
        edited = bytearray(data)
        edited[10 << 20 : (10 << 20) + 4096] = os.urandom(4096)
        edited += os.urandom(1 << 20)
        n2.refreshed_at = -1e18
        h2w = await fs2.open(n2.ino, os.O_WRONLY)
        await fs2.write(h2w.fh, 10 << 20, bytes(edited[10 << 20 : (10 << 20) + 4096]))
        await fs2.write(h2w.fh, len(data), bytes(edited[len(data) :]))
        await fs2.release(h2w.fh)
        await fs2.sync_node(n2)
        copied = {None: 0, 20: 10 << 20, 23: 8 << 20}[segment_log2]  # (parts of 8 MiB here)
        assert fs2.counters()["upload_copied_bytes"] == copied
        fs4 = Filesystem(
            vol2, StagingArea(tmp_path / "st4", vol2.keys.cache, vol2.chunk), key_prefix=loc.prefix
        )
        n4 = await fs4.lookup(ROOT_INO, b"big")
        assert await read_file(fs4, n4.ino) == bytes(edited)
        assert fs4.integrity_failures == 0


@pytest.fixture
def virtual_host(bucket: str) -> Iterator[str]:
    """``{bucket}.s3.cryptfs.test`` resolves to 127.0.0.1 (an /etc/hosts line, removed after);
    the bare ``s3.cryptfs.test`` does not, so a path-style request to it cannot succeed."""
    from tests.conftest import S3_DOMAIN

    hosts = Path("/etc/hosts")
    before = hosts.read_text()
    line = f"127.0.0.1 {bucket}.{S3_DOMAIN}  # cryptfs test\n"
    hosts.write_text(before + ("" if before.endswith("\n") else "\n") + line)
    try:
        yield S3_DOMAIN
    finally:
        hosts.write_text(before)


async def test_virtual_hosted_requests_end_to_end(
    s3server: S3Server, bucket: str, virtual_host: str, tmp_path: Path
) -> None:
    """``--addressing-style virtual`` against SeaweedFS with its S3 domain name set: every
    request (the lean object calls, signed here, and botocore's control calls) names the
    bucket in the Host it is signed for; a file system works over it."""
    import socket

    port = s3server.endpoint.rsplit(":", 1)[1]
    endpoint = f"http://{virtual_host}:{port}"
    with pytest.raises(OSError):
        socket.getaddrinfo(virtual_host, int(port))  # (no path-style request can get through)
    loc = S3Location.parse(f"s3://{bucket}/v")
    opts = S3Options(endpoint_url=endpoint, addressing_style="virtual")
    async with open_s3_store(loc, opts) as s:
        etag = await s.put("a/b", b"0123456789", {"cfs": "1"}, if_none_match=True)
        info, data = await s.get("a/b", 2, 5)
        assert data == b"234" and info.metadata == {"cfs": "1"}
        await s.copy("a/b", "a/c", {"cfs": "2"}, if_match=etag)
        assert (await s.head("a/c")).metadata == {"cfs": "2"}
        assert [o.key for o in (await s.list("a/")).objects] == ["a/b", "a/c"]
        uid = await s.create_multipart("mp", {"cfs": "1"})
        part = await s.upload_part("mp", uid, 1, b"x" * 10)
        await s.complete_multipart("mp", uid, [part])
        assert (await s.head("mp")).size == 10
        await s.delete_many(["a/b", "a/c", "mp"])
        assert (await s.list("")).objects == []
        src = KeySource(keyfile=Secret(b"k" * 32))
        vol = await Volume.create(s, src, chunk_log2=12, encrypt_names=True)
        fs = Filesystem(vol, StagingArea(tmp_path / "s", vol.keys.cache, vol.chunk), Options())
        await fs.ensure_root()
        node, h = await fs.create(ROOT_INO, b"f", 0o644, 0, 0)
        await fs.write(h.fh, 0, b"virtual" * 1000)
        await fs.release(h.fh)
        assert await fs.flush_all() == []
        fs.cache.clear()
        h = await fs.open(node.ino, os.O_RDONLY)
        assert await fs.read(h.fh, 0, 7000) == b"virtual" * 1000
        await fs.release(h.fh)
        vol.keyring.close()
    # auto, on a custom endpoint: path style (botocore's rule), which this name cannot serve
    with pytest.raises(StoreUnavailable):
        async with open_s3_store(loc, S3Options(endpoint_url=endpoint, max_attempts=1)):
            pass


async def test_versioned_bucket_edits_stage_only_what_is_written(
    s3server: S3Server, bucket: str, tmp_path: Path
) -> None:
    """On a SeaweedFS bucket with versioning on: the store reads and copies a version by
    its id after it was replaced; an edit of a 21 MiB file (segments of 8 MiB) stages only
    what it writes (the first write fetches a trailer, a head and a chunk), the upload reads
    the rest of the one segment it rebuilds and copies the other two by version id;
    another mount's replacement meanwhile makes a whole conflict copy, nothing downloaded."""
    s3server.client().put_bucket_versioning(
        Bucket=bucket, VersioningConfiguration={"Status": "Enabled"}
    )
    loc = S3Location.parse(f"s3://{bucket}/v")
    src = KeySource(keyfile=Secret(os.urandom(32)))
    async with open_s3_store(loc, S3Options(endpoint_url=s3server.endpoint)) as store:
        # the store: a version by id, after the key was written again
        await store.put("k", b"one" * 3_000_000, {})
        first = await store.head("k")
        await store.put("k", b"two", {})
        assert first.version_id is not None and (await store.head("k")).version_id not in (
            None, first.version_id,
        )  # fmt: skip
        info, data = await store.get("k", 3, 9, version_id=first.version_id)
        assert data == b"oneone" and info.version_id == first.version_id
        up = await store.create_multipart("c", {})
        e1 = await store.upload_part_copy(
            "c", up, 1, "k", 0, 6_000_000, if_match=first.etag, src_version=first.version_id
        )
        await store.complete_multipart("c", up, [e1])
        assert (await store.get("c"))[1] == b"one" * 2_000_000
        await store.delete_many(["k", "c"])  # (not the volume's: out of its listings)

        vol = await Volume.create(store, src, chunk_log2=16, encrypt_names=True, segment_log2=23)
        opt = Options(multipart_threshold=4 << 20, part_size=5 << 20)

        def mount(name: str) -> Filesystem:
            st = StagingArea(tmp_path / name, vol.keys.cache, vol.chunk)
            return Filesystem(vol, st, opt, key_prefix=loc.prefix)

        fs = mount("a")
        await fs.ensure_root()
        data = bytearray(os.urandom((21 << 20) + 7))
        await write_file(fs, ROOT_INO, b"big", bytes(data))
        fs2 = mount("b")
        node = await fs2.lookup(ROOT_INO, b"big")
        h = await fs2.open(node.ino, os.O_RDWR)
        before = store.bytes_in
        await fs2.write(h.fh, (10 << 20) + 5, b"edited")
        data[(10 << 20) + 5 : (10 << 20) + 11] = b"edited"
        assert store.bytes_in - before < 200_000  # (not 21 MiB)
        assert node.stage is not None and node.stage.fill is not None
        await fs2.release(h.fh)
        await fs2.sync_node(node)
        assert store.bytes_in - before < 9 << 20  # the segment rebuilt, at most
        # segments 0 and 2 (the last, 5 MiB: a part by itself; the trailer goes up alone)
        assert fs2.counters()["upload_copied_bytes"] == (13 << 20) + 7
        fs3 = mount("c")
        assert await read_file(fs3, (await fs3.lookup(ROOT_INO, b"big")).ino) == bytes(data)

        # a replacement by another mount while this one holds an edit
        h = await fs2.open(node.ino, os.O_WRONLY)
        await fs2.write(h.fh, 3 << 20, b"mine")
        data[3 << 20 : (3 << 20) + 4] = b"mine"
        theirs = os.urandom(5 << 20)
        n3 = await fs3.lookup(ROOT_INO, b"big")
        h3 = await fs3.open(n3.ino, os.O_WRONLY | os.O_TRUNC)
        await fs3.write(h3.fh, 0, theirs)
        await fs3.release(h3.fh)
        await fs3.sync_node(n3)
        await fs2.release(h.fh)
        before = store.bytes_in
        await fs2.sync_node(node)
        assert store.bytes_in - before < 9 << 20  # (copied by version id, not downloaded)
        assert fs2.counters()["conflicts"] == 1
        fs4 = mount("d")
        names = {n: nd for n, nd in await fs4.readdir(ROOT_INO)}
        (cname,) = [n for n in names if n.startswith(b"big.conflict-")]
        assert await read_file(fs4, names[cname].ino) == bytes(data)
        assert await read_file(fs4, names[b"big"].ino) == theirs
        assert fs4.integrity_failures == 0
